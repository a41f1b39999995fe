"""The failsafe: an owner whose store renewals fail runs on from its peers' promises, and this
node, as a member, promises its peers (docs/design.md, "Store outages: promises";
decide/failsafe.py holds the rules).

Two threads, both only with `peer_listen` and `peer_secret_file` set:
- the endpoint (cluster/peer.py) answers other owners' requests from the pure rule, recording
  each promise (cluster/promises.py) before the answer leaves;
- the owner's thread asks. It is not the renewer: a renewal that hangs (an etcd call waits
  for its deadline, 1 s, longer than the default lease; a hung NFS mount has none) would
  hold the renewer past the point where asking still helps. It sleeps until the lease,
  unrenewed, would reach decide/failsafe.ask_at, and asks then only if the store is the
  reason (never when the renewer stopped on purpose: a stalled loop, a twin under this
  node's name). While the store answers, each
  renewal moves the lease on before the thread's wake-up, which then finds nothing to do.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from reconciler.cluster import peer
from reconciler.cluster.instance import Instance
from reconciler.cluster.lease import Lease
from reconciler.cluster.promises import PromiseBook
from reconciler.cluster.watch import Watch
from reconciler.decide import failsafe as rules
from reconciler.decide import view as viewrules
from reconciler.spec import Timing

log = logging.getLogger("reconciler.agent")
LOG_EVERY = 5.0  # seconds between two "running on promises" / "no extension" lines


class Counters:
    """What the metrics show (read at scrape time)."""

    def __init__(self) -> None:
        self.asked = 0  # requests this owner sent
        self.given = 0  # promises this member gave
        self.refused = 0  # requests this member refused
        self.active = False  # this owner runs on promises right now
        self.line = ""  # the status line while active ("": not)


class Failsafe:
    """The failsafe of `node`: its endpoint on `listen`, advertising `advertise`."""

    def __init__(self, node: str, *, lease: Lease, watch: Watch, instance: Instance, book: PromiseBook, secret: bytes,
                 listen: str, advertise: str, timing: Callable[[], Timing], records_expire: bool = False,
                 loop_alive_at: Callable[[], float], tell: Callable[[str], object] = lambda line: None, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.node = node
        self.lease = lease
        self.watch = watch
        self.instance = instance
        self.records_expire = records_expire
        self._tell = tell  # the status line, to systemd (`systemctl status`): the store, and with it `reconcile status`, is away
        self.book = book
        self.secret = secret
        self.advertise = advertise
        self._timing = timing
        self._loop_alive_at = loop_alive_at  # (renewal.Pulse: when the event loop last proved itself alive)
        self._clock = clock
        self._wall = wall
        self.counters = Counters()
        self.endpoint = peer.Endpoint(node, listen=listen, secret=secret, decide=self.decide, wall=wall,
                                      on_answer=self._answered)
        self._addresses: dict[str, str] = {}  # member -> its last advertised peer address
        self._stop = threading.Event()
        self._logged_at = float("-inf")
        self._since: float | None = None  # when this owner began to run on promises
        self.thread = threading.Thread(target=self._run, name="failsafe", daemon=True)

    def start(self) -> None:
        self.endpoint.start()
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.endpoint.stop()
        self.thread.join(timeout=2.0)

    # --- the member ------------------------------------------------------------------------

    def members(self) -> set[str]:
        """The recorded members: every node with a record in this node's last good view of
        the store, alive or not; where records vanish on their own (etcd: with a stopped
        node's lease) every node this agent has seen; and the owners it holds promises to
        (a restarted agent during an outage has no view yet). `reconcile forget` removes a
        record: the node is no longer asked (on etcd: by agents started after it)."""
        members = self.watch.view.members
        seen = members if self.records_expire else {n for n, m in members.items() if m.heartbeat is not None}
        return set(seen) | set(self.book.promises)

    def decide(self, request: rules.Request, seen: bool) -> rules.Promise | rules.Refusal:
        t = self._timing()
        with self.book.lock:
            verdict = rules.answer(request, me=self.node, now=self._clock(), wall=self._wall(), members=self.members(),
                                   round_trip_at=self.watch.read_at, heartbeat=t.heartbeat, lease=t.lease, seen=seen,
                                   taking_over=self.book.taking_over)
            if isinstance(verdict, rules.Promise) and not self.book.give(verdict, dead_after=t.dead_after):
                return rules.Refusal("the promise cannot be recorded")
        return verdict

    def _answered(self, kind: str) -> None:
        if kind == "promised":
            self.counters.given += 1
        else:
            self.counters.refused += 1

    def binding(self) -> dict[str, float]:
        return self.book.binding(self._timing().dead_after)

    @contextmanager
    def planning(self) -> Iterator[Callable[[frozenset[str]], None]]:
        """Around the loop's planning view .. dispatch: no promise is given meanwhile; the
        callable records the owners whose claims the dispatched takeovers break."""
        with self.book.lock:
            def taking(owners: frozenset[str]) -> None:
                self.book.taking_over = owners
            yield taking

    # --- the owner -------------------------------------------------------------------------

    def peers(self) -> dict[str, str | None]:
        """Every recorded member but this node -> its peer address (None: never advertised)."""
        for name, m in self.watch.view.members.items():
            if m.heartbeat is not None and m.heartbeat.status.peer:
                self._addresses[name] = m.heartbeat.status.peer
        return {n: self._addresses.get(n) for n in self.members() if n != self.node}

    def store_failing(self, now: float) -> bool:
        """Is the store why the lease did not move? Not when the renewer stopped on purpose:
        a stalled event loop, or an identity verdict that forbids running (a twin). Any other
        renewal that did not come in time (a publish or a read that failed or hangs) is the
        store's."""
        t = self._timing()
        if viewrules.renewal_stopped(now, self._loop_alive_at(), stall=viewrules.loop_stall(t.lease)):
            return False
        return self.instance.verdict.run and self.instance.verdict.publish

    def _run(self) -> None:
        while not self._stop.is_set():
            t = self._timing()
            now = self._clock()
            until = self.lease.until
            due = rules.ask_at(until, demote_margin=t.demote_margin, heartbeat=t.heartbeat)
            if until <= now or self.lease.finished:
                self._end(now)
                self._stop.wait(t.heartbeat)  # lapsed (or never held): nothing to extend
                continue
            if now < due:
                if self._since is not None and not self.store_failing(now):
                    self._end(now)  # the store answers again: renewals moved the lease on
                self._stop.wait(due - now)
                continue
            if not self.store_failing(now):
                self._end(now)
                self._stop.wait(t.heartbeat)
                continue
            self.round(now)
            self._stop.wait(max(0.0, t.heartbeat - (self._clock() - now)))

    def round(self, now: float) -> bool:
        """Ask every recorded member; extend the lease if every one promised."""
        t = self._timing()
        peers = self.peers()
        reachable = {n: a for n, a in peers.items() if a}
        self.counters.asked += len(reachable)
        sent_at, answers = peer.ask(self.node, secret=self.secret, peers=reachable, duration=t.lease,
                                    budget=rules.BUDGET_FRACTION * t.heartbeat, clock=self._clock, wall=self._wall)
        for n in peers:
            answers.setdefault(n, rules.Refusal("no peer address known"))
        until = rules.extension(sent_at, t.lease, answers, members=[*peers, self.node], me=self.node,
                                clock_slack=t.clock_slack)
        if until is not None and self.lease.extend_valid(until):
            if self._since is None:
                self._since = now
                log.warning("failsafe: store renewals fail; running on promises from %s", ", ".join(sorted(peers)))
            self.counters.active = True
            self.counters.line = rules.describe(unreachable_for=now - self.watch.read_at, promised_by=peers, until=until,
                                                now=self._clock())
            if self._clock() - self._logged_at >= LOG_EVERY:
                self._logged_at = self._clock()
                log.info("failsafe: %s", self.counters.line)
                self._tell(f"{self.node}: {self.counters.line}")
            return True
        missing = {n: a.reason if isinstance(a, rules.Refusal) else "no answer" for n, a in answers.items()
                   if not isinstance(a, rules.Promise)}
        if self._clock() - self._logged_at >= LOG_EVERY or self._since is not None:
            self._logged_at = self._clock()
            why = "; ".join(f"{n}: {r}" for n, r in sorted(missing.items())) or "no other member is recorded"
            log.warning("failsafe: store renewals fail and not every member promised (%s): the lease is not extended", why)
        self._end(now)
        return False

    def _end(self, now: float) -> None:
        if self._since is not None:
            log.warning("failsafe: no longer running on promises (after %.1fs)", now - self._since)
            self._since = None
        self.counters.active = False
        self.counters.line = ""


def build(node: str, *, cluster_listen: str, advertise: str | None, secret_file: str, node_dir: str, lease: Lease,
          watch: Watch, instance: Instance, timing: Callable[[], Timing], records_expire: bool,
          loop_alive_at: Callable[[], float], tell: Callable[[str], object] = lambda line: None,
          clock: Callable[[], float] = time.monotonic) -> Failsafe:
    """The failsafe as configured (peer.PeerError, one line, if it cannot start), with the
    promises a predecessor gave loaded and honoured by `watch` from now on."""
    secret = peer.read_secret(secret_file)
    book = PromiseBook(os.path.join(node_dir, "promises.json"), boot=peer.boot_id(), clock=clock)
    book.load(timing().dead_after)
    fs = Failsafe(node, lease=lease, watch=watch, instance=instance, book=book, secret=secret, listen=cluster_listen,
                  advertise=advertise or cluster_listen, timing=timing, records_expire=records_expire,
                  loop_alive_at=loop_alive_at, tell=tell, clock=clock)
    if advertise is None:
        host, port = fs.endpoint.address[:2]
        fs.advertise = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # (port 0: the one the kernel chose)
    watch.promises = fs.binding
    return fs
