"""The `reconcile` command line (click).

Exit codes (docs/cli.md has the table and why): 0 success (dry run: converged), 1 error (one
line on stderr naming the file and field), 2 dry run with changes pending, 3 `status --check`
found something not as desired, 64 usage error (sysexits' EX_USAGE: click's own 2 would read
as "changes pending").

What a command computes lives in the package (spec/summary.py, agent/overview.py,
agent/dryrun.py); the commands live here (run, check, import) and beside: the cluster spec's
in cli/clusterspec.py, the operator's (move, standby, maintenance, clear, forget) in
cli/operator.py, what shows the cluster (status, logs) in cli/views.py, the history (events)
in cli/history.py. (About 400 lines: besides run, check and import, this module holds what
every command module shares: the group's options, spec and node defaults, completion, the
one-line failure and the logging set-up.)
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
import socket  # noqa: E402
import sys  # noqa: E402
from typing import NoReturn  # noqa: E402

import click  # noqa: E402
from click.core import ParameterSource  # noqa: E402
from click.shell_completion import CompletionItem  # noqa: E402

import reconciler  # noqa: E402
from reconciler import spec as specmod  # noqa: E402

SPEC_HELP = "spec file or directory [default: $RECONCILER_SPEC, then /etc/reconciler/]"
EX_USAGE = 64
EXIT_CODES = ("Exit codes: 0 success, 1 error, 2 changes pending (--dry-run), 3 not as desired (status --check),"
              " 64 usage error (docs/cli.md).")


def epilog(*examples: str) -> str:
    # "\b": click keeps the paragraph's lines as they are
    return "\b\nExamples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES


def usage_error(exc: click.UsageError) -> NoReturn:
    """One line, like every other error, and EX_USAGE (64) rather than click's 2, which
    `--dry-run` has meant "changes pending" since before usage errors were distinguished."""
    where = exc.ctx.command_path.replace(exc.ctx.find_root().info_name or "", "reconcile", 1) if exc.ctx else "reconcile"
    fail(f"{exc.format_message()} (see: {where} --help)", EX_USAGE)


class _Cli(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            usage_error(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # the subcommands' parsing, and ctx.fail in a callback
            usage_error(exc)


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` (parameter names) given on the command line, by their long names."""
    spelt = {p.name: max(p.opts, key=len) for p in ctx.command.params}
    return [spelt[n] for n in names if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE]


def completer(kind: str):
    """A shell_complete callback offering the spec's `kind` names (spec/summary.py `names`):
    the spec of --spec if typed, else the default; a bad spec completes nothing."""

    def complete(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        from reconciler.spec import summary

        path = ctx.params.get("spec_path") or ctx.find_root().params.get("spec_path") or default_spec()
        return [CompletionItem(n) for n in summary.names(path)[kind] if n.startswith(incomplete)]

    return complete


complete_group, complete_node, complete_entry = completer("groups"), completer("nodes"), completer("entries")


def default_spec() -> str:
    return os.environ.get("RECONCILER_SPEC") or specmod.DEFAULT_SPEC_PATH


def default_node() -> str:
    return os.environ.get("RECONCILER_NODE") or socket.gethostname().split(".")[0]


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"reconcile: {message}", err=True)
    sys.exit(code)


def default_node_file() -> str | None:
    return os.environ.get("RECONCILER_NODE_FILE") or None


def load_or_fail(path: str) -> specmod.Spec:
    from reconciler.spec import loader

    try:
        return loader.load(path, node_file=click.get_current_context().obj.get("node_file"))
    except specmod.SpecError as exc:
        fail(str(exc))
        raise AssertionError  # unreachable


def spec_to_use(path: str, *, explicit: bool) -> specmod.Spec:
    """The spec a command looks at: the cluster spec (the store's current revision, with this
    node's local settings) unless a spec path was given explicitly (`--spec`), or the store
    holds none or cannot be reached (then the local files, saying so on stderr)."""
    from reconciler.agent import clusterspec
    from reconciler.cluster import survey
    from reconciler.spec import loader
    from reconciler.store import StoreError

    local_spec = load_or_fail(path)
    if explicit:
        return local_spec
    try:
        rev = asyncio.run(survey.current_revision(local_spec))
    except StoreError as exc:
        click.echo(f"reconcile: warning: {exc}: using the local files {path}", err=True)
        return local_spec
    if rev is None:
        return local_spec
    try:
        local = loader.local_settings(path, node_file=click.get_current_context().obj.get("node_file"))
        return clusterspec.load_revision(rev, spec_path=path, local=local)
    except specmod.SpecError as exc:
        fail(f"the store's revision {rev.number} does not load here: {exc}")


