"""Where each group should run: pure functions over the spec, Observed and ClusterView.

Every node evaluates the same rules on (nearly) the same view, so they agree without a
leader; where views differ for a moment, the store's atomic claim picks one winner.
"""

from __future__ import annotations

import hashlib

from reconciler import spec as specmod
from reconciler.model import ClusterView, Observed


def leading_tests(g: specmod.Group, level: str) -> tuple[specmod.Entry, ...]:
    """The test entries that come before every other entry active at `level`.

    They prove a node's fitness for the group before it owns it: standby nodes run them
    periodically so that eligibility is current when a takeover is needed.
    """
    out = []
    for e in g.entries:
        if not e.active_at(level):
            continue
        if e.kind == "process" and e.mode == "test":
            out.append(e)
        else:
            break
    return tuple(out)


def local_eligibility(g: specmod.Group, observed: Observed) -> bool | None:
    """True when every leading test passed here, False when one failed, None if not yet run."""
    result: bool | None = True
    entries = observed.entries
    for e in leading_tests(g, g.runlevel):
        rec = entries.get((g.name, e.tag))  # as observed.get(), without building the default
        st = rec.state if rec is not None else "stopped"
        if st == "failed":
            return False
        if st != "passed":
            result = None
    return result


def allowed(g: specmod.Group, node: str) -> bool:
    return not g.nodes or node in g.nodes


def rank_key(g: specmod.Group, node: str) -> tuple[int, str]:
    """Preference order: the group's `nodes` list first, then rendezvous hashing.

    Rendezvous hashing spreads groups over nodes evenly and moves few groups when
    membership changes; every node computes the same order.
    """
    if g.nodes and node in g.nodes:
        return (g.nodes.index(node), "")
    return (len(g.nodes), hashlib.sha1(f"{g.name}/{node}".encode()).hexdigest())


def peer_eligibility(g: specmod.Group, view: ClusterView, node: str) -> bool | None:
    m = view.members.get(node)
    if m is None or m.heartbeat is None:
        return None
    info = m.heartbeat.status.get("groups", {}).get(g.name)
    if not isinstance(info, dict):
        return None
    e = info.get("eligible")
    return e if isinstance(e, bool) else None


def candidates(
    g: specmod.Group,
    observed: Observed,
    view: ClusterView,
    now: float,
    dead_after: float,
    exclude: str = "",
    unseen_rank: bool = False,
) -> list[str]:
    """Live, allowed nodes for `g` not known to be unfit, best first.

    A peer whose tests have not reported yet still ranks: it may pass in a moment, and a
    node further down must not grab the group just because it answered first. If it never
    reports, `my_turn` lets the next candidate act after a delay.
    """
    names = set(view.members) | {view.node}
    out = []
    if unseen_rank:
        # A preferred node this one has never heard from may just be starting: it ranks,
        # so a less preferred node waits (my_turn) instead of grabbing the group first.
        out.extend(n for n in g.nodes if n not in names and n != exclude)
    for n in names:
        if n == exclude or not allowed(g, n) or not view.alive(n, now, dead_after):
            continue
        ok = local_eligibility(g, observed) if n == view.node else peer_eligibility(g, view, n)
        if ok is not False:
            out.append(n)
    return sorted(out, key=lambda n: rank_key(g, n))


def my_turn(rank: int, waited: float, dead_after: float) -> bool:
    """The best candidate acts at once; the k-th only after k x dead_after of nobody acting.

    That keeps a group from being stranded when the best candidate's agent is alive but
    not acting, without letting candidates race in the normal case.
    """
    return rank == 0 or waited >= rank * dead_after


def running_elsewhere(g: specmod.Group, view: ClusterView, now: float, dead_after: float) -> list[str]:
    """Live peers that report the group's entries running there (claim or not).

    Nobody claims such a group: whatever made its claim disappear, the node running it
    either claims it back or stops it first.
    """
    out = []
    for n, m in view.members.items():
        if n == view.node or m.heartbeat is None or not view.alive(n, now, dead_after):
            continue
        info = m.heartbeat.status.get("groups", {}).get(g.name)
        if isinstance(info, dict) and info.get("active"):
            out.append(n)
    return sorted(out)
