"""The etcd store's mirror: every key under the prefix at one revision, parsed.

EtcdStore keeps one and moves it forward from what its heartbeat transaction returns (the
keys modified since the mirror's revision, and the number of keys under the prefix): see
EtcdStore.read for why that is exactly a read at the heartbeat's revision. A dict that a
Snapshot holds is never changed again: the mirror copies it first (the *_shared flags).
Heartbeats, statuses and claims are parsed only when their key's value changed.
"""

from __future__ import annotations

import json

import attrs

from reconciler.store import Claim, Heartbeat, Snapshot


class Mirror:
    def __init__(self, kinds: list[tuple[str, bytes]]):
        self.kinds = kinds  # (kind, key prefix) for nodes, status, claims, in that order
        self.rev = 0  # the revision it holds (0: none)
        self.raw: dict[bytes, bytes] = {}  # key -> value
        self.members: dict[str, Heartbeat] = {}
        self.claims: dict[str, Claim] = {}
        self.status: dict[str, tuple[bytes, dict]] = {}  # node -> (status value, parsed)
        self.snap: Snapshot | None = None  # the Snapshot of the mirror as it is now, once built
        self.members_shared = self.claims_shared = False

    def snapshot(self) -> Snapshot:
        if self.snap is None:
            self.snap = Snapshot(members=self.members, claims=self.claims)
            self.members_shared = self.claims_shared = True
        return self.snap

    def split(self, key: bytes) -> tuple[str, str]:
        """prefix/KIND/NAME -> (KIND, NAME) for nodes, status and claims; ("", "") otherwise."""
        for kind, p in self.kinds:
            if key.startswith(p):
                return kind, key[len(p):].decode(errors="replace")
        return "", ""

    def parse_all(self, kvs) -> tuple[dict, dict, dict, dict]:
        """(raw, members, claims, status) for every key under the prefix, reusing the
        mirror's parsed objects for values that did not change."""
        raw: dict[bytes, bytes] = {}
        members: dict[str, Heartbeat] = {}
        claims: dict[str, Claim] = {}
        status: dict[str, tuple[bytes, dict]] = {}
        nodes = []
        for kv in kvs:
            raw[kv.key] = kv.value
            kind, name = self.split(kv.key)
            if kind == "status":
                known = self.status.get(name)
                status[name] = known if known is not None and known[0] == kv.value else (kv.value, _doc(kv.value))
            elif kind == "claims":
                c = self.claims.get(name)
                if c is None or c.token != str(kv.create_revision) or self.raw.get(kv.key) != kv.value:
                    c = _claim(name, kv)
                if c is not None:
                    claims[name] = c
            elif kind == "nodes":
                nodes.append((name, kv))
        for name, kv in nodes:
            known, doc = self.members.get(name), status[name][1] if name in status else {}
            if known is not None and known.status is doc and self.raw.get(kv.key) == kv.value:
                members[name] = known
            elif (hb := _heartbeat(name, kv.value, doc)) is not None:
                members[name] = hb
        return raw, members, claims, status

    def install(self, rev: int, parsed: tuple[dict, dict, dict, dict]) -> None:
        """Replace the mirror with `parsed` (parse_all), the whole prefix at `rev`. Claims
        equal to the mirror's stay the very same dict (the agent skips work on that)."""
        raw, members, claims, status = parsed
        if claims != self.claims:
            self.claims, self.claims_shared = claims, False
        self.raw, self.members, self.status = raw, members, status
        self.rev, self.snap, self.members_shared = rev, None, False

    def advance(self, base: int, rev: int, changed, count: int) -> bool:
        """Bring the mirror from revision `base` to `rev` (> base), given every key modified
        after `base` (`changed`, as of `rev`) and the number of keys under the prefix at
        `rev`. True if the mirror is now exactly the prefix at `rev`.

        base 0 means `changed` is every key. A key not in `changed` is unmodified since
        `base`, so it still has the mirror's value -- unless it was deleted, which the count
        reveals (not which one): then the mirror is dropped, and the next read() or publish()
        reads everything.
        """
        if not base:
            if rev > self.rev:
                self.install(rev, self.parse_all(changed))
            return rev == self.rev
        if rev <= self.rev or not self.rev or base > self.rev:
            return rev == self.rev  # answered out of order, or the mirror was replaced meanwhile
        raw = self.raw
        known = sum(1 for kv in changed if kv.key in raw)
        if len(raw) - known != count - len(changed):
            self.rev = 0  # keys were deleted
            return False
        sp = self.kinds[1][1]
        for kv in changed:  # statuses first, so a heartbeat is built once with its new status
            if kv.key.startswith(sp):
                self.apply(kv)
        for kv in changed:
            if not kv.key.startswith(sp):
                self.apply(kv)
        self.rev = rev
        return True

    def apply(self, kv) -> None:
        """Put one key's new value into the mirror."""
        old = self.raw.get(kv.key)
        self.raw[kv.key] = kv.value
        kind, name = self.split(kv.key)
        if kind == "nodes":
            known = self.status.get(name)
            hb = _heartbeat(name, kv.value, known[1] if known is not None else {})
            if hb is not None:
                self.members_w()[name] = hb
            elif name in self.members:
                del self.members_w()[name]
        elif kind == "status":
            if old == kv.value and name in self.status:
                return  # rewritten unchanged (a new lease)
            doc = _doc(kv.value)
            self.status[name] = (kv.value, doc)
            if (hb := self.members.get(name)) is not None:
                self.members_w()[name] = attrs.evolve(hb, status=doc)
        elif kind == "claims":
            c = _claim(name, kv)
            if c is not None:
                self.claims_w()[name] = c
            elif name in self.claims:
                del self.claims_w()[name]

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


def _doc(raw: bytes) -> dict:
    """A status value parsed; {} if it is not a JSON object."""
    doc = _json(raw)
    return doc if isinstance(doc, dict) else {}


def _heartbeat(node: str, raw: bytes, status: dict) -> Heartbeat | None:
    """A nodes/NODE value as a Heartbeat carrying `status`; None if malformed."""
    beat = _json(raw)
    if not isinstance(beat, dict) or not isinstance(beat.get("counter"), int):
        return None
    wall = beat.get("wall")
    return Heartbeat(node=node, counter=beat["counter"], digest=str(beat.get("digest", "")), status=status,
                     wall=float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None)


def _claim(group: str, kv) -> Claim | None:
    owner, gen = parse_claim(kv.value)
    return Claim(group=group, node=owner, generation=gen, token=str(kv.create_revision)) if owner else None


def _json(raw: bytes):
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def parse_claim(raw: bytes) -> tuple[str, int]:
    """"NODE:GENERATION" -> (NODE, GENERATION); ("", 0) if malformed."""
    owner, _, gen = raw.decode(errors="replace").rpartition(":")
    return (owner, int(gen)) if owner and gen.isdigit() else ("", 0)