def spec_explicit(ctx: click.Context) -> bool:
    """Was a spec path given on the command line (to the command or before it)?"""
    return "--spec" in ctx.obj.get("given", set()) or (
        "spec_path" in ctx.params and ctx.get_parameter_source("spec_path") is ParameterSource.COMMANDLINE)


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


def dry_run(spec_path: str, node: str, down: tuple[str, ...], *, as_json: bool = False) -> NoReturn:
    from reconciler.agent import dryrun
    from reconciler.store import StoreError

    spec = spec_to_use(spec_path, explicit=spec_explicit(click.get_current_context()))
    try:
        tr = dryrun.transition(spec, node, down)
    except StoreError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{spec.shown_store_url}: {exc}")
    print_transition(dryrun.transition_doc(tr, node), as_json=as_json)
    sys.exit(0 if not tr.steps else 2)


def print_transition(doc: dict, *, as_json: bool) -> None:
    from reconciler.agent import dryrun

    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in dryrun.render_transition(doc):
            click.echo(line)


# Which of the group's options each command reads (any other given is refused, not ignored).
USES = {"run": {"spec_path", "node", "node_down", "node_file"}, "status": {"spec_path", "node", "node_file"},
        "check": {"spec_path", "node_file"}, "tell": {"spec_path", "node_file"}, "logs": {"spec_path", "node", "node_file"},
        "import": set(), "apply": {"spec_path", "node_file"}, "diff": {"spec_path", "node_file"},
        "history": {"spec_path", "node_file"}, "rollback": {"spec_path", "node_file"},
        "clear": {"spec_path", "node", "node_file"}, "events": {"spec_path", "node_file"},
        "forget": {"spec_path", "node_file"}}


@click.group(cls=_Cli, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=epilog("reconcile --dry-run --node-down n2    # what this node would do if n2 died",
                           "reconcile --dry-run --json", "eval \"$(_RECONCILE_COMPLETE=bash_source reconcile)\"    # completion"))
@click.version_option(reconciler.__version__, "-V", "--version", prog_name="reconcile", message="%(prog)s %(version)s")
@click.option("--dry-run", is_flag=True, help="print what `run` would do now, with a reason per action; exit 2 if anything would")
@click.option("--spec", "spec_path", default=default_spec, help=SPEC_HELP)
@click.option("--node", default=default_node, help="this node's name [default: $RECONCILER_NODE, then the hostname]",
              shell_complete=complete_node)
@click.option("--node-file", default=default_node_file,
              help="this node's own settings (store, state_dir, ...) [default: $RECONCILER_NODE_FILE, then a directory"
                   " spec's node.toml]")
@click.option("--node-down", multiple=True, help="with --dry-run: plan as if this node had died (repeatable)",
              shell_complete=complete_node)
@click.option("--json", "as_json", is_flag=True, help="with --dry-run: the plan as JSON")
@click.pass_context
def main(ctx: click.Context, dry_run: bool, spec_path: str, node: str, node_file: str | None, node_down: tuple[str, ...],
         as_json: bool) -> None:
    """High availability for a cluster of Linux machines, declared in TOML."""
    ctx.ensure_object(dict)
    ctx.obj.update(spec=spec_path, node=node, node_file=node_file, node_down=node_down,
                   given=set(given(ctx, "spec_path", "node")))
    sub = ctx.invoked_subcommand
    if sub != "run":  # only the agent keeps the signals that came early (see EARLY_SIGNALS)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in EARLY_SIGNALS:
            signal.raise_signal(signum)
    if sub is not None:
        if dry_run:
            ctx.fail(f"--dry-run is not an option of `{sub}`: use `reconcile --dry-run` or `reconcile run --dry-run`")
        if as_json:
            ctx.fail(f"--json goes after the command: `reconcile {sub} --json`")
        unused = given(ctx, *sorted({"spec_path", "node", "node_file", "node_down"} - USES.get(sub, set())))
        if unused:
            ctx.fail(f"{', '.join(unused)}: not used by `{sub}`")
        return
    if not dry_run:
        if node_down or as_json:
            ctx.fail(f"{'--node-down' if node_down else '--json'} needs --dry-run")
        click.echo(ctx.get_help())
        return
    globals()["dry_run"](spec_path, node, node_down, as_json=as_json)


