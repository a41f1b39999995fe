"""What the operator's intent commands do (`reconcile move`, `standby`, `unstandby`,
`maintenance`), and `--wait`: each looks at the cluster as `reconcile status` does, checks
with the pure core (decide/intents.py), and records or removes one intent in the store
through `set_intent` / `end_intent` (the one place an intent is written: an event log can
note it there). The agents do the rest; `wait` polls the store until what they publish
shows it done.

Each raises OpError (one line for stderr) for what it refuses.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable

import attrs

from reconciler import spec as specmod
from reconciler.agent import clusterspec
from reconciler.agent.dryrun import cluster_view
from reconciler.agent.specops import OpError
from reconciler.cluster import survey
from reconciler.decide import intents as rules
from reconciler.decide import simulate as simulation
from reconciler.published import Event, Intent
from reconciler.spec import loader
from reconciler.store import Store, StoreError

POLL = 0.1  # seconds between reads while waiting
NOTHING = "nothing: every node would go on as it is"  # transition()'s one line when nothing would change
LOOKER = "-look"  # the view's own node name while looking from outside: never a member (not a valid name)


class UsageError(OpError):
    """A name that is not there (an unknown node or group): the command exits 2."""


def load_spec(path: str, *, node_file: str | None) -> specmod.Spec:
    """The cluster's spec: the store's current revision where there is one, else the local files."""
    try:
        spec = loader.load(path, node_file=node_file)
    except specmod.SpecError as exc:
        raise OpError(str(exc)) from None
    rev = asyncio.run(survey.current_revision(spec))
    if rev is None:
        return spec
    try:
        return clusterspec.load_revision(rev, spec_path=path, local=loader.local_settings(path, node_file=node_file))
    except specmod.SpecError as exc:
        raise OpError(f"the store's revision {rev.number} does not load here: {exc}") from None


def new_intent(kind: str, *, group: str = "", node: str = "", target: str = "", timeout: float | None = None) -> Intent:
    created = time.time()
    return Intent(kind=kind, id=secrets.token_hex(8), group=group, node=node, target=target, created=round(created, 3),
                  expires=round(created + timeout, 3) if timeout is not None else None, who=clusterspec.cli_author())


async def set_intent(store: Store, intent: Intent) -> Intent:
    """Record `intent` (replacing any at its key): every intent command writes through here,
    and tells the cluster's history."""
    stored = await store.intent_put(intent)
    await _tell(store, intent, _said(intent, on=True))
    return stored


async def end_intent(store: Store, intent: Intent) -> bool:
    """Remove this very intent instance (unstandby, maintenance off): True if this call did."""
    ended = await store.intent_delete(intent.key, token=intent.id)
    if ended:
        await _tell(store, intent, _said(intent, on=False))
    return ended


def _said(intent: Intent, *, on: bool) -> str:
    if intent.kind == "move":
        return f"move to {intent.target} asked"
    if intent.kind == "standby":
        return f"{intent.node}: standby {'on' if on else 'off'}"
    scope = f"group {intent.group}" if intent.group else f"node {intent.node}'s groups" if intent.node else "the whole cluster"
    return f"maintenance {'on' if on else 'off'} for {scope}"


async def _tell(store: Store, intent: Intent, reason: str) -> None:
    """The history's line for an operator's change (by `who`): a store that lost it after the
    intent itself was written costs the line, never the intent (a warning on stderr)."""
    event = Event(wall=time.time(), node=intent.who, kind=intent.kind, group=intent.group, reason=reason)
    try:
        await store.events_append([event])
    except StoreError as exc:
        print(f"reconcile: warning: the history did not take this change: {exc}", file=sys.stderr)


