"""What the cluster spec commands do (`reconcile apply`, `diff`, `tell`, `history`,
`rollback`): each reads the store's current revision, works out the next one, and publishes
it with compare-and-swap (agent/clusterspec.py). The running agents then take it and write it
into their own spec files (agent/specsync.py).

Each returns (exit code, lines for stdout); errors are `OpError` (one line for stderr).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence

from reconciler import spec as specmod
from reconciler.agent import clusterspec
from reconciler.published import SpecFile, SpecRevision
from reconciler.spec import changes, edit, files as specfiles, loader
from reconciler.store import SpecConflict, Store

TELL_ATTEMPTS = 5  # `tell` re-reads and edits again when another revision came first


class OpError(Exception):
    """One line for stderr; the command exits 1 (diff: 2)."""


def _stored(rev: SpecRevision | None, *, spec_path: str, local: dict) -> specmod.Spec | None:
    if rev is None:
        return None
    try:
        return clusterspec.load_revision(rev, spec_path=spec_path, local=local)
    except specmod.SpecError as exc:
        raise OpError(f"the store's revision {rev.number} does not load here: {exc}") from None


def _text_diff(old: Sequence[SpecFile], new: Sequence[SpecFile]) -> list[str]:
    a = {f.name: f.text for f in old}
    b = {f.name: f.text for f in new}
    out: list[str] = []
    for name in sorted(set(a) | set(b)):
        out.extend(line.rstrip("\n") for line in difflib.unified_diff(
            a.get(name, "").splitlines(keepends=True), b.get(name, "").splitlines(keepends=True),
            fromfile=f"store/{name}" if name in a else "/dev/null", tofile=f"local/{name}" if name in b else "/dev/null"))
    return out


async def compare(store: Store, path: str, *, node_file: str | None, local: dict) -> tuple[
        SpecRevision | None, specmod.Spec | None, specmod.Spec, tuple[SpecFile, ...], list[str]]:
    """(the store's revision, it as a Spec, PATH as a Spec, PATH's files, the change lines)."""
    try:
        new = loader.load(path, node_file=node_file)
        files = specfiles.revision_files(path)
    except specmod.SpecError as exc:
        raise OpError(str(exc)) from None
    rev = await store.spec_get()
    old = _stored(rev, spec_path=path, local=local)
    return rev, old, new, files, changes.changes(old, new)


def _same(rev: SpecRevision | None, files: Sequence[SpecFile], path: str) -> bool:
    if rev is None:
        return False
    return clusterspec.comparable_hash(files, path) == clusterspec.comparable_hash(rev.files, path)


async def diff(store: Store, path: str, *, node_file: str | None, local: dict) -> tuple[int, list[str]]:
    """kubectl's convention: 0 equal, 1 different (errors: OpError, exit 2)."""
    rev, _old, _new, files, lines = await compare(store, path, node_file=node_file, local=local)
    if _same(rev, files, path):
        return 0, [f"{path}: the same as revision {rev.number if rev else 0}"]
    head = f"revision {rev.number}" if rev else "the store (empty)"
    out = [f"{path} against {head}:"] + [f"  {c}" for c in lines or ["(layout or comments only)"]]
    return 1, out + _text_diff(rev.files if rev else (), files)


async def apply(store: Store, path: str, *, node_file: str | None, local: dict, force: bool, dry_run: bool,
                base_of: Callable[[specmod.Spec], int | None], node: str = "") -> tuple[int, list[str]]:
    """Publish PATH as the next revision. `base_of(spec)`: the revision an agent on this
    machine last synced PATH with (None: none does): files edited on an older revision than
    the store's are refused unless `force`."""
    rev, old, new, files, lines = await compare(store, path, node_file=node_file, local=local)
    number = rev.number if rev else 0
    if _same(rev, files, path):
        return 0, [f"{path}: already revision {number}, nothing to apply"]
    out = [f"{path} -> revision {number + 1}:"] + [f"  {c}" for c in lines or ["(layout or comments only)"]]
    if dry_run:
        from reconciler.agent import dryrun  # (only a dry run simulates: it observes this machine too)

        if node:
            out += [f"then, as {node} sees the cluster (every node's steps, each taken as succeeding):"]
            out += [f"  {line}" for line in await dryrun.edit_transition(new, old, node)]
        return 0, out + ["(dry run: nothing applied)"]
    base = base_of(new)
    if base is not None and base != number and not force:
        raise OpError(f"{path}: made on revision {base}, the cluster is at revision {number}: refused"
                      " (`reconcile diff` shows what would change; --force applies it anyway)")
    if old is not None:
        try:
            loader.check_replacement(old, new, path)
        except specmod.SpecError as exc:
            raise OpError(str(exc)) from None
    try:
        stored = await clusterspec.publish(store, files, new, base=number, previous=old, author=clusterspec.cli_author())
    except SpecConflict as exc:
        raise OpError(f"{path}: the cluster spec moved to revision {exc.current} meanwhile: refused, nothing applied"
                      " (run it again)") from None
    return 0, out + [f"applied: revision {stored.number}"]


