"""The etcd store's mirror: the heartbeats, statuses and claims under the prefix at one revision.

EtcdStore keeps one and moves it forward with a *delta* (delta_ops): the keys under nodes/
and claims/ modified since the mirror's revision, and how many keys nodes/, status/ and
claims/ hold. Its heartbeat transaction carries these ranges (so does the read-only
transaction of a read of its own). They leave status/ out: etcd reads every key of a range
from its backend before it filters by min_mod_revision, and a status document is large
(~190 KiB a node with 1,000 groups). Instead a heartbeat names a hash of its node's status
value ("status_hash"), and a node writes its status only in the transaction that also puts
its heartbeat, so a status changed only where a heartbeat changed. The mirror compares each
changed heartbeat's hash with that of the status it holds; a status that differs is *stale*,
and so is the key set of a kind whose count shows deletions. fetch_ops reads exactly what is
stale, at the mirror's revision, in one more round trip (read() does it before it answers; see
EtcdStore._read for why the result is exactly a read at that revision).

The delta also reads spec/head (one small key, whatever its mod revision), so the snapshot's
spec_revision is the number at the mirror's revision at no cost of its own; and all of
intents/ (the operator's intents: a few small keys, usually none), so Snapshot.intents costs no
round trip either. It keeps each node's heartbeat lease too (hand_over binds a claim to it).

A heartbeat without a status_hash (written by an older version) cannot tell: the statuses of
such nodes are ranged over in the delta itself (modified since the mirror's revision only), as
every status used to be.

A dict that a Snapshot holds is never changed again: the mirror copies it first (the *_shared
flags). Heartbeats, statuses and claims are parsed only when their key's value changed, through
reconciler/store/records.py (by values.py): a malformed value (or a key that is not a valid name)
is left out of the snapshot, listed in `bad` (Snapshot.skipped) and logged once.

(About 450 lines: the delta, the full read and the stale-status bookkeeping share one
revision and one set of maps; split, each half would reach into the other's.)
"""

from __future__ import annotations

from typing import Any

import attrs
from aetcd import rpc
from aetcd.utils import prefix_range_end

from reconciler import published
from reconciler.published import EMPTY, Intent, NodeStatus
from reconciler.store import Claim, Heartbeat, Snapshot, records
from reconciler.store.etcd import values

KINDS = ("nodes", "status", "claims")
HEAD = 5  # the delta's range over spec/head: after those of nodes/ and claims/ and the counts
INTENTS = 6  # then all of intents/ (operator intents: a few small keys, read whole every time)
# At most this many statuses are ranged over one key each (etcd allows 128 operations in a
# transaction); more: one range over status/.
EACH = 32


@attrs.frozen
class Delta:
    """What delta_ops asked for: the revision it reads from (0: everything) and the nodes
    whose statuses it ranges over (None: all of status/)."""

    base: int
    covered: tuple[str, ...] | None
    ops: list


@attrs.frozen
class Fetch:
    """What fetch_ops asked for, and of which state of the mirror."""

    version: int
    rev: int
    kinds: tuple[str, ...]  # key sets read again (keys only)
    stale: dict | None  # node -> min_mod_revision of its status range; None: all of status/
    ops: list