def _with_store(spec: specmod.Spec, op):
    async def go():
        store = survey.open_spec_store(spec)
        try:
            return await op(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        raise OpError(str(exc)) from None


def _record(spec: specmod.Spec, intent: Intent, dry_run: bool) -> Intent:
    return intent if dry_run else _with_store(spec, lambda store: set_intent(store, intent))


def _end(spec: specmod.Spec, intent: Intent, dry_run: bool) -> None:
    if not dry_run:
        _with_store(spec, lambda store: end_intent(store, intent))


def transition(spec: specmod.Spec, *, put: Intent | None = None, removed: Intent | None = None) -> list[str]:
    """What the cluster would do with `put` recorded (or `removed` gone): the whole transition
    (decide/simulate.py), as `--dry-run` prints it, from the cluster as it stands."""
    from reconciler.agent import dryrun

    async def go() -> list[str]:
        cluster, now = await dryrun.start_state(spec, LOOKER, member_only=True)
        if not cluster.observed:
            return ["no agent runs: nothing happens until one starts"]
        intents = dict(cluster.intents)
        if put is not None:
            intents[put.key] = put
        if removed is not None:
            intents.pop(removed.key, None)
        doc = dryrun.transition_doc(simulation.simulate(spec, attrs.evolve(cluster, intents=intents), now), LOOKER)
        return [NOTHING] if doc["converged"] else dryrun.render_transition(doc)

    try:
        return asyncio.run(go())
    except StoreError as exc:
        raise OpError(str(exc)) from None


def _known_node(spec: specmod.Spec, view_members, node: str) -> None:
    named = {n for g in spec.groups.values() for n in g.nodes}
    if node not in view_members and node not in named:
        raise UsageError(f"no node {node!r} in the cluster (members: {', '.join(sorted(view_members)) or 'none'})")


def move(spec: specmod.Spec, group: str, node: str | None, *, timeout: float, dry_run: bool = False) -> Intent:
    """Check that `group` may move (to `node`, or the best eligible node) and record the move
    (`dry_run`: only return it)."""
    if group not in spec.groups:
        raise UsageError(f"no group {group!r} in the spec (known: {', '.join(spec.groups) or 'none'})")
    view = asyncio.run(cluster_view(spec, LOOKER, ()))
    if node is not None:
        _known_node(spec, view.members, node)
    target, why = rules.move_target(spec, view, group, node, time.monotonic())
    if not target:
        raise OpError(f"move {group}: refused: {why}")
    return _record(spec, new_intent("move", group=group, target=target, timeout=timeout), dry_run)


def standby(spec: specmod.Spec, node: str, *, on: bool, dry_run: bool = False) -> tuple[Intent | None, str]:
    """Put `node` in standby (on) or take it out: (the intent written or removed, one line)."""
    view = asyncio.run(cluster_view(spec, LOOKER, ()))
    _known_node(spec, view.members, node)
    current = view.intents.get(f"standby/{node}")
    if on:
        if current is not None:
            return current, f"{node} is already in standby"
        return _record(spec, new_intent("standby", node=node), dry_run), f"{node}: standby"
    if current is None:
        return None, f"{node} is not in standby"
    _end(spec, current, dry_run)
    return current, f"{node}: out of standby"


def maintenance(spec: specmod.Spec, *, on: bool, group: str = "", node: str = "",
                dry_run: bool = False) -> tuple[Intent | None, str]:
    """Start or end maintenance of the whole cluster, a group or a node's groups."""
    if group and group not in spec.groups:
        raise UsageError(f"no group {group!r} in the spec (known: {', '.join(spec.groups) or 'none'})")
    view = asyncio.run(cluster_view(spec, LOOKER, ()))
    if node:
        _known_node(spec, view.members, node)
    want = Intent(kind="maintenance", id="0", group=group, node=node)
    scope = f"group {group}" if group else f"node {node}" if node else "the cluster"
    current = view.intents.get(want.key)
    if on:
        if current is not None:
            return current, f"{scope} is already in maintenance"
        made = _record(spec, new_intent("maintenance", group=group, node=node), dry_run)
        return made, f"maintenance on: {scope} (agents observe and report, and change nothing)"
    if current is None:
        return None, f"{scope} is not in maintenance"
    _end(spec, current, dry_run)
    return current, f"maintenance off: {scope}"


# --- --wait ------------------------------------------------------------------------------------


async def _wait(store: Store, spec: specmod.Spec, ask: Callable[..., rules.Pending], *, timeout: float,
                progress: Callable[[str], None]) -> rules.Pending:
    t = spec.cluster.timing
    look = await survey.look(store, heartbeat=t.heartbeat, dead_after=t.dead_after)
    now = time.monotonic()
    # A member is alive while its counter moves (timed on this clock, as the agents do).
    seen = {n: (hb.counter, now if n in look.advanced else now - look.silent.get(n, 0.0))
            for n, hb in look.snapshot.members.items()}
    deadline = now + timeout
    snap = look.snapshot
    while True:
        now = time.monotonic()
        for n, hb in snap.members.items():
            if n not in seen or seen[n][0] != hb.counter:
                seen[n] = (hb.counter, now)
        alive = [n for n, (_, at) in seen.items() if now - at < t.dead_after]
        result = ask(snap.members, snap.claims, snap.intents, alive)
        if result.done or result.failed or now >= deadline:
            return result
        progress(result.waiting[0] if len(result.waiting) == 1 else f"{result.waiting[0]} (and {len(result.waiting) - 1} more)")
        await asyncio.sleep(POLL)
        snap = await store.read()


def wait(spec: specmod.Spec, what: str, *, timeout: float, progress: Callable[[str], None], subject: str = "",
         revision: int = 0, target: str = "", intent_id: str = "") -> rules.Pending:
    """Poll the store until `what` (decide/intents.pending) is done, failed, or `timeout` passed."""

    def ask(members, claims, intents, alive) -> rules.Pending:
        return rules.pending(spec, members, claims, intents, alive=alive, what=what, subject=subject, revision=revision,
                             target=target, intent_id=intent_id)

    return _with_store(spec, lambda store: _wait(store, spec, ask, timeout=timeout, progress=progress))


def with_revision(spec: specmod.Spec, path: str, *, node_file: str | None) -> tuple[specmod.Spec, int]:
    """(the cluster's spec as now current in the store, its revision number) for tell/apply --wait."""
    rev = asyncio.run(survey.current_revision(spec))
    if rev is None:
        return spec, 0
    try:
        return clusterspec.load_revision(rev, spec_path=path, local=loader.local_settings(path, node_file=node_file)), rev.number
    except specmod.SpecError as exc:
        raise OpError(f"the store's revision {rev.number} does not load here: {exc}") from None


__all__ = ["OpError", "UsageError", "end_intent", "load_spec", "maintenance", "move", "new_intent", "set_intent",
           "standby", "wait", "with_revision"]
