"""The directory store's writer of this node's heartbeat and status.

A heartbeat is the symlink nodes/NODE whose target is "COUNTER:WALL:DIGEST:INSTANCE",
created under a unique temporary name and renamed over the old one (atomic; ~30 us, a tenth
of a small file's write). The status is the file status/NODE.json, rewritten (by rename)
only when it changed. Blocking: DirectoryStore runs it in a thread.
"""

from __future__ import annotations

import itertools
import os
import uuid

from reconciler.published import NodeStatus
from reconciler.store import Heartbeat, StoreError, records
from reconciler.store.directory.layout import Layout, replace


class Heartbeats:
    def __init__(self, layout: Layout):
        self._layout = layout
        self._last_status: dict[str, str] = {}
        self._last_status_obj: dict[str, NodeStatus] = {}  # node -> the status record last written
        self._tmp_tag = uuid.uuid4().hex[:12]  # unique temporary names: other hosts write here too
        self._tmp_seq = itertools.count()
        self._written: dict[str, str] = {}  # node -> the heartbeat target this store wrote last
        self._displaced: dict[str, Heartbeat] = {}  # see Snapshot.displaced

    def publish(self, hb: Heartbeat) -> None:
        """Write `hb`'s heartbeat, and its status if that changed (Store.publish)."""
        self._layout.finish_setup()  # setup() failed at start-up: only until it succeeds once
        if not records.valid_name(hb.node):
            raise StoreError(f"{self._layout.url}: {hb.node!r} is not a valid node name")
        with self._layout.dirs("nodes", "status") as d:
            # The very record written last time is not serialized again (the agent builds a new
            # one whenever its status changes).
            if self._last_status_obj.get(hb.node) is not hb.status:
                status = records.status_text(hb.status)
                if self._last_status.get(hb.node) != status:
                    replace(d["status"], f"{hb.node}.json", status)
                    self._last_status[hb.node] = status
                self._last_status_obj[hb.node] = hb.status
            wall = "" if hb.wall is None else f"{hb.wall:.3f}"
            target = f"{int(hb.counter)}:{wall}:{hb.digest}" + (f":{hb.instance}" if hb.instance else "")
            nodes = d["nodes"]
            if hb.instance:
                self._note_displaced(nodes, hb.node)
            tmp = f".{hb.node}.{self._tmp_tag}.{next(self._tmp_seq)}.tmp"
            os.symlink(target, tmp, dir_fd=nodes)
            os.replace(tmp, hb.node, src_dir_fd=nodes, dst_dir_fd=nodes)
            self._written[hb.node] = target

    def displaced(self) -> dict[str, Heartbeat]:
        """The records the last publishes replaced that another writer had left (Snapshot.displaced)."""
        return dict(self._displaced) if self._displaced else {}

    def _note_displaced(self, nodes: int, node: str) -> None:
        """Look at the record this publish is about to replace: if it is not what this store
        wrote last, someone else publishes under this name (Snapshot.displaced). A readlink
        (~2 us) per publish: a read after the publish would see the other writer's record
        only if it wrote in the moment between, one read in a hundred."""
        try:
            found = os.readlink(node, dir_fd=nodes)
        except OSError:
            found = None  # absent (or not a heartbeat symlink: the read reports that)
        parsed = records.parse_beat_target(found) if found is not None and found != self._written.get(node) else None
        if parsed is None or isinstance(parsed, str):
            self._displaced.pop(node, None)
            return
        counter, wall, digest, instance = parsed
        self._displaced[node] = Heartbeat(node=node, counter=counter, digest=digest, wall=wall, instance=instance)
