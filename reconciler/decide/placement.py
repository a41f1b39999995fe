"""Where each group should run: pure functions over the spec, Observed and ClusterView.

Every node evaluates the same rules on (nearly) the same view, so they agree without a
leader; where views differ for a moment, the store's atomic claim picks one winner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from reconciler import spec as specmod
from reconciler.model import ClusterView, Observed
from reconciler.published import NodeStatus


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


def banned(g: specmod.Group, observed: Observed, now: float) -> bool:
    """This node gave the group up after too many failures here, and the ban lasts (decide/health.py)."""
    until = observed.bans.get(g.name)
    return until is not None and now < until


def allowed(g: specmod.Group, node: str) -> bool:
    return not g.nodes or node in g.nodes


def rank_key(g: specmod.Group, node: str) -> tuple[int, bytes]:
    """Preference order: the group's `nodes` list first, then rendezvous hashing.

    Rendezvous hashing spreads groups over nodes evenly and moves few groups when
    membership changes; every node computes the same order.
    """
    if g.nodes and node in g.nodes:
        return (g.nodes.index(node), b"")
    return (len(g.nodes), _sort_key(g.name)(node))


def my_turn(rank: int, waited: float, dead_after: float) -> bool:
    """The best candidate acts at once; the k-th only after k x dead_after of nobody acting.

    That keeps a group from being stranded when the best candidate's agent is alive but
    not acting, without letting candidates race in the normal case.
    """
    return rank == 0 or waited >= rank * dead_after


def _sort_key(group: str) -> Callable[[str], bytes]:
    """node -> the rendezvous hash of (group, node), SHA-1 of "GROUP/NODE": a node's rank among
    those outside `nodes`. The group's prefix is hashed once for all the nodes."""
    prefix = hashlib.sha1(f"{group}/".encode())

    def key(node: str) -> bytes:
        h = prefix.copy()
        h.update(node.encode())
        return h.digest()

    return key


def _unique(nodes: tuple[str, ...]) -> tuple[str, ...] | dict[str, None]:
    """`nodes` without repeats, each where it first appears (the spec refuses repeats; a
    Group built in code may have them, and a node ranks where rank_key puts it)."""
    return nodes if len(set(nodes)) == len(nodes) else dict.fromkeys(nodes)


# --- one view, every group: what plan() asks for each group ---------------------------------
#
# Roster holds the placement rules that look at every member: who may take a group (its
# candidates, best first) and who still runs it. With G unclaimed groups and M members a
# plan() call would cost G x M SHA-1 hashes and status lookups if each question were
# answered from scratch (100,000 at 1,000 groups x 100 members: a cold start). So a Roster
# does the per-view work once (who is alive, which groups each live peer reports unfit or
# active) and keeps memos across calls: each group's rendezvous order over the live member
# set, and each peer's report summary. A memo holds only values that are functions of its
# key, so an answer from a warm memo equals the answer after forget()
# (tests/test_placement_memo.py) and plan() stays pure: the same inputs give the same Plan.
# Status records are frozen (reconciler/published.py) and a store hands an unchanged one
# back as the same object: a summary is reused while a peer publishes that very record.
# Both memos are bounded.

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
# peer -> (the status record summarised, (groups it is unfit for, groups active there))
_REPORTS: dict[str, tuple[NodeStatus, tuple[tuple[str, ...], tuple[str, ...]]]] = {}


def forget() -> None:
    """Drop every memo of this module (answers stay the same; they are computed afresh)."""
    _ORDERS.clear()
    _REPORTS.clear()
    _LEADING.clear()


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


