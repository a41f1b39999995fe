"""Address entries as the kernel sees them, read through netlink (pyroute2).

Guarantees:
- `check` reports "running" (the IP with that prefix is on that interface), "stopped"
  (the IP is on no interface), "mismatch" (on that interface with another prefix) or
  "error" with a message: the interface does not exist, the IP is on a *different*
  interface of this node ("192.0.2.10 is already on veth1, not eth0"), or IPv6
  duplicate address detection failed for it.
- IPs are compared as values (ipaddress), never as text: "2001:db8::a" == "2001:DB8:0::A".
- Without `netns` the caller's network namespace is read; `netns` names one made with
  `ip netns add` (for tests) and is never created by this module.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import attrs
from pyroute2 import IPRoute

from reconciler.observe import EntryState
from reconciler.spec import Address, Entry

IFA_F_DADFAILED = 0x08


@attrs.frozen
class Present:
    """One address on one interface."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    prefixlen: int
    index: int
    interface: str
    flags: int = 0


@attrs.frozen
class Snapshot:
    """Interfaces (name -> index, MAC) and addresses of one network namespace."""

    links: dict[str, int]
    macs: dict[str, str]
    addresses: tuple[Present, ...]

    def find(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Present]:
        return [p for p in self.addresses if p.ip == ip]


def connect(netns: str | None = None) -> IPRoute:
    """A netlink socket in the current namespace, or in `netns` (which must exist)."""
    if netns is None:
        return IPRoute()
    # flags=0: pyroute2's default (O_CREAT) would silently create a missing namespace.
    return IPRoute(netns=netns, flags=0)


def read(ipr: IPRoute) -> Snapshot:
    links: dict[str, int] = {}
    macs: dict[str, str] = {}
    names: dict[int, str] = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        links[name] = link["index"]
        names[link["index"]] = name
        macs[name] = link.get_attr("IFLA_ADDRESS") or ""
    present = []
    for a in ipr.get_addr():
        # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links.
        raw = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if raw is None:
            continue
        flags = a.get_attr("IFA_FLAGS")
        present.append(
            Present(
                ip=ipaddress.ip_address(raw),
                prefixlen=a["prefixlen"],
                index=a["index"],
                interface=names.get(a["index"], f"if{a['index']}"),
                flags=a["flags"] if flags is None else flags,
            )
        )
    return Snapshot(links=links, macs=macs, addresses=tuple(present))


def snapshot(netns: str | None = None) -> Snapshot:
    with connect(netns) as ipr:
        return read(ipr)


def check(address: Address, snap: Snapshot) -> tuple[str, str]:
    """(state, message) for one Address; see the module docstring for the states."""
    want = ipaddress.ip_interface(address.ip)
    ip, plen = want.ip, want.network.prefixlen
    if address.interface not in snap.links:
        return "error", f"interface {address.interface} does not exist"
    found = snap.find(ip)
    here = [p for p in found if p.interface == address.interface]
    elsewhere = [p for p in found if p.interface != address.interface]
    if elsewhere:
        return "error", f"{ip} is already on {elsewhere[0].interface}, not {address.interface}"
    if not here:
        return "stopped", ""
    exact = [p for p in here if p.prefixlen == plen]
    if not exact:
        have = ", ".join(f"/{p.prefixlen}" for p in here)
        return "mismatch", f"{ip} is on {address.interface} with prefix {have}, not /{plen}"
    if exact[0].flags & IFA_F_DADFAILED:
        return "error", f"{ip} on {address.interface}: duplicate address detected (another node answers for it)"
    return "running", ""


def observe(
    entries: Iterable[Entry],
    *,
    group_of: Mapping[str, str] | None = None,
    netns: str | None = None,
    snap: Snapshot | None = None,
) -> dict[str, EntryState]:
    """EntryState (kind "address") for each address entry, keyed by tag; others skipped.

    One netlink dump serves all entries. `group_of` maps tag -> group ("" when absent).
    """
    addressed = [(e, e.address) for e in entries if e.address is not None]
    if not addressed:
        return {}
    if snap is None:
        snap = snapshot(netns)
    group_of = group_of or {}
    out = {}
    for e, address in addressed:
        state, message = check(address, snap)
        out[e.tag] = EntryState(group=group_of.get(e.tag, ""), tag=e.tag, kind="address", state=state, message=message)
    return out
