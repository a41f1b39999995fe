"""`reconcile events`: the cluster's history (agent/eventlog.py), from any machine that has
a node file or a spec naming the store (as the cluster spec's commands)."""

from __future__ import annotations

import asyncio
import sys
import time

import click

from reconciler.cli import SPEC_HELP, complete_group, complete_node, epilog, fail, main, own
from reconciler.cli.clusterspec import local_or_fail


@main.command(epilog=epilog("reconcile events --since 1h", "reconcile events --group web --follow",
                            "reconcile events --node n2 --json | jq -r .reason"))
@click.option("--group", default=None, help="only this group's events", shell_complete=complete_group)
@click.option("--node", "of_node", default=None, help="only the events this node told", shell_complete=complete_node)
@click.option("--since", default=None, help="only events of the last DURATION (30s, 10m, 2h, 1d)")
@click.option("-f", "--follow", is_flag=True, help="then keep printing new events as they happen (Ctrl-C ends)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event and line")
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def events(ctx, group, of_node, since, follow, as_json, spec_path) -> None:
    """Show the cluster's history, oldest first: claims, releases, takeovers with their
    phases (detect, fence, claim, start), fence runs and results, spec revisions, failed
    tests and starts, give-ups and bans; each with its local time, node, group and reason.
    The store keeps the newest 10,000 events of the last 7 days."""
    from reconciler.agent import eventlog
    from reconciler.cluster import survey
    from reconciler.store import StoreError

    spec_path = own(ctx, "spec", spec_path)
    try:
        keep = eventlog.Filter(group=group, node=of_node,
                               since=time.time() - eventlog.parse_since(since) if since is not None else None)
    except ValueError as exc:
        ctx.fail(str(exc))
    spec, _local = local_or_fail(spec_path)
    show = eventlog.doc if as_json else eventlog.line

    async def go() -> None:
        while survey.never_set_up(spec):  # no agent has set the store up yet: no history
            if not follow:
                return
            await asyncio.sleep(eventlog.FOLLOW_POLL)
        store = survey.open_spec_store(spec)
        try:
            shown, after = await eventlog.read(store, keep)
            for ev in shown:
                click.echo(show(ev))
            if follow:
                async for ev in eventlog.follow(store, keep, after):
                    click.echo(show(ev))
        finally:
            await store.close()

    try:
        asyncio.run(go())
    except StoreError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


def watch(render, *, interval: float) -> None:
    """`status --watch`: print render() every `interval` seconds, in place on a terminal
    (home + clear, then the text), else one after the other under a line with the time;
    Ctrl-C exits 0."""
    tty = sys.stdout.isatty()
    try:
        while True:
            started = time.monotonic()
            text = render()
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            if tty:
                sys.stdout.write(f"{CLEAR}every {interval:g}s: reconcile status    {when}\n\n{text}")
            else:
                sys.stdout.write(f"--- {when}\n{text}")
            sys.stdout.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
        sys.exit(0)