class NoClusterSpec(Exception):
    """The store holds no cluster spec yet: a command may work on the local files instead."""


async def tell(store: Store, group: str, runlevel: str, *, spec_path: str, local: dict) -> tuple[int, list[str]]:
    """Set GROUP's runlevel in the store's spec: a new revision, comments kept. NoClusterSpec
    if the store holds none yet (the local files are then the spec: the first agent seeds it)."""
    for _attempt in range(TELL_ATTEMPTS):
        rev = await store.spec_get()
        if rev is None:
            raise NoClusterSpec()
        spec = _stored(rev, spec_path=spec_path, local=local)
        assert spec is not None
        g = spec.groups.get(group)
        if g is None:
            known = ", ".join(spec.groups) or "none"
            raise OpError(f"revision {rev.number}: groups.{group}: unknown group {group!r} (known: {known})")
        if runlevel != specmod.STOP and runlevel not in g.levels():
            raise OpError(f"{g.source}: groups.{group}.runlevel: no entry of {group} mentions runlevel {runlevel!r}"
                          f" (known: {', '.join(g.levels())}, stop)")
        if g.runlevel == runlevel:
            return 0, [f"{group}: runlevel {runlevel} already (revision {rev.number})"]
        name = g.source.rpartition("/")[2]
        try:
            files = tuple(SpecFile(f.name, edit.set_runlevel(f.text, group, runlevel, file=g.source) if f.name == name
                                   else f.text) for f in rev.files)
            new = loader.load_texts([(f.name, f.text) for f in files], spec_path=spec_path, local=local,
                                    origin=clusterspec.origin(rev.number + 1))
        except specmod.SpecError as exc:
            raise OpError(str(exc)) from None
        try:
            stored = await clusterspec.publish(store, files, new, base=rev.number, previous=spec,
                                               author=clusterspec.cli_author())
        except SpecConflict:
            continue  # another revision came first: edit that one
        return 0, [f"{group}: runlevel {runlevel} (revision {stored.number}; the agents write it into their files)"]
    raise OpError(f"{store.url}: the cluster spec kept changing: {group} not changed after {TELL_ATTEMPTS} attempts")


async def history(store: Store) -> tuple[int, list[str]]:
    revs = await store.spec_history()
    if not revs:
        return 0, ["the store holds no cluster spec yet"]
    out = []
    for r in revs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.wall)) if r.wall else "-"
        out.append(f"{r.number:>5}  {when}  {r.node or '-':<20}  {r.digest}  {r.summary}")
    return 0, out


async def rollback(store: Store, number: int, *, spec_path: str, local: dict) -> tuple[int, list[str]]:
    """Publish revision NUMBER's files again, as the next revision."""
    old = await store.spec_get(number)
    if old is None:
        raise OpError(clusterspec.unknown_revision(number, await store.spec_history()))
    rev = await store.spec_get()
    assert rev is not None  # (revision `number` exists)
    if rev.number == number:
        return 0, [f"revision {number} is the current one: nothing to roll back"]
    current = _stored(rev, spec_path=spec_path, local=local)
    try:
        new = clusterspec.load_revision(old, spec_path=spec_path, local=local)
    except specmod.SpecError as exc:
        raise OpError(f"revision {number} does not load here: {exc}") from None
    try:
        stored = await clusterspec.publish(store, old.files, new, base=rev.number, previous=current,
                                           author=clusterspec.cli_author(),
                                           summary=f"rollback to revision {number}: {changes.one_line(current, new)}")
    except SpecConflict as exc:
        raise OpError(f"the cluster spec moved to revision {exc.current} meanwhile: nothing rolled back (run it again)") from None
    return 0, [f"revision {stored.number}: the files of revision {number} ({stored.summary})"]


__all__ = ["NoClusterSpec", "OpError", "apply", "compare", "diff", "history", "rollback", "tell"]