def _report(node: str, status: NodeStatus) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(groups `node` reports unfit for, groups it reports active) from its status.

    A peer ranks for a group unless it reports a test failed there (eligible False): one whose
    tests have not reported yet may pass in a moment, and a node further down must not grab
    the group just because it answered first (`my_turn` lets the next one act after a delay).
    """
    hit = _REPORTS.get(node)
    if hit is not None and hit[0] is status:
        return hit[1]
    unfit, active = [], []
    for name, info in status.groups.items():
        if info.eligible is False or info.banned:  # (banned: it gave the group up, issue 16)
            unfit.append(name)
        if info.active:
            active.append(name)
    summary = (tuple(unfit), tuple(active))
    if len(_REPORTS) >= _REPORT_PEERS:
        _REPORTS.clear()
    _REPORTS[node] = (status, summary)
    return summary


class Roster:
    """The placement rules that look at the members, for one view at one time, asked for many groups."""

    __slots__ = ("view", "now", "dead_after", "_names", "_live", "_rankings", "_reports", "_away")

    def __init__(self, view: ClusterView, now: float, dead_after: float):
        self.view, self.now, self.dead_after = view, now, dead_after
        # Nodes in standby (an operator's intent: decide/intents.py) rank for nothing.
        self._away = frozenset(i.node for i in view.intents.values() if i.kind == "standby") if view.intents else frozenset()
        self._names: set[str] = set()  # every member, and this node
        self._live: frozenset[str] = frozenset()
        self._rankings: dict[str, _Ranking] | None = None  # the memo for this live set
        # (group -> live peers reporting it unfit, group -> live peers running it), sorted;
        # None until needed
        self._reports: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None

    def _peer_reports(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        if self._reports is None:
            view = self.view
            members, me = view.members, view.node
            self._names = names = set(members) | {me}
            self._live = frozenset(n for n in names if view.alive(n, self.now, self.dead_after))
            unfit: dict[str, list[str]] = {}
            active: dict[str, list[str]] = {}
            for n in sorted(self._live):
                hb = members[n].heartbeat if n != me else None
                if hb is None:
                    continue  # no report: it ranks, and runs nothing as far as anyone knows
                summary = _report(n, hb.status)
                for g in summary[0]:
                    unfit.setdefault(g, []).append(n)
                for g in summary[1]:
                    active.setdefault(g, []).append(n)
            self._reports = (unfit, active)
        return self._reports

    def candidates(self, g: specmod.Group, observed: Observed, exclude: str = "", unseen_rank: bool = False) -> list[str]:
        """Live, allowed nodes for `g` not known to be unfit, best first (rank_key), except
        `exclude`.

        `unseen_rank`: a preferred node (in `nodes`) this one has never heard from may just be
        starting: it ranks, so a less preferred node waits (my_turn) instead of grabbing the
        group first.
        """
        return self.ranked(g, observed, exclude, unseen_rank)[0]

    def ranked(
        self, g: specmod.Group, observed: Observed, exclude: str = "", unseen_rank: bool = False
    ) -> tuple[list[str], int]:
        """(candidates(...) as above, the index of this node in them or -1)."""
        out, rank = self._ranked(g, observed, exclude, unseen_rank)
        if self._away:
            out = [n for n in out if n not in self._away]
            rank = _index_of(self.view.node, out)
        return out, rank

    def _ranked(self, g: specmod.Group, observed: Observed, exclude: str, unseen_rank: bool) -> tuple[list[str], int]:
        unfit_by_group = self._peer_reports()[0]
        me = self.view.node
        live, names = self._live, self._names
        unfit = unfit_by_group.get(g.name, ())
        if g.nodes:
            # Only `nodes` are allowed, and they rank in that order.
            out = []
            for n in _unique(g.nodes):
                if n not in names:
                    if unseen_rank and n != exclude:
                        out.append(n)
                elif n != exclude and n in live:
                    if n == me:
                        if local_eligibility(g, observed) is not False and not banned(g, observed, self.now):
                            out.append(n)
                    elif n not in unfit:
                        out.append(n)
            return out, _index_of(me, out)
        if self._rankings is None:
            self._rankings = _rankings_for(live)
        ranking = _ranking(g.name, live, self._rankings)
        unfit_me = me in live and (local_eligibility(g, observed) is False or banned(g, observed, self.now))
        if not unfit and not unfit_me and exclude not in live:
            return list(ranking.order), ranking.index(me)
        skip = {exclude, *unfit}
        if unfit_me:
            skip.add(me)
        out = [n for n in ranking.order if n not in skip]
        return out, _index_of(me, out)

    def running_elsewhere(self, g: specmod.Group) -> list[str]:
        """Live peers that report the group's entries running there (claim or not), sorted.

        Nobody claims such a group: whatever made its claim disappear, the node running it
        either claims it back or stops it first.
        """
        return list(self._peer_reports()[1].get(g.name, ()))