def own(ctx: click.Context, name: str, value):
    """A command's own --spec/--node, else the group's; both given and different is refused."""
    if value is None:
        return ctx.obj[name]
    if f"--{name}" in ctx.obj["given"] and ctx.obj[name] != value:
        ctx.fail(f"--{name} given twice ({ctx.obj[name]} and {value})")
    return value


@main.command(epilog=epilog("reconcile run --spec /etc/reconciler --node n1", "reconcile run --dry-run --json --node-down n2"))
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, help="this node's name", shell_complete=complete_node)
@click.option("--once", is_flag=True, help="converge once and exit, leaving processes running (no keeper: single node only)")
@click.option("--dry-run", "dry", is_flag=True, help="print the plan, execute nothing; exit 2 if anything would be done")
@click.option("--node-down", multiple=True, help="with --dry-run: plan as if this node had died (repeatable)",
              shell_complete=complete_node)
@click.option("--json", "as_json", is_flag=True, help="with --dry-run: the plan as JSON")
@click.option("--metrics-address", default="127.0.0.1:9735", show_default=True, help="HOST:PORT for /metrics; 'off' disables")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def run(ctx, spec_path, node, once, dry, node_down, as_json, metrics_address, log_format, verbose) -> None:
    """Run the agent in the foreground."""
    spec_path = own(ctx, "spec", spec_path)
    node = own(ctx, "node", node)  # (--node "" is refused below, not the hostname)
    node_down = ctx.obj["node_down"] + node_down
    if dry:
        agent_only = given(ctx, "once", "metrics_address", "log_format", "verbose")
        if agent_only:
            ctx.fail(f"{', '.join(agent_only)}: not used with --dry-run (nothing runs)")
        dry_run(spec_path, node, node_down, as_json=as_json)
    if node_down or as_json:
        ctx.fail(f"{'--node-down' if node_down else '--json'} needs --dry-run")
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

        a = agentmod.Agent(spec_path, node, once=once, metrics=metrics, notify=notify, early_signals=EARLY_SIGNALS,
                           node_file=ctx.obj.get("node_file"))
        code = asyncio.run(a.run())
        logging.getLogger("reconciler").debug("event loop closed")
        if server is not None:
            server.shutdown()
        sys.exit(code)
    except (specmod.SpecError, agentmod.AlreadyRunning, agentmod.StateUnwritable, agentmod.PeerError, StoreRefused) as exc:
        fail(str(exc))


@main.command(epilog=epilog("reconcile check --spec /etc/reconciler", "reconcile check --json | jq '.groups[].worst_failover'"))
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (the same facts)")
@click.pass_context
def check(ctx, spec_path, as_json) -> None:
    """Validate the spec and summarise it, with each group's worst-case failover time."""
    spec_path = own(ctx, "spec", spec_path)
    from reconciler.spec import summary

    doc = summary.summary(spec_to_use(spec_path, explicit=spec_explicit(ctx)), spec_path)
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else "\n".join(summary.render(doc)))
    for w in doc["warnings"]:
        click.echo(f"reconcile: warning: {w}", err=True)
    for p in doc["problems"]:
        click.echo(f"reconcile: {p}", err=True)
    sys.exit(1 if doc["problems"] else 0)


@main.command(name="import", epilog=epilog("reconcile import /etc/mosix/cltab /etc/mosix/hactl > /etc/reconciler/cluster.toml"))
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


# The cluster spec's commands (tell, apply, diff, history, rollback) live in a module of their
# own; importing it adds them to `main`.
from reconciler.cli import clusterspec as _clusterspec  # noqa: E402,F401
from reconciler.cli import history as _history  # noqa: E402,F401 (`reconcile events`)
# The operator's intent commands (move, standby, unstandby, maintenance): cli/operator.py.
from reconciler.cli import operator as _operator  # noqa: E402,F401
# What shows the cluster and its entries (status, status --watch, logs): cli/views.py.
from reconciler.cli import views as _views  # noqa: E402,F401
