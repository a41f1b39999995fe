"""The failsafe's peer channel (reconciler/cluster/peer.py) on real UDP sockets, and the promise
book (cluster/promises.py): forged, replayed, misaddressed and strangers' requests are refused
and promise nothing; a promise survives a restart of the agent, not a reboot."""

from __future__ import annotations

import os
import socket
import time

import pytest

from reconciler.cluster import peer
from reconciler.cluster.promises import PromiseBook
from reconciler.decide import failsafe as rules

SECRET = b"0123456789abcdef0123456789abcdef"
OWNER, ME, N3 = "n1", "n2", "n3"
LEASE, HB, DEAD = 0.4, 0.1, 0.65


class Member:
    """ME's endpoint on 127.0.0.1 (a free port), answering from the pure rule with a promise
    book under `tmp`; the store unreachable for it unless `reaches_store`."""

    def __init__(self, tmp, *, reaches_store: bool = False, members=(OWNER, ME, N3)):
        self.book = PromiseBook(str(tmp / "promises.json"), boot="boot-1")
        self.reaches_store = reaches_store
        self.members = members
        self.answers: list[str] = []
        self.endpoint = peer.Endpoint(ME, listen="127.0.0.1:0", secret=SECRET, decide=self.decide,
                                      on_answer=self.answers.append)
        self.address = "127.0.0.1:%d" % self.endpoint.address[1]
        self.endpoint.start()

    def decide(self, request, seen):
        now = time.monotonic()
        verdict = rules.answer(request, me=ME, now=now, wall=time.time(), members=self.members,
                               round_trip_at=now if self.reaches_store else now - 10, heartbeat=HB, lease=LEASE, seen=seen)
        if isinstance(verdict, rules.Promise) and not self.book.give(verdict, dead_after=DEAD):
            return rules.Refusal("cannot record")
        return verdict


@pytest.fixture
def member(tmp_path):
    m = Member(tmp_path)
    yield m
    m.endpoint.stop()


def ask(address: str, *, secret: bytes = SECRET, sender: str = OWNER, receiver: str = ME, budget: float = 0.3):
    _sent, answers = peer.ask(sender, secret=secret, peers={receiver: address}, duration=LEASE, budget=budget)
    return answers[receiver]


def test_a_member_cut_off_from_the_store_promises_and_records_it_first(member):
    got = ask(member.address)
    assert isinstance(got, rules.Promise)
    assert set(member.book.promises) == {OWNER}
    on_disk = PromiseBook(member.book.path, boot="boot-1")
    on_disk.load(DEAD)
    assert on_disk.promises == member.book.promises
    assert os.stat(member.book.path).st_mode & 0o777 == 0o600


def test_a_member_that_reaches_the_store_refuses(tmp_path):
    m = Member(tmp_path, reaches_store=True)
    try:
        got = ask(m.address)
        assert isinstance(got, rules.Refusal) and "reaches the store" in got.reason
        assert m.book.promises == {}
    finally:
        m.endpoint.stop()


def test_a_forged_request_gets_no_answer_and_no_promise(member):
    assert ask(member.address, secret=b"not-the-cluster-secret-at-all!!!") is None
    assert member.book.promises == {} and member.answers == ["refused"]


def test_a_misaddressed_request_is_refused(member):
    got = ask(member.address, receiver=N3)  # sent to ME's endpoint, addressed to n3
    assert got is None  # (its refusal comes from n2, not from n3: no answer of n3's)
    assert member.book.promises == {} and member.answers == ["refused"]


def test_a_stranger_cannot_make_a_member_promise(member):
    """A request from outside the cluster (a sender with no record in the store), even signed
    with the secret, promises nothing: it cannot delay a failover."""
    got = ask(member.address, sender="intruder")
    assert isinstance(got, rules.Refusal) and "not a recorded member" in got.reason
    assert member.book.promises == {}


def test_a_replayed_request_is_refused(member):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    body = {"v": 1, "kind": "ask", "sender": OWNER, "receiver": ME, "time": time.time(), "nonce": "n0nce", "duration": LEASE}
    data = peer.seal(SECRET, body)
    host, port = peer.split_address(member.address)
    kinds = []
    for _ in range(2):
        sock.sendto(data, (host, port))
        reply = peer.unseal(SECRET, sock.recvfrom(4096)[0])
        assert reply is not None and reply["reply_to"] == "n0nce"
        kinds.append((reply["kind"], reply["reason"]))
    sock.close()
    assert kinds[0] == ("promise", "")
    assert kinds[1][0] == "refuse" and "replay" in kinds[1][1]


def test_an_old_request_is_refused_by_its_time(member):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    body = {"v": 1, "kind": "ask", "sender": OWNER, "receiver": ME, "time": time.time() - 60, "nonce": "x", "duration": LEASE}
    sock.sendto(peer.seal(SECRET, body), peer.split_address(member.address))
    reply = peer.unseal(SECRET, sock.recvfrom(4096)[0])
    sock.close()
    assert reply["kind"] == "refuse" and "off this node's clock" in reply["reason"]
    assert member.book.promises == {}


