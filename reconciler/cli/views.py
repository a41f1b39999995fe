"""What shows the cluster and its entries: `reconcile status` (with --check and --watch) and
`reconcile logs`. Each turns argv into calls of agent/overview.py, agent/status.py and
act/logs.py."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click

from reconciler import spec as specmod
from reconciler.cli import SPEC_HELP, complete_entry, complete_node, epilog, fail, given, load_or_fail, main, own

STATUS_NOT_AS_DESIRED = 3  # `status --check`: something is not as desired


@main.command(epilog=epilog("reconcile status", "reconcile status --check --json > status.json || alert \"cluster: $?\""))
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, hidden=True, help="ignored: liveness is judged from the store (kept for scripts)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (the same facts)")
@click.option("--check", is_flag=True, help=f"exit {STATUS_NOT_AS_DESIRED} if anything is not as desired (for scripts and monitoring)")
@click.option("-w", "--watch", is_flag=True, help="show it again every --interval, in place on a terminal (Ctrl-C ends: exit 0)")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="seconds between two --watch refreshes")
@click.pass_context
def status(ctx, spec_path, node, as_json, check, watch, interval) -> None:
    """Show every node and every group: liveness, owner, runlevels, state, entries, failed
    tests, and a summary line.

    A node is live if its heartbeat counter moves while status looks (a heartbeat or so; up
    to dead_after while one stands still), as the agents judge it: any machine that reaches
    the store can run this, member or not. A group is running, starting, stopping,
    degraded (an entry crash-loops or is in error), failed (its tests failed on its owner or
    on every live node that may run it), stopped, unowned (desired to run, but no live node
    holds it) or unknown.

    With --check it exits 3 when a node is not live or a group is not in its desired state
    (degraded, failed, unowned, starting, stopping ...), naming each on stderr.

    With --watch it looks again every --interval seconds, refreshing the screen in place on
    a terminal (plain repeated output otherwise); an error is shown in place of the status
    and the watch goes on.
    """
    if watch:
        if check or as_json:
            ctx.fail(f"{'--check' if check else '--json'} is not used with --watch")
        from reconciler.cli import history

        history.watch(lambda: status_text(ctx, spec_path), interval=interval)
    if not watch and given(ctx, "interval"):
        ctx.fail("--interval needs --watch")
    status_once(ctx, spec_path, as_json=as_json, check=check)


def status_text(ctx: click.Context, spec_path: str | None) -> str:
    """What `reconcile status` prints (for --watch): its text, or its error line."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status_once(ctx, spec_path, as_json=False, check=False)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    text = out.getvalue() + err.getvalue()
    return text if code == 0 or text else text + f"reconcile: status failed (exit {code})\n"


def status_once(ctx: click.Context, spec_path: str | None, *, as_json: bool, check: bool) -> None:
    """One `reconcile status` (exits only on an error or with --check's finding)."""
    import time

    import attrs

    from reconciler.agent import overview
    from reconciler.agent import status as statusmod
    from reconciler.cluster import survey
    from reconciler.store import StoreError

    from reconciler.spec import loader

    from reconciler.agent import clusterspec

    path = own(ctx, "spec", spec_path)
    spec_error = None
    local_error = None  # this machine's spec files do not load (the cluster spec may)
    node_file = ctx.obj.get("node_file")
    try:
        spec = loader.load(path, node_file=node_file)
    except specmod.SpecError as exc:
        # The agents keep running their last good spec: still show what they publish.
        spec_error = local_error = str(exc)
        try:
            spec = loader.peek(path, node_file=node_file)
        except specmod.SpecError:
            fail(spec_error)
    try:
        # The desired state is the cluster spec's (the store's current revision), where there is one.
        rev = asyncio.run(survey.current_revision(spec))
        if rev is not None:
            try:
                spec = clusterspec.load_revision(rev, spec_path=path, local=loader.local_settings(path, node_file=node_file))
                spec_error = None
            except specmod.SpecError as exc:
                spec_error = f"the store's revision {rev.number} does not load here: {exc}"
        look = asyncio.run(survey.look_at(spec))
    except StoreError as exc:
        # After a bad edit the store's address may be a guess: the spec error comes first.
        fail(f"{spec_error} (and the store: {exc})" if spec_error is not None else str(exc))
    doc = statusmod.cluster_status(spec, look, now=time.time(), published_groups=spec_error is not None)
    if spec_error is not None:
        doc = attrs.evolve(doc, spec_error=spec_error)
    click.echo(json.dumps(overview.to_json(doc), indent=2, sort_keys=True) if as_json else overview.render(doc, now=time.time()))
    if spec_error is not None:
        fail(f"{spec_error} (shown: what the nodes publish; they keep their last good spec)")
    if local_error is not None:  # shown: the cluster spec; this machine's files hold a refused edit
        click.echo(f"reconcile: warning: {local_error} (not the cluster's: it runs revision {rev.number if rev else '?'})",
                   err=True)
    if check and doc.problems:
        for p in doc.problems:
            click.echo(f"reconcile: {p}", err=True)
        sys.exit(STATUS_NOT_AS_DESIRED)


@main.command(epilog=epilog("reconcile logs web/httpd -n 50", "reconcile logs web/httpd -f"))
@click.argument("entry", metavar="GROUP/TAG", shell_complete=complete_entry)
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None, help="only the last N lines [default: all]")
@click.option("-f", "--follow", is_flag=True, help="keep printing lines as they are written, across rotations")
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, help="whose logs (this machine's state directory)", shell_complete=complete_node)
@click.pass_context
def logs(ctx, entry, lines, follow, spec_path, node) -> None:
    """Show an entry's output (stdout and stderr), oldest first, across its rotated copies.

    Each line carries the time it was written by (the agent's index of the log's growth: at
    most a tick late while an agent runs); a segment is headed by the time it was last
    written. With -f, each new line carries the time it was seen (within 0.2s).
    """
    from reconciler.act import logs as logsmod

    group, sep, tag = entry.partition("/")
    if not (sep and group and tag):
        ctx.fail(f"{entry!r}: expected GROUP/TAG")
    spec_path, node = own(ctx, "spec", spec_path), own(ctx, "node", node)
    spec = load_or_fail(spec_path)
    g = spec.groups.get(group)
    if g is None or tag not in {e.tag for e in g.entries}:
        known = ", ".join(f"{x.name}/{e.tag}" for x in spec.groups.values() for e in x.entries) or "none"
        fail(f"{spec_path}: no entry {entry} (known: {known})")
    path = Path(spec.state_dir) / node / "logs" / f"{group}.{tag}.log"
    segments = logsmod.tail(path, lines)
    if not segments and not follow and not path.parent.is_dir():
        fail(f"{path.parent}: no logs here (is {node} the node that ran {entry}? --node names another)")
    for seg in segments:
        click.echo(f"-- {seg.path.name}: last written {stamp(seg.mtime)} --")
        for t, line in zip(seg.times, seg.lines):
            click.echo(f"{stamp(t)} {line}")
    if follow:
        follower = logsmod.Follower(path)
        try:
            while True:
                for line in follower.poll():
                    click.echo(f"{stamp(time.time())} {line}")
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
