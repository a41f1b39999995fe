"""Where each group should run: pure functions over the spec, Observed and ClusterView.

Every node evaluates the same rules on (nearly) the same view, so they agree without a
leader; where views differ for a moment, the store's atomic claim picks one winner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from reconciler import spec as specmod
from reconciler.model import ClusterView, Observed


# group name -> (the Group it was computed from, its leading tests at its runlevel, their
# tags). Specs are frozen: the answer stands while the very same Group object is asked again.
_LEADING: dict[str, tuple[specmod.Group, tuple[specmod.Entry, ...], frozenset[str]]] = {}


def leading_tests(g: specmod.Group, level: str) -> tuple[specmod.Entry, ...]:
    """The test entries that come before every other entry active at `level`.

    They prove a node's fitness for the group before it owns it: standby nodes run them
    periodically so that eligibility is current when a takeover is needed.
    """
    return _leading(g)[1] if level == g.runlevel else _leading_tests(g, level)


def leading_tags(g: specmod.Group) -> frozenset[str]:
    """The tags of leading_tests(g, g.runlevel)."""
    return _leading(g)[2]


def _leading(g: specmod.Group) -> tuple[specmod.Group, tuple[specmod.Entry, ...], frozenset[str]]:
    hit = _LEADING.get(g.name)
    if hit is None or hit[0] is not g:
        tests = _leading_tests(g, g.runlevel)
        hit = (g, tests, frozenset(e.tag for e in tests))
        if len(_LEADING) >= 65536:
            _LEADING.clear()
        _LEADING[g.name] = hit
    return hit


def _leading_tests(g: specmod.Group, level: str) -> tuple[specmod.Entry, ...]:
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
    for e in _leading(g)[1]:  # leading_tests(g, g.runlevel)
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
    return (len(g.nodes), _digest(g.name, node))


def _digest(group: str, node: str) -> str:
    """The rendezvous hash of (group, node): a node's rank among those outside `nodes`."""
    return hashlib.sha1(f"{group}/{node}".encode()).hexdigest()


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


# --- one view, every group: what plan() asks for each group, computed once ------------------
#
# `candidates` and `running_elsewhere` look at every member for every group they are asked
# about: with G unclaimed groups and M members a plan() call costs G x M SHA-1 hashes and
# status lookups (100,000 at 1,000 groups x 100 members: a cold start). A Roster answers the
# same questions for one (view, now, dead_after) from work done once per call (who is alive,
# which groups each live peer reports unfit or active) and from memos kept across calls:
# each group's rendezvous order over the live member set, and each peer's report summary.
# A memo holds only values that are functions of its key, so every answer equals what the
# functions above return (tests/test_placement_memo.py checks it) and plan() stays pure:
# the same inputs give the same Plan. Status documents are read-only, like all of a
# Snapshot (the directory store hands an unchanged one back as the same dict): a summary
# is reused while a peer publishes that very dict. Both memos are bounded.

_ORDER_SETS = 2  # member sets whose orders are kept: now and just before (a flapping member)
_ORDER_GROUPS = 1 << 16  # groups per member set; past that the set's orders start afresh
_REPORT_PEERS = 4096  # peer summaries kept; past that they start afresh


class _Ranking:
    """One group's members best first (a group without `nodes`), and where nodes stand."""

    __slots__ = ("order", "_at")

    def __init__(self, order: tuple[str, ...]):
        self.order = order
        self._at: dict[str, int] = {}  # node -> its index in order, -1 if absent (a few nodes)

    def index(self, node: str) -> int:
        at = self._at.get(node)
        if at is None:
            at = _index_of(node, self.order)
            if len(self._at) < 8:
                self._at[node] = at
        return at


# live member set -> {group name -> its ranking over that set}
_ORDERS: dict[frozenset[str], dict[str, _Ranking]] = {}
# peer -> (the status dict summarised, (groups it is unfit for, groups active there))
_REPORTS: dict[str, tuple[Any, tuple[tuple[str, ...], tuple[str, ...]]]] = {}


def _index_of(node: str, ranked: Sequence[str]) -> int:
    """ranked.index(node), or -1 if it is not there."""
    try:
        return ranked.index(node)
    except ValueError:
        return -1


def rendezvous_order(group: str, names: frozenset[str]) -> tuple[str, ...]:
    """`names` sorted by rank_key for a group without a `nodes` list (memoised)."""
    return _ranking(group, names, _rankings_for(names)).order


def _rankings_for(names: frozenset[str]) -> dict[str, _Ranking]:
    rankings = _ORDERS.pop(names, None)  # re-inserted below: the newest set is last
    if rankings is None:
        while len(_ORDERS) >= _ORDER_SETS:
            del _ORDERS[next(iter(_ORDERS))]
        rankings = {}
    _ORDERS[names] = rankings
    return rankings


def _ranking(group: str, names: frozenset[str], rankings: dict[str, _Ranking]) -> _Ranking:
    hit = rankings.get(group)
    if hit is not None:
        return hit
    order = None
    for other, theirs in reversed(list(_ORDERS.items())):  # the latest other set first
        old = theirs.get(group) if theirs is not rankings else None
        if old is not None:
            order = _derive(group, old.order, other, names)
            break
    if order is None:
        order = tuple(sorted(names, key=_sort_key(group)))
    if len(rankings) >= _ORDER_GROUPS:
        rankings.clear()
    hit = rankings[group] = _Ranking(order)
    return hit


