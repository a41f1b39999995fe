"""The uniform facade the agent calls for resource entries (mounts and addresses).

Guarantees:
- `start` returns once the entry is present as specified (idempotent: present already is
  success); `stop` returns once it is absent (absent already is success).
- Both raise `ResourceError` otherwise. `permanent=True` means retrying the same spec on
  this node cannot help (missing device or interface, unknown filesystem type, the IP on
  another interface); `permanent=False` means a later attempt may succeed (busy target).
- Blocking work (mount(8), umount(8), netlink, raw sockets) runs in a worker thread. The
  worker gives up within about `deadline` seconds; a cancelled caller does not stop a
  worker already running (a half-done mount(8) cannot be abandoned safely).
- `observe` reads the kernel once per kind for all entries and never changes anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from reconciler.act.errors import ResourceError  # noqa: F401 (part of this facade: callers catch it from here)
from reconciler.spec import Entry


KINDS = ("mount", "address")


# The kind modules are imported on first use, not here: the address ones bring pyroute2,
# ~20 MiB of a node's memory that a node without virtual IPs never needs.
def _act(kind: str):
    if kind == "mount":
        from reconciler.act import mounts
        return mounts
    from reconciler.act import addresses
    return addresses


def _observer(kind: str):
    if kind == "mount":
        from reconciler.observe import mounts
        return mounts
    from reconciler.observe import addresses
    return addresses


def _kind(entry: Entry) -> str:
    if entry.kind not in KINDS:
        raise ValueError(f"{entry.tag}: a {entry.kind} entry is not a resource")
    return entry.kind


async def start(entry: Entry, *, deadline: float) -> None:
    """Make the entry's mount or address present; see the module docstring."""
    if _kind(entry) == "mount":
        await asyncio.to_thread(_act("mount").mount, entry, deadline=deadline)
    else:
        await asyncio.to_thread(_act("address").add, entry, deadline=deadline)


async def stop(entry: Entry, *, deadline: float) -> None:
    """Make the entry's mount or address absent; see the module docstring."""
    if _kind(entry) == "mount":
        await asyncio.to_thread(_act("mount").unmount, entry, deadline=deadline)
    else:
        await asyncio.to_thread(_act("address").remove, entry, deadline=deadline)


def observe(entries: Iterable[Entry]) -> dict[str, tuple[str, str]]:
    """tag -> (state, message) for the mount and address entries; process entries are skipped.

    States: "running", "stopped", "mismatch" (present but different) and, for addresses,
    "error" (the interface is missing or the IP is on another interface).
    """
    entries = list(entries)
    out: dict[str, tuple[str, str]] = {}
    mounts = [e for e in entries if e.kind == "mount"]
    addresses = [e for e in entries if e.kind == "address"]
    if mounts:
        for tag, st in _observer("mount").observe(mounts).items():
            out[tag] = (st.state, st.message)
    if addresses:
        for tag, st in _observer("address").observe(addresses).items():
            out[tag] = (st.state, st.message)
    return out
