"""The `reconcile` command line (click).

Exit codes: 0 success (dry run: converged), 1 error (one line on stderr naming the file
and field), 2 dry run with changes pending.
"""

from __future__ import annotations

import signal

# As PID 1 of a pid namespace (containers, our tests) a signal with no handler is ignored, so
# a SIGTERM during start-up would be lost: remember it until the agent installs its own.
EARLY_SIGNALS: list[int] = []
for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, lambda signum, _frame: EARLY_SIGNALS.append(signum))

import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import NoReturn  # noqa: E402

import click  # noqa: E402

import reconciler  # noqa: E402
from reconciler import spec as specmod  # noqa: E402

SPEC_HELP = "spec file or directory [default: $RECONCILER_SPEC, then /etc/reconciler/]"


def default_spec() -> str:
    return os.environ.get("RECONCILER_SPEC") or specmod.DEFAULT_SPEC_PATH


def default_node() -> str:
    return os.environ.get("RECONCILER_NODE") or socket.gethostname().split(".")[0]


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"reconcile: {message}", err=True)
    sys.exit(code)


def load_or_fail(path: str) -> specmod.Spec:
    try:
        return specmod.load(path)
    except specmod.SpecError as exc:
        fail(str(exc))
        raise AssertionError  # unreachable


class _Json(logging.Formatter):
    FIELDS = ("group", "tag", "node", "peer", "reason", "result")

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for f in self.FIELDS:
            if hasattr(record, f):
                doc[f] = getattr(record, f)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _Journal(logging.Formatter):
    """For stderr connected to journald: a syslog priority prefix on every line (sd-daemon(3))
    and no timestamp (the journal stamps each line itself)."""

    PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{next((p for level, p in self.PRIORITY if record.levelno >= level), 7)}>"
        # Each line is a journal entry of its own: a traceback's lines keep the priority too.
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def under_journal(environ, stderr_stat: os.stat_result | None) -> bool:
    """Is stderr the journal's stream? systemd sets JOURNAL_STREAM=DEVICE:INODE of the stream
    it connected; a child whose stderr was redirected elsewhere inherits the variable but not
    the stream (systemd.exec(5))."""
    value = environ.get("JOURNAL_STREAM", "")
    if not value or stderr_stat is None:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
    except ValueError:
        return False
    return (stderr_stat.st_dev, stderr_stat.st_ino) == (dev, ino)


def _stderr_stat() -> os.stat_result | None:
    try:
        return os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return None


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json())
    elif under_journal(os.environ, _stderr_stat()):
        handler.setFormatter(_Journal())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("reconciler")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def print_plan(plan, *, node: str) -> None:
    if plan.empty:
        click.echo(f"{node}: converged, nothing to do")
    for a in plan.actions:
        click.echo(("URGENT " if a.urgent else "") + a.describe())
    for g, note in plan.notes.items():
        click.echo(f"  ({g}: {note})")


def dry_run(spec_path: str, node: str, down: tuple[str, ...]) -> None:
    from reconciler.agent import dryrun
    from reconciler.store import StoreError

    spec = load_or_fail(spec_path)
    try:
        plan = dryrun.simulate(spec, node, down)
    except StoreError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{spec.shown_store_url}: {exc}")
    print_plan(plan, node=node)
    sys.exit(0 if plan.empty else 2)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(reconciler.__version__, "-V", "--version", prog_name="reconcile", message="%(prog)s %(version)s")
@click.option("--dry-run", is_flag=True, help="print what `run` would do now, with a reason per action")
@click.option("--spec", "spec_path", default=default_spec, help=SPEC_HELP)
@click.option("--node", default=default_node, help="this node's name [default: $RECONCILER_NODE, then the hostname]")
@click.option("--node-down", multiple=True, help="with --dry-run: plan as if this node had died (repeatable)")
@click.pass_context
def main(ctx: click.Context, dry_run: bool, spec_path: str, node: str, node_down: tuple[str, ...]) -> None:
    """High availability for a cluster of Linux machines, declared in TOML."""
    ctx.ensure_object(dict)
    ctx.obj.update(spec=spec_path, node=node)
    if ctx.invoked_subcommand is None:
        if dry_run:
            globals()["dry_run"](spec_path, node, node_down)
        click.echo(ctx.get_help())


