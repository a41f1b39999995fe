"""The cluster spec in the store, as the agent and the commands use it: a revision made from
spec files and published with compare-and-swap, a revision loaded as this node's Spec (with
its own node-local settings), and the node's sync record.

What a node does about its files and the store's revision is decided in
reconciler/decide/specsync.py; the agent's SpecSync (agent/specsync.py) and the commands
(`reconcile apply`, `diff`, `tell`, `history`, `rollback`) do it with these.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler import spec as specmod
from reconciler.decide import specsync as rules
from reconciler.published import SpecFile, SpecRevision
from reconciler.spec import changes, files as specfiles, loader
from reconciler.store import Store

SYNC_FILE = "spec-sync.json"  # in the node's state directory


def origin(number: int) -> str:
    """How a revision's files are named in errors and in Group.source: `revision 7/web.toml`."""
    return f"revision {number}"


def load_revision(rev: SpecRevision, *, spec_path: str, local: Mapping[str, Any]) -> specmod.Spec:
    """`rev` as the Spec this node runs: its files, with this node's local settings (the
    store address, state directory, ... of its node file or spec files). SpecError if it
    does not load here."""
    return loader.load_texts([(f.name, f.text) for f in rev.files], spec_path=spec_path, local=local,
                             origin=origin(rev.number))


def comparable_hash(rev_files: Sequence[SpecFile], spec_path: str) -> str:
    """The hash a revision's files have as this node's spec (one file or a directory) holds them."""
    return specfiles.texts_hash(specfiles.comparable(rev_files, specfiles.layout(spec_path)))


def local_hash(spec_path: str) -> tuple[str | None, str]:
    """(the hash of this node's spec files without their local keys, "") or (None, why they
    cannot be read)."""
    try:
        return specfiles.texts_hash(specfiles.read_stripped(spec_path)), ""
    except specmod.SpecError as exc:
        return None, str(exc)


def local_stamp(spec_path: str) -> str:
    """The spec files' names, inodes, sizes and modification times, hashed: whether a file
    was saved since (decide/specsync.py: Synced.stamp)."""
    parts = []
    for f in loader.spec_files(spec_path):
        try:
            st = os.stat(f)
            parts.append(f"{f.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
        except OSError as exc:
            parts.append(f"{f.name}:{exc.errno}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def make_revision(spec_files: Sequence[SpecFile], new: specmod.Spec, *, number: int, previous: specmod.Spec | None,
                  author: str, summary: str = "") -> SpecRevision:
    return SpecRevision(number=number, digest=new.digest(), files=tuple(sorted(spec_files, key=lambda f: f.name)),
                        node=author, wall=time.time(), summary=summary or changes.one_line(previous, new))


async def publish(store: Store, spec_files: Sequence[SpecFile], new: specmod.Spec, *, base: int,
                  previous: specmod.Spec | None, author: str, summary: str = "") -> SpecRevision:
    """Publish `spec_files` (validated as `new`) as revision base + 1. SpecConflict if the
    store's current revision is not `base`; StoreError if it cannot be reached."""
    rev = make_revision(spec_files, new, number=base + 1, previous=previous, author=author, summary=summary)
    return await store.spec_put(rev)


def cli_author() -> str:
    return f"cli@{socket.gethostname()}"[:64]


# --- the sync record: the revision this node's files were last in step with -----------------


def read_synced(node_dir: Path) -> tuple[rules.Synced | None, str]:
    """(the node's sync record, the spec path it was made for) or (None, "") if there is none
    or it does not parse (then the node syncs afresh: its files take the store's revision,
    their old text kept beside)."""
    try:
        doc = json.loads((node_dir / SYNC_FILE).read_text())
        synced = rules.Synced(revision=int(doc["revision"]), files=str(doc["files"]), stamp=str(doc.get("stamp", "")))
        return synced, str(doc.get("spec_path", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None, ""


def write_synced(node_dir: Path, synced: rules.Synced, *, spec_path: str) -> None:
    """Atomically; an error is the caller's (the agent logs it: the next start then syncs afresh)."""
    tmp = node_dir / f".{SYNC_FILE}.tmp"
    doc = {"revision": synced.revision, "files": synced.files, "stamp": synced.stamp,
           "spec_path": os.path.realpath(spec_path)}
    with open(tmp, "w") as fh:
        fh.write(json.dumps(doc, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, node_dir / SYNC_FILE)


def synced_for(spec: specmod.Spec, spec_path: str) -> rules.Synced | None:
    """The sync record of an agent on this machine whose spec is `spec_path` (for `apply`:
    were these files edited on an older revision?), or None."""
    state = Path(spec.state_dir)
    real = os.path.realpath(spec_path)
    try:
        nodes = sorted(p for p in state.iterdir() if p.is_dir())
    except OSError:
        return None
    for d in nodes:
        synced, path = read_synced(d)
        if synced is not None and path == real:
            return synced
    return None


def unknown_revision(number: int, kept: Sequence[SpecRevision]) -> str:
    if not kept:
        return f"revision {number}: the store holds no spec"
    return f"revision {number} is not kept (kept: {kept[-1].number}..{kept[0].number})"


__all__ = ["cli_author", "comparable_hash", "load_revision", "local_hash", "local_stamp", "make_revision",
           "origin", "publish", "read_synced", "synced_for", "unknown_revision", "write_synced"]