def test_an_answer_to_another_round_counts_for_nothing(tmp_path):
    """The owner takes only answers naming this round's nonce, signed, addressed to it."""
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % fake.getsockname()[1]
    import threading

    def answer_wrongly():
        data, origin = fake.recvfrom(4096)
        req = peer.unseal(SECRET, data)
        for reply_to, secret, receiver in (("old-nonce", SECRET, OWNER), (req["nonce"], b"x" * 32, OWNER),
                                           (req["nonce"], SECRET, N3)):
            fake.sendto(peer.seal(secret, {"kind": "promise", "sender": ME, "receiver": receiver, "reply_to": reply_to}), origin)

    t = threading.Thread(target=answer_wrongly)
    t.start()
    try:
        assert ask(address) is None
    finally:
        t.join()
        fake.close()


def test_no_answer_within_the_budget_is_no_promise():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        _sent, answers = peer.ask(OWNER, secret=SECRET, peers={ME: "127.0.0.1:%d" % silent.getsockname()[1]},
                                  duration=LEASE, budget=0.05)
        assert answers == {ME: None} and time.monotonic() - started < 0.5
    finally:
        silent.close()


def test_promises_survive_an_agent_restart_not_a_reboot(tmp_path):
    book = PromiseBook(str(tmp_path / "promises.json"), boot="boot-1")
    assert book.give(rules.Promise(owner=OWNER, deadline=time.monotonic() + 5), dead_after=DEAD)
    again = PromiseBook(book.path, boot="boot-1")
    again.load(DEAD)
    assert set(again.promises) == {OWNER}
    rebooted = PromiseBook(book.path, boot="boot-2")
    rebooted.load(DEAD)
    assert rebooted.promises == {}
    (tmp_path / "promises.json").write_text("{torn")
    torn = PromiseBook(book.path, boot="boot-1")
    torn.load(DEAD)
    assert torn.promises == {}


def test_a_promise_that_cannot_be_recorded_is_not_given(tmp_path):
    book = PromiseBook(str(tmp_path / "missing-dir" / "promises.json"), boot="boot-1")
    assert not book.give(rules.Promise(owner=OWNER, deadline=time.monotonic() + 5), dead_after=DEAD)
    assert book.promises == {}


def test_the_secret_file_must_be_private(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(SECRET + b"\n")
    os.chmod(f, 0o644)
    with pytest.raises(peer.PeerError, match=f"{f}.*readable by others"):
        peer.read_secret(str(f))
    os.chmod(f, 0o600)
    assert peer.read_secret(str(f)) == SECRET
    f.write_bytes(b"short")
    with pytest.raises(peer.PeerError, match="16 to 4096 bytes"):
        peer.read_secret(str(f))
    with pytest.raises(peer.PeerError, match="missing"):
        peer.read_secret(str(tmp_path / "missing"))


def test_the_replay_cache_is_bounded_and_forgets_after_the_window():
    cache = peer.ReplayCache(window=30.0, limit=2)
    assert not cache.check_and_add("a", 0.0)
    assert cache.check_and_add("a", 1.0)
    assert not cache.check_and_add("b", 1.0)
    assert cache.check_and_add("c", 2.0)  # full: refused, never evicted early
    assert not cache.check_and_add("c", 100.0)  # a and b aged out


def test_a_member_restarted_right_after_promising_still_honours_it(tmp_path):
    """The promise given by one agent is in the planning view of the next one (same boot):
    the owner counts as alive until the promise's deadline + dead_after, though the fresh
    agent's first read finds its heartbeat long still."""
    from reconciler import spec as specmod
    from reconciler.cluster import failsafe as failsafemod
    from reconciler.cluster.instance import Instance
    from reconciler.cluster.lease import Lease
    from reconciler.cluster.watch import Watch
    from reconciler.model import Heartbeat, Snapshot
    from reconciler.published import NodeStatus

    timing = specmod.Timing()
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    given = PromiseBook(str(tmp_path / "promises.json"), boot=peer.boot_id(), clock=clock)
    assert given.give(rules.Promise(owner=OWNER, deadline=now[0] + timing.lease), dead_after=timing.dead_after)
    # -- the agent is SIGKILLed and restarted at once: a new process, the same file and boot --
    spec = specmod.Spec(cluster=specmod.Cluster(timing=timing), groups={})
    lease = Lease(ME, str(tmp_path / "lease"), keeper=False, clock=clock)
    instance = Instance(ME, str(tmp_path / "instance"), lease=lease, timing=lambda: timing, clock=clock)
    watch = Watch(ME, spec=lambda: spec, store_url="dir:x", lease=lease, instance=instance, clock=clock)
    fs = failsafemod.build(ME, cluster_listen="127.0.0.1:0", advertise=None, secret_file=str(_secret(tmp_path)),
                           node_dir=str(tmp_path), lease=lease, watch=watch, instance=instance, timing=lambda: timing,
                           records_expire=False, loop_alive_at=clock, clock=clock)
    try:
        assert set(fs.book.promises) == {OWNER}
        hb = Heartbeat(node=OWNER, counter=5, status=NodeStatus())
        watch.apply_read(Snapshot(members={OWNER: hb}), "", None)
        now[0] += timing.lease + timing.dead_after - 0.01  # long after the owner's last heartbeat change
        watch.apply_read(Snapshot(members={OWNER: hb}), "", None)
        assert watch.planning_view().alive(OWNER, now[0], timing.dead_after)
        assert not watch.view.alive(OWNER, now[0], timing.dead_after)  # (without the promise: dead)
        now[0] += 0.02
        assert not watch.planning_view().alive(OWNER, now[0], timing.dead_after)
    finally:
        fs.endpoint.sock.close()


def _secret(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    os.chmod(f, 0o600)
    return f