@main.command()
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, help="this node's name")
@click.option("--once", is_flag=True, help="converge once and exit, leaving processes running (no keeper: single node only)")
@click.option("--dry-run", "dry", is_flag=True, help="print the plan, execute nothing")
@click.option("--node-down", multiple=True, help="with --dry-run: plan as if this node had died (repeatable)")
@click.option("--metrics-address", default="127.0.0.1:9735", show_default=True, help="HOST:PORT for /metrics; 'off' disables")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def run(ctx, spec_path, node, once, dry, node_down, metrics_address, log_format, verbose) -> None:
    """Run the agent in the foreground."""
    spec_path = spec_path or ctx.obj["spec"]
    node = ctx.obj["node"] if node is None else node  # (--node "" is refused below, not the hostname)
    if dry:
        dry_run(spec_path, node, node_down)
    setup_logging(log_format, verbose)
    from reconciler.agent import loop as agentmod
    from reconciler.agent import metrics as metricsmod

    try:
        from reconciler.model import valid_name
        from reconciler.store import StoreRefused

        valid_name(node) or fail(f"--node: {node!r} is not a valid node name (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)")
        metrics = metricsmod.Metrics(node)
        server = None
        if metrics_address != "off":
            try:
                server = metricsmod.serve(metrics, metrics_address)
            except (OSError, ValueError) as exc:
                fail(f"--metrics-address {metrics_address}: {getattr(exc, 'strerror', None) or exc}")
        from reconciler.host import notify

        a = agentmod.Agent(spec_path, node, once=once, metrics=metrics, notify=notify, early_signals=EARLY_SIGNALS)
        code = asyncio.run(a.run())
        logging.getLogger("reconciler").debug("event loop closed")
        if server is not None:
            server.shutdown()
        sys.exit(code)
    except (specmod.SpecError, agentmod.AlreadyRunning, StoreRefused) as exc:
        fail(str(exc))


@main.command()
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def check(ctx, spec_path) -> None:
    """Validate the spec and summarise it, with each group's worst-case failover time."""
    spec_path = spec_path or ctx.obj["spec"]
    spec = load_or_fail(spec_path)
    problems = []
    for g in spec.groups.values():
        for i, e in enumerate(g.entries):
            if e.command and e.mode != "off":
                exe = e.command[0]
                found = os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe) is not None
                if not found:
                    problems.append(f"{g.source}: groups.{g.name}.entries[{i}].command: {exe}: command not found")
        if g.fence:
            exe = g.fence[0]
            if not (os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe)):
                problems.append(f"{g.source}: groups.{g.name}.fence: {exe}: command not found")
    t = spec.cluster.timing
    click.echo(f"spec {spec_path}: {len(spec.groups)} groups, digest {spec.digest()}, store {spec.shown_store_url}")
    click.echo(
        f"timing: heartbeat {specmod.format_duration(t.heartbeat)}, lease {specmod.format_duration(t.lease)}, "
        f"dead_after {specmod.format_duration(t.dead_after)} (safe: must exceed {t.minimum_dead_after() * 1000:.0f}ms)"
    )
    for g in spec.groups.values():
        worst = t.worst_failover()
        parts = [f"detect <= {worst:.2f}s"]
        if g.fence:
            parts.append(f"fence <= {specmod.format_duration(g.fence_timeout)}")
        fg = [e for e in g.entries if e.foreground and e.active_at(g.runlevel)]
        bounded = all(e.timeout is not None for e in fg)
        start = sum(e.timeout or 0 for e in fg)
        parts.append(f"start <= {start:.2f}s + spawn" if bounded else "start: foreground entries without timeout")
        total = worst + (g.fence_timeout if g.fence else 0) + start
        where = ", ".join(g.nodes) if g.nodes else "any node"
        click.echo(
            f"  {g.name}: runlevel {g.runlevel}, {len(g.entries)} entries, on {where}; "
            f"worst-case failover {total:.2f}s{'' if bounded else '+'} ({'; '.join(parts)})"
        )
    # What a running agent does with an empty spec (loader.check_replacement), said beforehand.
    if spec.cluster.stop_all:
        click.echo(f"reconcile: warning: {spec_path}: cluster.stop_all: true: agents apply this spec even where it stops every group", err=True)
    elif not spec.groups:
        click.echo(
            f"reconcile: warning: {spec_path}: groups: no groups: a running agent refuses this spec, which would stop every"
            " group that runs, and keeps its last good one; set stop_all = true in [cluster] to stop them all", err=True,
        )
    for p in problems:
        click.echo(f"reconcile: {p}", err=True)
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("group")
@click.argument("runlevel")
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def tell(ctx, group, runlevel, spec_path) -> None:
    """Set GROUP's desired RUNLEVEL in the spec (comments survive); running agents converge."""
    from reconciler.spec import edit

    spec_path = spec_path or ctx.obj["spec"]
    try:
        path = edit.tell(spec_path, group, runlevel)
    except specmod.SpecError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or spec_path}: {exc.strerror or exc}")
    click.echo(f"{group}: runlevel {runlevel} (written to {path})")