class Mirror:
    def __init__(self, base: bytes, skips: records.Skips | None = None):
        self.skips = skips or records.Skips(base.decode(errors="replace"))
        self.bad: dict[str, str] = {}  # "kind/name" -> why its value was left out (Snapshot.skipped)
        self.prefix = {kind: base + kind.encode() + b"/" for kind in KINDS}  # base: PREFIX/
        self.rev = 0  # the revision it holds (0: none)
        self.raw: dict[str, dict[str, bytes]] = {"nodes": {}, "claims": {}}  # kind -> name -> value
        self.members: dict[str, Heartbeat] = {}
        self.announced: dict[str, str | None] = {}  # node -> the status_hash its heartbeat names
        self.claims: dict[str, Claim] = {}
        self.status: dict[str, tuple[bytes, NodeStatus, str, str]] = {}  # node -> (value, parsed, status_hash, why malformed)
        # What the mirror lacks at `rev` (fetch_ops): kinds whose key sets must be read again,
        # and stale statuses (node -> the min_mod_revision that may leave an unchanged one out).
        self.resync: set[str] = set()
        self.stale: dict[str, int] = {}
        self.status_count = 0  # keys under status/ at `rev`
        self.head = base + b"spec/head"
        self.intents_prefix = base + b"intents/"
        self.intents: dict[str, Intent] = {}  # key -> the operator's intent at `rev`
        self.leases: dict[str, int] = {}  # node -> the etcd lease its heartbeat key is bound to (hand_over)
        self.spec_revision = 0  # spec/head's number at `rev` (0: absent or malformed)
        self.version = 0  # counts changes: a fetch answered after another change is not applied
        self.snap: Snapshot | None = None  # the Snapshot of the mirror as it is now, once built
        self.members_shared = self.claims_shared = False

    @property
    def pending(self) -> bool:
        """True if the mirror is the prefix at `rev` only once fetch_ops has been answered."""
        return bool(self.resync or self.stale)

    def snapshot(self) -> Snapshot:
        if self.snap is None:
            self.snap = Snapshot(members=self.members, claims=self.claims, skipped=tuple(sorted(self.bad)),
                                 spec_revision=self.spec_revision, intents=self.intents)
            self.members_shared = self.claims_shared = True
        return self.snap

    def _mark(self, entry: str, why: str) -> None:
        """`entry` is malformed (why) or, with why "", fine again."""
        if why:
            if self.bad.get(entry) != why:
                self.bad[entry] = why
                self.snap = None
                self.skips.warn(entry, why)
        elif entry in self.bad:
            del self.bad[entry]
            self.snap = None

    def _name(self, kind: str, key: bytes) -> str:
        return key[len(self.prefix[kind]):].decode(errors="replace")

    # --- the delta ----------------------------------------------------------------------------

    def delta_ops(self) -> Delta:
        """The ranges, for a transaction, that bring the mirror from its revision to the
        transaction's (with puts before them, to a revision that includes those)."""
        base = self.rev
        mod = base + 1 if base else 0
        ops = [_range(self.prefix["nodes"], min_mod_revision=mod), _range(self.prefix["claims"], min_mod_revision=mod)]
        ops += [_range(self.prefix[kind], count_only=True) for kind in KINDS]
        ops.append(_range(self.head, single=True))  # HEAD: spec/head, always
        ops.append(_range(self.intents_prefix))  # INTENTS: always, whole
        covered: tuple[str, ...] | None = ()
        if base:  # nodes whose heartbeat names no status hash: their statuses, if changed
            covered = tuple(name for name, h in self.announced.items() if h is None)
            if len(covered) > EACH:
                covered = None
                ops.append(_range(self.prefix["status"], min_mod_revision=mod))
            else:
                ops += [_range(self.prefix["status"] + n.encode(), single=True, min_mod_revision=mod) for n in covered]
        return Delta(base=base, covered=covered, ops=ops)

    def advance(self, delta: Delta, rev: int, responses, written: dict[str, bytes] | None = None) -> bool:
        """Bring the mirror from `delta.base` to `rev`, given the answers to `delta.ops` at
        `rev` (> base) and the status values the same transaction put (node -> value). True
        if the mirror now stands for the prefix at `rev`: at once, or once fetch_ops has been
        answered (`pending`).

        base 0 means the ranges returned every key. A nodes/ or claims/ key not returned is
        unmodified since `base`, so it still has the mirror's value -- unless it was deleted,
        which the count reveals (not which one): then that kind's key set is read again. A
        status is stale where a returned heartbeat names another hash than the mirror's.
        """
        base = delta.base
        if rev <= self.rev:
            return rev == self.rev  # answered out of order
        if base and (not self.rev or base > self.rev):
            return False  # the mirror was dropped or replaced meanwhile
        ranges = [r.response_range for r in responses]
        nodes, claims = ranges[0].kvs, ranges[1].kvs
        counts = dict(zip(KINDS, (r.count for r in ranges[2:5])))
        self._set_head(ranges[HEAD].kvs)
        self._set_intents(ranges[INTENTS].kvs)
        self.version += 1
        for kind, kvs in (("claims", claims), ("nodes", nodes)):
            names = [self._name(kind, kv.key) for kv in kvs]
            have = self.raw[kind]
            if not base:
                returned = set(names)
                for name in [n for n in have if n not in returned]:
                    self._remove(kind, name)
                self.resync.discard(kind)
            elif len(have) - sum(1 for n in names if n in have) != counts[kind] - len(kvs):
                self.resync.add(kind)  # keys were deleted
            put = self._put_claim if kind == "claims" else self._put_node
            for name, kv in zip(names, kvs):
                put(name, kv)
        fetched = set()
        for r in ranges[INTENTS + 1:]:  # statuses of nodes without a hash, as of rev
            for kv in r.kvs:
                name = self._name("status", kv.key)
                self._set_status(name, kv.value)
                fetched.add(name)
        for name, value in (written or {}).items():
            self._set_status(name, value)
            fetched.add(name)
        for name in fetched:
            self.stale.pop(name, None)
        covered = set(self.raw["nodes"]) if delta.covered is None else set(delta.covered)
        for name in self.raw["nodes"] if not base else self._names(nodes):
            if name not in fetched and not (name in covered and self.announced.get(name) is None):
                self._check_status(name, base)
        self.status_count = counts["status"]
        self.rev = rev
        if not self.pending and len(self.status) != self.status_count:
            self.resync.add("status")  # a status went (or came) without its heartbeat
        return True

    def _set_head(self, kvs) -> None:
        """spec/head as `kvs` (a range over it) has it; malformed: 0, and listed as skipped."""
        n = values.parse_spec_head(kvs[0].value) if kvs else 0
        self._mark("spec/head", n if isinstance(n, str) else "")
        n = 0 if isinstance(n, str) else n
        if n != self.spec_revision:
            self.spec_revision, self.snap = n, None

    def _set_intents(self, kvs) -> None:
        found, bad = parse_intents(self.intents_prefix, kvs)
        for name in [e for e in self.bad if e.startswith("intents/") and e not in bad]:
            self._mark(name, "")
        for entry, why in bad.items():
            self._mark(entry, why)
        if found != self.intents:
            self.intents, self.snap = found, None

    def _names(self, kvs):
        return [self._name("nodes", kv.key) for kv in kvs]

    def _check_status(self, name: str, base: int) -> None:
        """After `name`'s heartbeat changed: mark its status stale unless the mirror holds
        the one the heartbeat names."""
        announced, known = self.announced.get(name), self.status.get(name)
        if announced is not None and known is not None and known[2] == announced:
            return
        # Without a hash, a status the mirror holds as of base may come back only if modified.
        mod = base + 1 if announced is None and base and known is not None else 0
        self.stale[name] = min(self.stale.get(name, mod), mod)

    # --- what the delta left out ----------------------------------------------------------------

    def fetch_ops(self) -> Fetch:
        """Ranges for a read-only transaction that read what the mirror lacks, at its revision."""
        # Serializable: the keys at a given revision are the same on every member that has
        # applied it (the one that answered the delta has; another answers "future revision").
        at: dict[str, Any] = dict(revision=self.rev, serializable=True)
        kinds = tuple(k for k in ("nodes", "claims") if k in self.resync)
        ops = [_range(self.prefix[k], keys_only=True, **at) for k in kinds]
        if "status" in self.resync or len(self.stale) > EACH:
            ops.append(_range(self.prefix["status"], **at))
            return Fetch(version=self.version, rev=self.rev, kinds=kinds, stale=None, ops=ops)
        stale = dict(self.stale)
        ops += [_range(self.prefix["status"] + n.encode(), single=True, min_mod_revision=mod, **at)
                for n, mod in stale.items()]
        return Fetch(version=self.version, rev=self.rev, kinds=kinds, stale=stale, ops=ops)

    def apply_fetch(self, fetch: Fetch, responses) -> bool:
        """Take in the answers to `fetch.ops`. False if the mirror changed since fetch_ops
        (then they are dropped); still `pending` if the statuses then do not add up."""
        if fetch.version != self.version or fetch.rev != self.rev:
            return False
        self.version += 1
        ranges = [r.response_range for r in responses]
        for kind, r in zip(fetch.kinds, ranges):
            present = {self._name(kind, kv.key) for kv in r.kvs}
            for name in [n for n in self.raw[kind] if n not in present]:
                self._remove(kind, name)
            self.resync.discard(kind)
        ranges = ranges[len(fetch.kinds):]
        if fetch.stale is None:
            found = {self._name("status", kv.key): kv.value for kv in ranges[0].kvs}
            for name in [n for n in self.status if n not in found]:
                self._drop_status(name)
            for name, value in found.items():
                self._set_status(name, value)
            self.resync.discard("status")
            self.stale.clear()
        else:
            for (name, mod), r in zip(fetch.stale.items(), ranges):
                if r.kvs:
                    self._set_status(name, r.kvs[0].value)
                elif not mod:
                    self._drop_status(name)
                # (with mod: unchanged since, or gone, which the count below tells)
                self.stale.pop(name, None)
        if len(self.status) != self.status_count:
            self.resync.add("status")
        return True

    # --- a read of the whole prefix ---------------------------------------------------------

    def parse_all(self, kvs) -> tuple:
        """Every key under the prefix (one range's kvs) parsed, reusing the mirror's parsed
        objects for values that did not change."""
        raw: dict[str, dict[str, bytes]] = {"nodes": {}, "claims": {}}
        members: dict[str, Heartbeat] = {}
        announced: dict[str, str | None] = {}
        claims: dict[str, Claim] = {}
        status: dict[str, tuple[bytes, NodeStatus, str, str]] = {}
        nodes = []
        bad: dict[str, str] = {}
        sp, cp, np = self.prefix["status"], self.prefix["claims"], self.prefix["nodes"]
        head = 0
        leases: dict[str, int] = {}
        intent_kvs = []
        for kv in kvs:
            if kv.key.startswith(self.intents_prefix):
                intent_kvs.append(kv)
            elif kv.key == self.head:
                n = values.parse_spec_head(kv.value)
                if isinstance(n, str):
                    bad["spec/head"] = n
                else:
                    head = n
            elif kv.key.startswith(sp):
                name = self._name("status", kv.key)
                held = self.status.get(name)
                status[name] = st = held if held is not None and held[0] == kv.value else values.parse_status(kv.value)
                if st[3]:
                    bad[f"status/{name}"] = st[3]
            elif kv.key.startswith(cp):
                name = self._name("claims", kv.key)
                raw["claims"][name] = kv.value
                c: Claim | str | None = self.claims.get(name)
                if not isinstance(c, Claim) or c.token != str(kv.create_revision) or self.raw["claims"].get(name) != kv.value:
                    c = values.parse_claim_key(name, kv)
                if isinstance(c, str):
                    bad[f"claims/{name}"] = c
                else:
                    claims[name] = c
            elif kv.key.startswith(np):
                name = self._name("nodes", kv.key)
                raw["nodes"][name] = kv.value
                leases[name] = kv.lease
                nodes.append((name, kv.value))
        for name, value in nodes:
            known, doc = self.members.get(name), status[name][1] if name in status else EMPTY
            if self.raw["nodes"].get(name) == value and name in self.announced:
                announced[name] = self.announced[name]
                if known is not None and known.status is doc:
                    members[name] = known
                    continue
                beat = values.parse_json(value)
            else:
                beat = values.parse_json(value)
                announced[name] = values.announced_hash(beat)
            hb = values.parse_heartbeat(name, beat, doc)
            if isinstance(hb, str):
                bad[f"nodes/{name}"] = hb
            else:
                members[name] = hb
        intents, bad_intents = parse_intents(self.intents_prefix, intent_kvs)
        bad.update(bad_intents)
        for entry, why in bad.items():
            self.skips.warn(entry, why)
        return raw, announced, members, claims, status, bad, head, intents, leases

    def install(self, rev: int, parsed: tuple) -> None:
        """Replace the mirror with `parsed` (parse_all), the whole prefix at `rev`. Claims
        equal to the mirror's stay the very same dict (the agent skips work on that)."""
        raw, announced, members, claims, status, bad, self.spec_revision, self.intents, self.leases = parsed
        if claims != self.claims:
            self.claims, self.claims_shared = claims, False
        self.raw, self.announced, self.members, self.status = raw, announced, members, status
        self.rev, self.snap, self.members_shared, self.bad = rev, None, False, dict(bad)
        self.resync, self.stale, self.status_count = set(), {}, len(status)
        self.version += 1

    # --- changing one key -----------------------------------------------------------------------

    def _put_node(self, name: str, kv) -> None:
        have = self.raw["nodes"]
        if have.get(name) == kv.value and name in self.announced:
            return
        have[name] = kv.value
        self.leases[name] = kv.lease
        beat = values.parse_json(kv.value)
        self.announced[name] = values.announced_hash(beat)
        known = self.status.get(name)
        hb = values.parse_heartbeat(name, beat, known[1] if known is not None else EMPTY)
        self._mark(f"nodes/{name}", hb if isinstance(hb, str) else "")
        if not isinstance(hb, str):
            self.members_w()[name] = hb
        elif name in self.members:
            del self.members_w()[name]

    def _put_claim(self, name: str, kv) -> None:
        known = self.claims.get(name)
        if known is not None and known.token == str(kv.create_revision) and self.raw["claims"].get(name) == kv.value:
            return
        self.raw["claims"][name] = kv.value
        c = values.parse_claim_key(name, kv)
        self._mark(f"claims/{name}", c if isinstance(c, str) else "")
        if not isinstance(c, str):
            self.claims_w()[name] = c
        elif name in self.claims:
            del self.claims_w()[name]

    def _remove(self, kind: str, name: str) -> None:
        del self.raw[kind][name]
        self._mark(f"{kind}/{name}", "")
        if kind == "claims":
            if name in self.claims:
                del self.claims_w()[name]
            return
        # Its status went with it (the same lease); the status count checks that.
        self.announced.pop(name, None)
        self.leases.pop(name, None)
        self.stale.pop(name, None)
        self.status.pop(name, None)
        self._mark(f"status/{name}", "")
        if name in self.members:
            del self.members_w()[name]

    def _set_status(self, name: str, value: bytes) -> None:
        known = self.status.get(name)
        if known is not None and known[0] == value:
            return
        self.status[name] = st = values.parse_status(value)
        self._mark(f"status/{name}", st[3])
        if (hb := self.members.get(name)) is not None:
            self.members_w()[name] = attrs.evolve(hb, status=st[1])

    def _drop_status(self, name: str) -> None:
        self._mark(f"status/{name}", "")
        if self.status.pop(name, None) is not None and (hb := self.members.get(name)) is not None:
            self.members_w()[name] = attrs.evolve(hb, status=EMPTY)

    def members_w(self) -> dict[str, Heartbeat]:
        """The mirror's members, for changing: copied first if a snapshot holds them."""
        self.snap = None
        if self.members_shared:
            self.members, self.members_shared = dict(self.members), False
        return self.members

    def claims_w(self) -> dict[str, Claim]:
        """The mirror's claims, for changing: copied first if a snapshot holds them."""
        self.snap = None
        if self.claims_shared:
            self.claims, self.claims_shared = dict(self.claims), False
        return self.claims


def parse_intents(prefix: bytes, kvs) -> tuple[dict[str, Intent], dict[str, str]]:
    """(key -> intent, "intents/KEY" -> why malformed) of the keys under intents/."""
    found: dict[str, Intent] = {}
    bad: dict[str, str] = {}
    for kv in kvs:
        name = kv.key[len(prefix):].decode(errors="replace")
        try:
            intent = published.intent_loads(kv.value)
        except published.StatusError as exc:
            bad[f"intents/{name}"] = str(exc)[:200]
            continue
        if intent.key != name:
            bad[f"intents/{name}"] = f"holds the intent {intent.key}, not the one its key says"
            continue
        found[name] = intent
    return found, bad


def _range(key: bytes, single: bool = False, **options):
    """A range over the keys under `key` (or that one key) as a transaction operation."""
    end = b"" if single else prefix_range_end(key)
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end, **options))
