"""The operator's commands: the intents `reconcile move`, `standby`, `unstandby`,
`maintenance`, each with `--wait [--timeout D]` and `--dry-run`; `clear` (a node's ban) and
`forget` (a decommissioned node's record). Each turns argv into calls of
reconciler/agent/intentops.py (clear: agent/clearing.py).

Exit codes: 0 done (recorded; with --wait: converged), 1 refused, a store error or --wait
timed out (one line saying what is still pending), 2 a name that is not there.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from reconciler.cli import SPEC_HELP, USES, complete_group, complete_node, epilog, fail, load_or_fail, main, own

# The group options each command reads (`reconcile --node n1 move ...` is refused: a move names no node of its own).
USES.update({name: {"spec_path", "node_file"} for name in ("move", "standby", "unstandby", "maintenance")})
WAIT_HELP = "wait until the agents show it done (exit 1 if not within --timeout)"


def _spec(ctx: click.Context, spec_path: str | None):
    from reconciler.agent import intentops

    path = own(ctx, "spec", spec_path)
    try:
        return intentops.load_spec(path, node_file=ctx.obj.get("node_file"))
    except intentops.OpError as exc:
        fail(str(exc))


def _failed(exc: Exception) -> NoReturn:
    from reconciler.agent import intentops

    fail(str(exc), 2 if isinstance(exc, intentops.UsageError) else 1)


def wait_for(spec, what: str, *, timeout: float, **subject) -> None:
    """`--wait`: a one-line live progress on a terminal (cleared at the end); exit 1 with what
    is still pending if it does not happen within `timeout`."""
    from reconciler.agent import intentops

    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        if tty:
            click.echo(f"\r\033[Kwaiting: {line}"[:200], nl=False, err=True)

    try:
        result = intentops.wait(spec, what, timeout=timeout, progress=progress, **subject)
    except intentops.OpError as exc:
        fail(str(exc))
    finally:
        if tty:
            click.echo("\r\033[K", nl=False, err=True)
    if result.failed:
        fail(result.failed)
    if result.waiting:
        more = f" (and {len(result.waiting) - 1} more)" if len(result.waiting) > 1 else ""
        fail(f"not done within {timeout:g}s: {result.waiting[0]}{more}")


DRY_HELP = "show the whole transition it would cause (every node's steps), and record nothing"


def _not_both(ctx: click.Context, dry: bool, wait: bool, as_json: bool) -> None:
    if dry and (wait or as_json):
        ctx.fail(f"--dry-run records nothing: {'--wait' if wait else '--json'} does not apply")


def _dry(spec, line: str, **change) -> NoReturn:
    """--dry-run: what the change would do, then exit 0 (nothing would happen) or 2 (steps
    pending), as `reconcile --dry-run` exits."""
    from reconciler.agent import intentops

    try:
        lines = intentops.transition(spec, **change)
    except intentops.OpError as exc:
        fail(str(exc))
    click.echo(f"{line} (dry run: nothing recorded); the cluster would then (every node's steps, each taken as succeeding):")
    for text in lines:
        click.echo(f"  {text}")
    sys.exit(0 if lines == [intentops.NOTHING] else 2)


def _report(intent, line: str, as_json: bool) -> None:
    if as_json:
        from reconciler.published import intent_doc

        click.echo(json.dumps({"message": line, "intent": intent_doc(intent) if intent is not None else None},
                              sort_keys=True))
    else:
        click.echo(line)


@main.command(epilog=epilog("reconcile move web n2 --wait", "reconcile move web --timeout 120"))
@click.argument("group", shell_complete=complete_group)
@click.argument("node", required=False, shell_complete=complete_node)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="seconds the move may take; with --wait, also how long to wait")
@click.option("--wait", "wait", is_flag=True, help=WAIT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the intent recorded as JSON")
@click.option("--dry-run", "dry", is_flag=True, help=DRY_HELP)
@click.pass_context
def move(ctx, group, node, spec_path, timeout, wait, as_json, dry) -> None:
    """Move GROUP to NODE (default: the best eligible node by placement order): its owner stops
    it, hands its claim straight to NODE, and NODE starts it at once. Refused up front, with
    the reason, if NODE may not run it (not in `nodes`, tests failed there, standby, banned,
    not alive, already there; with failback = true, a node less preferred than the one
    failback would take it back to). Not done within --timeout: it stays (or starts again)
    where it was."""
    from reconciler.agent import intentops

    _not_both(ctx, dry, wait, as_json)
    spec = _spec(ctx, spec_path)
    try:
        intent = intentops.move(spec, group, node, timeout=timeout, dry_run=dry)
    except intentops.OpError as exc:
        _failed(exc)
    if dry:
        _dry(spec, f"{group}: would move to {intent.target}", put=intent)
    _report(intent, f"{group}: moving to {intent.target}", as_json)
    if wait:
        wait_for(spec, "move", timeout=timeout, subject=group, target=intent.target, intent_id=intent.id)
        click.echo(f"{group}: runs on {intent.target}")


def _standby(ctx, node, spec_path, wait, timeout, as_json, on: bool, dry: bool = False) -> None:
    from reconciler.agent import intentops

    _not_both(ctx, dry, wait, as_json)
    spec = _spec(ctx, spec_path)
    try:
        intent, line = intentops.standby(spec, node, on=on, dry_run=dry)
    except intentops.OpError as exc:
        _failed(exc)
    if dry:
        _dry(spec, line, put=intent if on else None, removed=intent if not on else None)
    _report(intent, line, as_json)
    if wait:
        wait_for(spec, "standby", timeout=timeout, subject=node)
        click.echo(f"{node}: owns nothing")


@main.command(epilog=epilog("reconcile standby n1 --wait", "reconcile unstandby n1"))
@click.argument("node", shell_complete=complete_node)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--wait", "wait", is_flag=True, help=WAIT_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True, help="seconds --wait waits")
@click.option("--json", "as_json", is_flag=True, help="print the intent as JSON")
@click.option("--dry-run", "dry", is_flag=True, help=DRY_HELP)
@click.pass_context
def standby(ctx, node, spec_path, wait, timeout, as_json, dry) -> None:
    """Put NODE in standby: it claims nothing, ranks for nothing, and hands each group it owns
    to another eligible node, one at a time; it stays a member and keeps running its tests.
    Kept in the store (it survives agent restarts) until `reconcile unstandby NODE`."""
    _standby(ctx, node, spec_path, wait, timeout, as_json, True, dry)


@main.command(epilog=epilog("reconcile unstandby n1"))
@click.argument("node", shell_complete=complete_node)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the intent removed as JSON")
@click.option("--dry-run", "dry", is_flag=True, help=DRY_HELP)
@click.pass_context
def unstandby(ctx, node, spec_path, as_json, dry) -> None:
    """Take NODE out of standby: it claims and ranks again (failback = true groups come back)."""
    _standby(ctx, node, spec_path, False, 0.0, as_json, False, dry)


@main.command(epilog=epilog("reconcile maintenance on --group web", "reconcile maintenance off --wait"))
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--group", default="", help="only this group", shell_complete=complete_group)
@click.option("--node", default="", help="only the groups this node owns (and the node itself)", shell_complete=complete_node)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--wait", "wait", is_flag=True, help="off: wait until every owner acknowledged the end and converged")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="seconds --wait waits")
@click.option("--json", "as_json", is_flag=True, help="print the intent as JSON")
@click.option("--dry-run", "dry", is_flag=True, help=DRY_HELP)
@click.pass_context
def maintenance(ctx, state, group, node, spec_path, wait, timeout, as_json, dry) -> None:
    """Maintenance on|off for the whole cluster, one --group, or the groups one --node owns: in
    scope the agents observe and report but change nothing (no start, stop, respawn, claim,
    takeover, fence or release; a spec edit waits), and no peer takes such a group over.
    `off` adopts what runs and changes only what differs."""
    from reconciler.agent import intentops

    if group and node:
        ctx.fail("--group or --node, not both")
    if wait and state == "on":
        ctx.fail("--wait waits for the end of maintenance: with `off` only (`on` takes effect at the agents' next read)")
    _not_both(ctx, dry, wait, as_json)
    spec = _spec(ctx, spec_path)
    try:
        intent, line = intentops.maintenance(spec, on=state == "on", group=group, node=node, dry_run=dry)
    except intentops.OpError as exc:
        _failed(exc)
    if dry:
        _dry(spec, line, put=intent if state == "on" else None, removed=intent if state == "off" else None)
    _report(intent, line, as_json)
    if wait and state == "off":
        wait_for(spec, "maintenance-off", timeout=timeout)
        click.echo("every owner acknowledged the end of maintenance and converged")


@main.command(epilog=epilog("reconcile clear web", "reconcile clear web --node n2 --timeout 30"))
@click.argument("group", shell_complete=complete_group)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--node", default=None, help="the node to clear (its state directory on this machine)", shell_complete=complete_node)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds to wait for the node to show it")
@click.pass_context
def clear(ctx, group, spec_path, node, timeout) -> None:
    """Lift the node's ban from GROUP and reset GROUP's failure count there (docs/spec.md,
    "Health"). The node's agent applies it on its next pass; exit 1 if it does not show it
    in time."""
    from reconciler.agent import clearing

    spec_path, node = own(ctx, "spec", spec_path), own(ctx, "node", node)
    spec = load_or_fail(spec_path)
    if group not in spec.groups:
        fail(f"{spec_path}: no group {group!r} (known: {', '.join(spec.groups) or 'none'})")
    try:
        rid = clearing.request(spec, node, group)
    except OSError as exc:
        fail(str(exc) if not exc.strerror else f"{exc.filename}: {exc.strerror}")
    if not asyncio.run(clearing.wait(spec, node, group, rid, timeout)):
        fail(f"{group}: {node} has not shown the clear within {timeout:g}s (is its agent running? the request stays"
             f" in {Path(spec.state_dir) / node / 'clear'} for its next pass)")
    click.echo(f"{group}: failures and ban cleared on {node}")


@main.command(epilog=epilog("reconcile forget n4"))
@click.argument("member", shell_complete=complete_node)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def forget(ctx, member, spec_path) -> None:
    """Remove a decommissioned node's record from the store, so that the failsafe no longer
    needs its promise (docs/operations.md, "Store outages"). Refused (exit 1) while the node
    is alive or holds a claim; exit 2 if the store has no such node."""
    from reconciler.cluster import survey
    from reconciler.store import StoreError

    spec = load_or_fail(own(ctx, "spec", spec_path))
    try:
        look = asyncio.run(survey.look_at(spec))
    except StoreError as exc:
        fail(str(exc))
    members = look.snapshot.members
    if member not in members:
        fail(f"{member}: no such node in the store (known: {', '.join(sorted(members)) or 'none'})", code=2)
    if member in look.advanced:
        fail(f"{member}: alive (its heartbeat advances): stop its agent first")
    owned = sorted(g for g, c in look.snapshot.claims.items() if c.node == member)
    if owned:
        fail(f"{member}: holds the claims of {', '.join(owned)}: they must move first")

    async def remove() -> bool:
        store = survey.open_spec_store(spec)
        try:
            return await store.forget(member)
        finally:
            await store.close()

    try:
        removed = asyncio.run(remove())
    except StoreError as exc:
        fail(str(exc))
    click.echo(f"{member}: forgotten (its record is removed from the store)" if removed else f"{member}: already gone")