def _sort_key(group: str) -> Callable[[str], bytes]:
    """A key that sorts nodes as _digest(group, node) does: the raw SHA-1 bytes, in the
    same order as their fixed-width hex, without hashing the group's prefix every time."""
    prefix = hashlib.sha1(f"{group}/".encode())

    def key(node: str) -> bytes:
        h = prefix.copy()
        h.update(node.encode())
        return h.digest()

    return key


def _derive(group: str, old: tuple[str, ...], old_names: frozenset[str], names: frozenset[str]) -> tuple[str, ...] | None:
    """The order over `names` from the order over `old_names`: drop who left, insert who
    joined by binary search. None if so many joined that sorting afresh is cheaper."""
    joined = names - old_names
    if len(joined) * 8 > len(names):
        return None
    left = old_names - names
    out = [n for n in old if n not in left] if left else list(old)
    key = _sort_key(group)
    for n in sorted(joined):
        k = key(n)
        lo, hi = 0, len(out)
        while lo < hi:
            mid = (lo + hi) // 2
            if key(out[mid]) < k:
                lo = mid + 1
            else:
                hi = mid
        out.insert(lo, n)
    return tuple(out)


def _report(node: str, status: Any) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(groups `node` reports unfit for, groups it reports active) from its status, as
    peer_eligibility and running_elsewhere read it; None for a document of another shape."""
    hit = _REPORTS.get(node)
    if hit is not None and hit[0] is status:
        return hit[1]
    if type(status) is not dict:
        return None
    groups = status.get("groups", {})
    if type(groups) is not dict:
        return None
    unfit, active = [], []
    for name, info in groups.items():
        if isinstance(info, dict):
            if info.get("eligible") is False:
                unfit.append(name)
            if info.get("active"):
                active.append(name)
    summary = (tuple(unfit), tuple(active))
    if len(_REPORTS) >= _REPORT_PEERS:
        _REPORTS.clear()
    _REPORTS[node] = (status, summary)
    return summary


class Roster:
    """`candidates` and `running_elsewhere` for one view at one time, asked for many groups."""

    __slots__ = ("view", "now", "dead_after", "_names", "_live", "_rankings", "_reports")

    def __init__(self, view: ClusterView, now: float, dead_after: float):
        self.view, self.now, self.dead_after = view, now, dead_after
        self._names: set[str] = set()
        self._live: frozenset[str] = frozenset()
        self._rankings: dict[str, _Ranking] | None = None  # the memo for this live set
        # (group -> live peers reporting it unfit, group -> live peers running it), sorted;
        # None until needed, False if a live peer's status has a shape the fast path skips
        self._reports: tuple[dict[str, list[str]], dict[str, list[str]]] | None | bool = None

    def _peer_reports(self) -> tuple[dict[str, list[str]], dict[str, list[str]]] | None:
        if self._reports is None:
            view = self.view
            members, me = view.members, view.node
            self._names = names = set(members) | {me}
            self._live = frozenset(n for n in names if view.alive(n, self.now, self.dead_after))
            unfit: dict[str, list[str]] = {}
            active: dict[str, list[str]] = {}
            self._reports = (unfit, active)
            for n in sorted(self._live):
                hb = members[n].heartbeat if n != me else None
                if hb is None:
                    continue
                summary = _report(n, hb.status)
                if summary is None:
                    self._reports = False
                    break
                for g in summary[0]:
                    unfit.setdefault(g, []).append(n)
                for g in summary[1]:
                    active.setdefault(g, []).append(n)
        return self._reports or None

    def candidates(self, g: specmod.Group, observed: Observed, exclude: str = "", unseen_rank: bool = False) -> list[str]:
        """What `candidates(g, observed, view, now, dead_after, exclude, unseen_rank)` returns."""
        return self.ranked(g, observed, exclude, unseen_rank)[0]

    def ranked(
        self, g: specmod.Group, observed: Observed, exclude: str = "", unseen_rank: bool = False
    ) -> tuple[list[str], int]:
        """(candidates(...) as above, the index of this node in them or -1)."""
        reports = self._peer_reports()
        nodes = g.nodes
        me = self.view.node
        if reports is None or (nodes and len(set(nodes)) != len(nodes)):
            out = candidates(g, observed, self.view, self.now, self.dead_after, exclude, unseen_rank)
            return out, _index_of(me, out)
        live, names = self._live, self._names
        unfit = reports[0].get(g.name, ())
        if nodes:
            # Only `nodes` are allowed, and they rank in that order.
            out = []
            for n in nodes:
                if n not in names:
                    if unseen_rank and n != exclude:
                        out.append(n)
                elif n != exclude and n in live:
                    if n == me:
                        if local_eligibility(g, observed) is not False:
                            out.append(n)
                    elif n not in unfit:
                        out.append(n)
            return out, _index_of(me, out)
        if self._rankings is None:
            self._rankings = _rankings_for(live)
        ranking = _ranking(g.name, live, self._rankings)
        unfit_me = me in live and local_eligibility(g, observed) is False
        if not unfit and not unfit_me and exclude not in live:
            return list(ranking.order), ranking.index(me)
        skip = {exclude, *unfit}
        if unfit_me:
            skip.add(me)
        out = [n for n in ranking.order if n not in skip]
        return out, _index_of(me, out)

    def running_elsewhere(self, g: specmod.Group) -> list[str]:
        """What `running_elsewhere(g, view, now, dead_after)` returns."""
        reports = self._peer_reports()
        if reports is None:
            return running_elsewhere(g, self.view, self.now, self.dead_after)
        return list(reports[1].get(g.name, ()))
