"""openMosix / LinuxPMI membership from a /proc/hpc tree (or a tree a test writes).

Nodes are the numeric entries of ROOT/nodes/; node N is configured when bit value 1 of the
integer in ROOT/nodes/N/status is set and up when bit value 2 is set. This node's id is in
ROOT/admin/mospe.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs


class MembershipError(Exception):
    pass


@attrs.frozen
class HpcView:
    me: str
    configured: frozenset[str]
    up: frozenset[str]

    @property
    def quorum(self) -> bool:
        """More than half of the configured nodes are up (a tie has no quorum)."""
        return len(self.up & self.configured) * 2 > len(self.configured)


def read(root: str | os.PathLike) -> HpcView:
    base = Path(root)
    try:
        me = (base / "admin" / "mospe").read_text().strip()
        names = [n for n in os.listdir(base / "nodes") if n.isdigit()]
    except OSError as exc:
        # The file itself, not the tree: "hpc:DIR" with DIR/admin/mospe missing must say so.
        raise MembershipError(f"{exc.filename or root}: {exc.strerror or exc}") from None
    configured, up = set(), set()
    for n in names:
        try:
            status = int((base / "nodes" / n / "status").read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if status & 1 or status & 2:
            configured.add(n)
        if status & 2:
            up.add(n)
    if not me.isdigit():
        raise MembershipError(f"{root}/admin/mospe: not a node number: {me!r}")
    return HpcView(me=me, configured=frozenset(configured), up=frozenset(up))
