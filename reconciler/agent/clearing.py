"""`reconcile clear GROUP [--node N]`: lift a node's ban from a group and reset the group's
failure count there (issue 16).

For now the request is node-local: the command writes it into that node's state directory
(STATE/NODE/clear/GROUP, text: a request id), the node's agent applies it on its next pass
(act/ledger.py) and publishes the id in the group's status (GroupStatus.cleared), which the
command waits for. Issue 15's operator intents, held in the store, will make it cluster-wide.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from reconciler import spec as specmod
from reconciler.act.ledger import CLEAR_DIR
from reconciler.cluster import survey
from reconciler.store import StoreError


def request(spec: specmod.Spec, node: str, group: str) -> str:
    """Write the request into the node's state directory; its id. OSError if it cannot."""
    folder = Path(spec.state_dir) / node / CLEAR_DIR
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"{folder.parent}: no such directory (is {node} a node of this machine? --node names another)")
    folder.mkdir(mode=0o700, exist_ok=True)
    rid = secrets.token_hex(8)
    tmp = folder / f".{group}.{rid}.tmp"  # (not a valid group name: the agent skips it until renamed)
    tmp.write_text(rid + "\n")
    os.replace(tmp, folder / group)
    return rid


async def wait(spec: specmod.Spec, node: str, group: str, rid: str, timeout: float) -> bool:
    """Until the node publishes that it applied request `rid` for `group` (True), or `timeout` passes."""
    store = survey.open_spec_store(spec)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                snap = await store.read()
            except StoreError:
                snap = None
            hb = snap.members.get(node) if snap is not None else None
            g = hb.status.groups.get(group) if hb is not None else None
            if g is not None and g.cleared == rid:
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await store.close()
