"""Address observation, actions and announcements against the real kernel.

Every address lives in network namespaces these tests create (`ip netns add`, unique
names, deleted afterwards), joined by a veth pair: node "A" (va) and its peer "B" (vb),
plus a second veth pair inside A (vx0, vx1). Only documentation ranges are used.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reconciler import spec
from reconciler.act import addresses as act
from reconciler.act.resources import ResourceError
from reconciler.observe import addresses as obs
from reconciler.spec import Address, Entry

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.needs("root", "ip")]
_names = itertools.count()


def ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True).stdout


class Net:
    def __init__(self) -> None:
        n = next(_names)
        self.a, self.b = f"rtA{os.getpid()}-{n}", f"rtB{os.getpid()}-{n}"
        ip("netns", "add", self.a)
        ip("netns", "add", self.b)
        ip("-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", self.b)
        ip("-n", self.a, "link", "add", "vx0", "type", "veth", "peer", "name", "vx1")
        for ns, dev in ((self.a, "va"), (self.a, "vx0"), (self.a, "vx1"), (self.b, "vb")):
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", self.b, "addr", "add", "192.0.2.2/24", "dev", "vb")
        ip("-n", self.b, "addr", "add", "2001:db8::2/64", "dev", "vb", "nodad")
        self.mac = json.loads(ip("-n", self.a, "-j", "link", "show", "va"))[0]["address"]

    def close(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def state(self, e: Entry) -> tuple[str, str]:
        st = obs.observe([e], group_of={e.tag: "g"}, netns=self.a)[e.tag]
        assert st.kind == "address" and st.group == "g"
        return st.state, st.message

    def peer_neighbour(self, vip: str) -> str | None:
        rows = json.loads(ip("-n", self.b, "-j", "neigh", "show", "to", vip, "dev", "vb") or "[]")
        return rows[0].get("lladdr") if rows else None

    def wait_neighbour(self, vip: str, mac: str, seconds: float = 2.0) -> str | None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            got = self.peer_neighbour(vip)
            if got == mac:
                return got
            time.sleep(0.02)
        return self.peer_neighbour(vip)


@pytest.fixture
def net():
    n = Net()
    try:
        yield n
    finally:
        n.close()


def entry(cidr: str, interface: str = "va", announce: bool = True, tag: str = "vip") -> Entry:
    return Entry(tag=tag, runlevels=("up",), address=Address(ip=cidr, interface=interface, announce=announce))


@pytest.mark.parametrize("cidr, plain", [("192.0.2.10/24", "192.0.2.10"), ("2001:db8::10/64", "2001:db8::10")])
def test_add_observe_external_delete_restore_remove(net: Net, cidr: str, plain: str) -> None:
    e = entry(cidr)
    assert net.state(e) == ("stopped", "")
    act.add(e, netns=net.a)
    assert net.state(e) == ("running", "")
    assert plain in ip("-n", net.a, "addr", "show", "dev", "va")
    act.add(e, netns=net.a)  # present already: success
    ip("-n", net.a, "addr", "del", cidr, "dev", "va")
    assert net.state(e) == ("stopped", "")
    act.add(e, netns=net.a)
    assert net.state(e) == ("running", "")
    act.remove(e, netns=net.a)
    assert net.state(e) == ("stopped", "")
    act.remove(e, netns=net.a)  # absent: success
    assert plain not in ip("-n", net.a, "addr", "show")


def test_same_ip_on_another_interface_is_an_error(net: Net) -> None:
    ip("-n", net.a, "addr", "add", "192.0.2.20/24", "dev", "vx0")
    e = entry("192.0.2.20/24")
    assert net.state(e) == ("error", "192.0.2.20 is already on vx0, not va")
    with pytest.raises(ResourceError) as info:
        act.add(e, netns=net.a)
    assert info.value.permanent and str(info.value) == "192.0.2.20 is already on vx0, not va"
    act.remove(e, netns=net.a)  # the copy on vx0 is not this entry's
    assert "192.0.2.20/24" in ip("-n", net.a, "addr", "show", "dev", "vx0")
    # IPv6 text forms differ; the values are what count.
    ip("-n", net.a, "addr", "add", "2001:db8:0::a/64", "dev", "vx0", "nodad")
    assert net.state(entry("2001:DB8::A/64"))[1] == "2001:db8::a is already on vx0, not va"


def test_missing_interface_is_permanent(net: Net) -> None:
    e = entry("192.0.2.30/24", interface="nosuch0")
    assert net.state(e) == ("error", "interface nosuch0 does not exist")
    with pytest.raises(ResourceError) as info:
        act.add(e, netns=net.a)
    assert info.value.permanent and "nosuch0" in str(info.value)
    act.remove(e, netns=net.a)  # nothing to remove: success


def test_other_prefix_is_a_mismatch(net: Net) -> None:
    ip("-n", net.a, "addr", "add", "192.0.2.40/25", "dev", "va")
    e = entry("192.0.2.40/24")
    assert net.state(e) == ("mismatch", "192.0.2.40 is on va with prefix /25, not /24")
    with pytest.raises(ResourceError) as info:
        act.add(e, netns=net.a)
    assert info.value.permanent
    act.remove(e, netns=net.a)
    assert "192.0.2.40/25" in ip("-n", net.a, "addr", "show", "dev", "va")


def test_missing_namespace_is_permanent() -> None:
    with pytest.raises(ResourceError) as info:
        act.add(entry("192.0.2.50/24"), netns=f"rt-absent-{os.getpid()}")
    assert info.value.permanent and "does not exist" in str(info.value)
    assert not os.path.exists(f"/run/netns/rt-absent-{os.getpid()}")


@pytest.mark.parametrize("bad", ["192.0.2.300/24", "192.0.2.10", "2001:db8::zz/64"])
def test_bad_cidr_is_refused_by_the_spec(tmp_path: Path, bad: str) -> None:
    f = tmp_path / "vip.toml"
    f.write_text(textwrap.dedent(f"""
        [groups.web]
        runlevel = "up"
        entries = [{{ tag = "vip", runlevels = ["up"], address = {{ ip = "{bad}", interface = "eth0" }} }}]
    """))
    with pytest.raises(spec.SpecError) as info:
        spec.load(f)
    assert "address.ip" in str(info.value) and bad in str(info.value)


# --- announcements -----------------------------------------------------------------------

STALE_MAC = "02:00:00:00:00:99"


def test_gratuitous_arp_overrides_a_stale_neighbour(net: Net) -> None:
    ip("-n", net.b, "neigh", "replace", "192.0.2.10", "lladdr", STALE_MAC, "dev", "vb", "nud", "stale")
    assert net.peer_neighbour("192.0.2.10") == STALE_MAC
    act.add(entry("192.0.2.10/24"), netns=net.a)
    assert net.wait_neighbour("192.0.2.10", net.mac) == net.mac


def test_gratuitous_arp_creates_a_neighbour_where_accepted(net: Net) -> None:
    ip("netns", "exec", net.b, "sysctl", "-qw", "net.ipv4.conf.vb.arp_accept=1")
    assert net.peer_neighbour("192.0.2.11") is None
    act.add(entry("192.0.2.11/24"), netns=net.a)
    assert net.wait_neighbour("192.0.2.11", net.mac) == net.mac


def test_no_announcement_when_disabled(net: Net) -> None:
    ip("-n", net.b, "neigh", "replace", "192.0.2.12", "lladdr", STALE_MAC, "dev", "vb", "nud", "stale")
    act.add(entry("192.0.2.12/24", announce=False), netns=net.a)
    time.sleep(0.3)  # no announcement comes: the time passing is the test
    assert net.peer_neighbour("192.0.2.12") == STALE_MAC


def test_unsolicited_na_overrides_a_stale_neighbour(net: Net) -> None:
    ip("-n", net.b, "-6", "neigh", "replace", "2001:db8::10", "lladdr", STALE_MAC, "dev", "vb", "nud", "stale")
    act.add(entry("2001:db8::10/64"), netns=net.a)
    assert net.wait_neighbour("2001:db8::10", net.mac) == net.mac


@pytest.mark.needs("accept_untracked_na")
def test_unsolicited_na_creates_a_neighbour_where_accepted(net: Net) -> None:
    # RFC 9131: only routers (forwarding on) create entries from untracked advertisements.
    ip("netns", "exec", net.b, "sysctl", "-qw", "net.ipv6.conf.vb.forwarding=1", "net.ipv6.conf.vb.accept_untracked_na=1")
    assert net.peer_neighbour("2001:db8::11") is None
    act.add(entry("2001:db8::11/64"), netns=net.a)
    assert net.wait_neighbour("2001:db8::11", net.mac) == net.mac


def _capture(sock, seconds: float = 2.0) -> list[bytes]:
    frames = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            frames.append(sock.recv(2048))
        elif frames:
            break
    return frames


def test_gratuitous_arp_frames_as_captured_by_the_peer(net: Net) -> None:
    with act.packet_socket(act.ETH_P_ARP, net.b) as sock:
        sock.bind(("vb", act.ETH_P_ARP))
        act.add(entry("192.0.2.13/24"), netns=net.a)
        frames = _capture(sock)
    mac = bytes.fromhex(net.mac.replace(":", ""))
    vip = bytes([192, 0, 2, 13])
    garps = []
    for f in frames:
        dst, src = f[0:6], f[6:12]
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", f[14:42])
        if spa == vip and tpa == vip:
            assert (dst, src, sha, htype, ptype, hlen, plen) == (b"\xff" * 6, mac, mac, 1, 0x0800, 6, 4)
            garps.append(op)
    assert sorted(garps) == [1, 2], frames


def test_unsolicited_na_frame_as_captured_by_the_peer(net: Net) -> None:
    with act.packet_socket(act.ETH_P_IPV6, net.b) as sock:
        sock.bind(("vb", act.ETH_P_IPV6))
        act.add(entry("2001:db8::13/64"), netns=net.a)
        frames = _capture(sock)
    mac = bytes.fromhex(net.mac.replace(":", ""))
    vip = bytes.fromhex("20010db8000000000000000000000013")
    nas = [f for f in frames if f[20] == 58 and f[54] == 136 and f[62:78] == vip]
    assert len(nas) == 1, frames
    f = nas[0]
    assert f[0:6] == b"\x33\x33\x00\x00\x00\x01" and f[6:12] == mac
    assert f[21] == 255 and f[38:54] == bytes.fromhex("ff020000000000000000000000000001")
    assert f[58] & 0xE0 == 0x20  # override only: not router, not solicited
    assert f[78:80] == b"\x02\x01" and f[80:86] == mac
    assert act._checksum(f[22:38] + f[38:54] + struct.pack("!I3xB", len(f) - 54, 58) + f[54:]) == 0


# --- the facade, in the caller's own namespace (the production path) ---------------------

FACADE = """
import asyncio, json
from reconciler.act import resources
from reconciler.act.resources import ResourceError
from reconciler.spec import Address, Entry
vip = Entry(tag="vip", runlevels=("up",), address=Address(ip="198.51.100.7/24", interface="va"))
bad = Entry(tag="bad", runlevels=("up",), address=Address(ip="198.51.100.8/24", interface="nosuch0"))
out = [resources.observe([vip, bad])]
asyncio.run(resources.start(vip, deadline=2))
out.append(resources.observe([vip]))
try:
    asyncio.run(resources.start(bad, deadline=2))
except ResourceError as exc:
    out.append([str(exc), exc.permanent])
asyncio.run(resources.stop(vip, deadline=2))
out.append(resources.observe([vip]))
print(json.dumps(out))
"""


def test_facade_in_the_current_namespace(net: Net) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["ip", "netns", "exec", net.a, sys.executable, "-c", FACADE],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        {"vip": ["stopped", ""], "bad": ["error", "interface nosuch0 does not exist"]},
        {"vip": ["running", ""]},
        ["interface nosuch0 does not exist", True],
        {"vip": ["stopped", ""]},
    ]