@main.command()
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, help="whose view of heartbeat ages to show")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def status(ctx, spec_path, node, as_json) -> None:
    """Show every node and every group: owner, runlevels, entries, pending takeovers."""
    from reconciler.agent import status as statusmod
    from reconciler.store import StoreError
    from reconciler.store.factory import open_store

    from reconciler.spec import loader

    path = spec_path or ctx.obj["spec"]
    spec_error = None
    try:
        spec = specmod.load(path)
    except specmod.SpecError as exc:
        # The agents keep running their last good spec: still show what they publish.
        spec_error = str(exc)
        try:
            spec = loader.peek(path)
        except specmod.SpecError:
            fail(spec_error)
    c = spec.cluster

    async def read():
        from reconciler.store import Snapshot, directory

        if spec.store_url.startswith("dir:") and directory.never_set_up(spec.store_url[4:]):
            return Snapshot()  # no agent has started yet (the first one sets the store up)
        store = open_store(spec.store_url) if spec.store_url.startswith("dir:") else open_store(
            spec.store_url, prefix=c.etcd_prefix, ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key, user=c.etcd_user,
            password=c.etcd_password, lease=c.timing.lease,
        )
        try:
            return await store.read()
        finally:
            await store.close()

    try:
        snap = asyncio.run(read())
    except StoreError as exc:
        # After a bad edit the store's address may be a guess: the spec error comes first.
        fail(f"{spec_error} (and the store: {exc})" if spec_error is not None else str(exc))
    doc = statusmod.cluster_status(
        spec, snap, node=node or ctx.obj["node"], dead_after=c.timing.dead_after, published_groups=spec_error is not None
    )
    if spec_error is not None:
        doc["spec_error"] = spec_error
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else statusmod.render(doc))
    if spec_error is not None:
        fail(f"{spec_error} (shown: what the nodes publish; they keep their last good spec)")


@main.command(name="import")
@click.argument("cltab", type=click.Path(dir_okay=False))
@click.argument("hactl", type=click.Path(dir_okay=False), required=False)
def import_(cltab, hactl) -> None:
    """Print a TOML spec equivalent to an OpenMosix::HA cltab (and hactl)."""
    from reconciler.spec import importer

    try:
        with open(cltab, encoding="utf-8") as fh:
            cltab_text = fh.read()
        hactl_text = None
        if hactl:
            with open(hactl, encoding="utf-8") as fh:
                hactl_text = fh.read()
    except OSError as exc:
        fail(f"{exc.filename}: {exc.strerror}")
    try:
        text, notes = importer.convert(cltab_text, hactl_text, cltab_name=cltab, hactl_name=hactl or "hactl")
    except importer.CltabError as exc:
        fail(str(exc))
    for n in notes:
        click.echo(f"reconcile import: note: {n}", err=True)
    click.echo(text, nl=False)


if __name__ == "__main__":
    main()
