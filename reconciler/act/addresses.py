"""Add and remove virtual IP addresses through netlink, and announce them to the link.

Guarantees:
- `add` returns when the IP with its prefix is on the interface; already there is success.
  The interface missing, the IP on another interface of this node, or the IP on this
  interface with another prefix: ResourceError(permanent=True), never silent success.
- `remove` returns when the IP with its prefix is not on the interface; absent (or the
  interface gone) is success. The IP with another prefix is not this entry's: left alone.
- After an add that changed something (and `announce` is set), the new owner is announced
  so that neighbours stop sending to the previous owner's MAC: for IPv4 a gratuitous ARP
  request and reply (sender = target = the IP, broadcast); for IPv6 an unsolicited
  neighbour advertisement to ff02::1 with the override flag and our link-layer address.
  Both are built by hand and sent on a raw AF_PACKET socket bound to the interface, so
  nothing leaves any other interface. A failed announcement is logged, not raised: the
  address is in place, and a link that cannot send (down) has no one to tell.
- IPv6 addresses are added without duplicate address detection (IFA_F_NODAD, as
  keepalived does): a virtual IP moves between nodes and must be usable at once; the
  cluster's fencing, not DAD, keeps two nodes from holding it.
- `netns` (tests) names a namespace made with `ip netns add`; without it everything
  happens in the caller's network namespace.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading

from pyroute2 import NetlinkError

from reconciler.act.errors import ResourceError
from reconciler.observe import addresses as observed
from reconciler.spec import Address, Entry

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
CLONE_NEWNET = 0x40000000
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"  # 33:33 + the low 32 bits of ff02::1

# Netlink errors that the same request will keep getting.
PERMANENT_ERRNOS = {errno.EINVAL, errno.ENODEV, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EAFNOSUPPORT}


def _spec(entry: Entry | Address) -> Address:
    if not isinstance(entry, Entry):
        return entry
    if entry.address is None:
        raise ValueError(f"{entry.tag}: not an address entry")
    return entry.address


def _connect(netns: str | None):
    try:
        return observed.connect(netns)
    except FileNotFoundError:
        raise ResourceError(f"network namespace {netns} does not exist", permanent=True) from None


def _netlink_error(action: str, exc: NetlinkError) -> ResourceError:
    return ResourceError(f"{action}: {os.strerror(exc.code)}", permanent=exc.code in PERMANENT_ERRNOS)


def add(entry: Entry | Address, *, netns: str | None = None, deadline: float = 5.0) -> None:
    """Put the address on its interface and announce it; see the module docstring.

    `deadline` is accepted for the facade's uniformity: one netlink request takes well
    under a millisecond, so there is nothing to retry within it.
    """
    a = _spec(entry)
    want = ipaddress.ip_interface(a.ip)
    with _connect(netns) as ipr:
        snap = observed.read(ipr)
        state, message = observed.check(a, snap)
        if state == "running":
            return
        if state in ("error", "mismatch"):
            raise ResourceError(message, permanent=True)
        request = {"index": snap.links[a.interface], "address": str(want.ip), "prefixlen": want.network.prefixlen}
        if want.version == 6:
            request["flags"] = IFA_F_NODAD
        try:
            ipr.addr("add", **request)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # EEXIST: added meanwhile by someone else; still success
                raise _netlink_error(f"adding {a.ip} to {a.interface}", exc) from None
        mac = snap.macs.get(a.interface, "")
    if a.announce:
        try:
            announce(a, mac, netns=netns)
        except OSError as exc:
            log.warning("announcing %s on %s failed: %s", want.ip, a.interface, exc)


def remove(entry: Entry | Address, *, netns: str | None = None, deadline: float = 5.0) -> None:
    """Take the address off its interface; see the module docstring."""
    a = _spec(entry)
    want = ipaddress.ip_interface(a.ip)
    with _connect(netns) as ipr:
        snap = observed.read(ipr)
        for p in snap.find(want.ip):
            if p.interface != a.interface or p.prefixlen != want.network.prefixlen:
                continue
            try:
                ipr.addr("del", index=p.index, address=str(want.ip), prefixlen=p.prefixlen)
            except NetlinkError as exc:
                # Gone meanwhile (or with its interface): absent is what was asked for.
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                    raise _netlink_error(f"removing {a.ip} from {a.interface}", exc) from None


# --- announcements ---------------------------------------------------------------------------


def _mac_bytes(mac: str) -> bytes | None:
    try:
        b = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        return None
    # Only Ethernet-like links (6-byte, non-zero MAC) have neighbours to tell.
    return b if len(b) == 6 and any(b) else None


def garp(ip: ipaddress.IPv4Address, mac: bytes, op: int = 1) -> bytes:
    """A broadcast gratuitous ARP frame: op 1 = request, 2 = reply; sender = target = ip."""
    target_mac = b"\x00" * 6 if op == 1 else BROADCAST
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip.packed, target_mac, ip.packed)
    frame = BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(60, b"\x00")  # the Ethernet minimum; raw sockets do not pad


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(ip: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """An Ethernet frame with an unsolicited neighbour advertisement for ip to ff02::1.

    Flags: override set, solicited clear (RFC 4861 7.2.6); option 2 = target link-layer
    address; hop limit 255, without which receivers drop any neighbour discovery packet.
    """
    option = struct.pack("!BB6s", 2, 1, mac)
    body = struct.pack("!I16s", 0x20000000, ip.packed) + option
    pseudo = ip.packed + ALL_NODES.packed + struct.pack("!I3xB", 4 + len(body), socket.IPPROTO_ICMPV6)
    csum = _checksum(pseudo + struct.pack("!BBH", 136, 0, 0) + body)
    icmp = struct.pack("!BBH", 136, 0, csum) + body
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), socket.IPPROTO_ICMPV6, 255, ip.packed, ALL_NODES.packed)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


def packet_socket(proto: int, netns: str | None = None) -> socket.socket:
    """An AF_PACKET socket for `proto`, created in `netns` when given.

    setns(2) changes only the calling thread's network namespace, so a short-lived thread
    enters the namespace, creates the socket and exits; the socket stays in the namespace
    it was created in, and no other thread (nor the asyncio worker pool) ever moves.
    """
    if netns is None:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    result: dict[str, object] = {}

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["sock"] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    t = threading.Thread(target=enter, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def announce(address: Address, mac: str, *, netns: str | None = None) -> int:
    """Send the announcement frames for `address` on its interface; return how many were sent.

    Nothing is sent (0) on a link without an Ethernet MAC. Raises OSError when the frames
    cannot be sent (for instance the link is down).
    """
    ip = ipaddress.ip_interface(address.ip).ip
    mac_b = _mac_bytes(mac)
    if mac_b is None:
        return 0
    if ip.version == 4:
        proto, frames = ETH_P_ARP, [garp(ip, mac_b, 1), garp(ip, mac_b, 2)]
    else:
        proto, frames = ETH_P_IPV6, [unsolicited_na(ip, mac_b)]
    with packet_socket(proto, netns) as sock:
        sock.bind((address.interface, proto))
        for frame in frames:
            sock.send(frame)
    return len(frames)
