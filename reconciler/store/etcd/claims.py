"""The etcd store's claim transactions.

claims/GROUP holds "NODE:GENERATION", bound to the claimer's lease; generations/GROUP the last
generation handed out (no lease: it only grows). A claim instance is identified by the create
revision of its key (Claim.token). Claiming creates the key only if absent, in the transaction
that bumps the generation; release and break delete it in a transaction comparing that
revision, so exactly one caller ends an instance and nobody ever removes a successor (a
re-created key has a new create revision).

Each call returns, with its result, the latest revision it wrote or saw a claim at (0: none),
which the store's next read must show.
"""

from __future__ import annotations

from aetcd import rpc

from reconciler.store import Claim
from reconciler.store.etcd import values
from reconciler.store.etcd.conn import Connection, compare_op, put_op


class Claims:
    def __init__(self, conn: Connection):
        self._conn = conn
        self._gens: dict[str, tuple[int, int]] = {}  # group -> (generation, its key's mod revision)

    async def claim(self, group: str, node: str, *, lease: int, deadline: float,
                    attempts: list[str]) -> tuple[Claim | None, int]:
        """Create the claim on `group` for `node` if absent, bound to `lease` (0: to none).

        One transaction compares that the claim key does not exist and that generations/GROUP
        is unchanged since we read it, then bumps the generation and creates the claim: among
        concurrent claimers exactly one succeeds, and generations only grow. None if a claim
        exists; but one that carries `node` and `lease` is this store instance's own (nobody else
        binds to its lease): made by an earlier attempt that timed out (`attempts`, kept across
        the caller's retries) or by an earlier claim that a lagging read did not show yet (the
        claims taken back after a store outage): that claim.
        Raises LeaseGone if etcd no longer knows `lease`, StoreError at the deadline.
        """
        conn = self._conn
        ckey, gkey = conn.key("claims", group), conn.key("generations", group)
        while True:
            gen, mod = self._gens.get(group, (0, 0))
            compare = [compare_op(ckey, "CREATE", create_revision=0), compare_op(gkey, "MOD", mod_revision=mod)]
            success = [put_op(gkey, str(gen + 1)), put_op(ckey, f"{node}:{gen + 1}", lease)]
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in (ckey, gkey)]
            resp = await conn.txn(f"claim {group}", compare, success, failure, deadline, attempts)
            if resp.succeeded:
                rev = resp.header.revision  # both keys were written at this revision
                self._gens[group] = (gen + 1, rev)
                return Claim(group=group, node=node, generation=gen + 1, token=str(rev)), rev
            current, gens = (r.response_range.kvs for r in resp.responses)
            last = gens[0].value if gens else b"0"
            if not (last.isdigit() and len(last) < 20):  # read as 0, the fencing token would go backwards
                raise conn.error(f"claim {group}", f"generations/{group} holds {last[:20]!r}, not a generation: "
                                 "claims of it are refused until it is repaired")
            self._gens[group] = (int(last), gens[0].mod_revision if gens else 0)
            if current:
                owner, cgen = values.claim_owner(current[0].value)
                # (a claim bound to no lease, a fenced group's, proves nothing of this instance:
                # it is this call's own only if an attempt of it may have made it)
                if owner == node and current[0].lease == lease and (lease or attempts):
                    found = Claim(group=group, node=node, generation=cgen, token=str(current[0].create_revision))
                    return found, current[0].mod_revision
                return None, current[0].mod_revision
            # The generation moved on and the claim is gone again: retry with the new number.

    async def end(self, what: str, claim: Claim) -> tuple[bool, int]:
        """Delete this claim instance ("release" by its owner, "break" by another node):
        True if this call removed it. The key goes only if its create revision is the claim's
        token and its value is unchanged, so among concurrent callers exactly one succeeds and
        a replaced instance is never touched."""
        if not claim.token.isdigit():
            return False, 0
        ckey = self._conn.key("claims", claim.group)
        compare = [compare_op(ckey, "CREATE", create_revision=int(claim.token)),
                   compare_op(ckey, "VALUE", value=f"{claim.node}:{claim.generation}".encode())]
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=ckey))
        resp = await self._conn.txn(f"{what} {claim.group}", compare, [delete], [], self._conn.deadline())
        return bool(resp.succeeded), resp.header.revision if resp.succeeded else 0

    async def hand_over(self, claim: Claim, node: str, *, lease: int, node_key: bytes,
                        bind: bool = True) -> tuple[Claim | None, int]:
        """Replace this claim instance with one of `node` (Store.hand_over), bound to `lease`,
        the lease `node`'s heartbeat key (`node_key`) is bound to. One transaction compares the
        instance (create revision and value, as end() does) and that lease, then bumps the
        generation and puts the new value over the key: the key never stops existing, so no
        claim() can slip in, and the old value is gone, so the old instance can no longer be
        ended or handed over (exactly one of those wins). The key keeps its create revision:
        the new instance is told apart by its value (NODE:GENERATION), as end() compares.
        `bind` False: the new claim is bound to no lease (Store.claim's outlive_owner)."""
        if not claim.token.isdigit():
            return None, 0
        conn = self._conn
        ckey, gkey = conn.key("claims", claim.group), conn.key("generations", claim.group)
        gen = claim.generation + 1
        compare = [compare_op(ckey, "CREATE", create_revision=int(claim.token)),
                   compare_op(ckey, "VALUE", value=f"{claim.node}:{claim.generation}".encode()),
                   compare_op(node_key, "LEASE", lease=lease)]
        success = [put_op(gkey, str(gen)), put_op(ckey, f"{node}:{gen}", lease if bind else 0)]
        resp = await conn.txn(f"handover {claim.group}", compare, success, [], conn.deadline())
        if not resp.succeeded:
            return None, 0
        rev = resp.header.revision
        self._gens[claim.group] = (gen, rev)
        return Claim(group=claim.group, node=node, generation=gen, token=claim.token), rev
