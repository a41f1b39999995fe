"""The spec's texts on disk, for keeping a node's spec files in step with the store's revision.

A node is in step with revision R when its spec files, local keys stripped (local.py), hold
R's texts: a directory spec file by file (its *.toml but node.toml), a one-file spec as R's
files concatenated in name order (`comparable`). Writing R back (`write_back`) replaces each
file atomically (temp file, fsync, rename; through symbolic links, as `reconcile tell`), with
this node's local keys put back where its spec files held them. Nothing is ever lost: a file
of a directory spec that R does not have is moved aside (`NAME.removed-rR`), and the text a
first write-back replaces is kept (`NAME.before-rR`); neither name ends in .toml, so neither
is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from reconciler.published import SpecFile
from reconciler.spec.loader import spec_files
from reconciler.spec.local import LOCAL_KEYS, NODE_FILE, local_items, put_local, strip_local
from reconciler.spec.model import SpecError
from reconciler.spec.strictmodes import check_permissions

__all__ = [
    "Layout",
    "comparable",
    "concatenate",
    "files_local",
    "layout",
    "normal",
    "read_stripped",
    "replace_file",
    "revision_files",
    "texts_hash",
    "write_back",
]

ONE_FILE_NAME = "spec.toml"  # a one-file spec's name in a revision when its own is not NAME.toml
NEW_FILE_MODE = 0o644

Files = Iterable[SpecFile] | Iterable[tuple[str, str]]


@attrs.frozen
class Layout:
    """How a spec path holds its texts: a directory of files, or one file."""

    path: str
    directory: bool
    name: str = ""  # one-file spec: the name its text has in a revision and in `comparable`


def layout(spec_path: str | os.PathLike[str]) -> Layout:
    """A directory spec (an existing directory, or a path ending in /), else a one-file spec,
    named in a revision by its basename if that is NAME.toml (else spec.toml)."""
    p = str(spec_path)
    if os.path.isdir(p) or p.endswith("/"):
        return Layout(path=p, directory=True)
    base = os.path.basename(p)
    return Layout(path=p, directory=False, name=base if _valid_name(base) else ONE_FILE_NAME)


def _valid_name(name: str) -> bool:
    return name.endswith(".toml") and len(name) > 5 and "/" not in name and not name.startswith(".") and name != NODE_FILE and "\0" not in name


def _pairs(files: Files) -> list[tuple[str, str]]:
    out = [(f.name, f.text) if isinstance(f, SpecFile) else (f[0], f[1]) for f in files]
    for name, _text in out:
        if not _valid_name(name):  # (names come from the store: never a path)
            raise SpecError(f"{name[:40]!r} is not a spec file name (NAME.toml, not node.toml)", file=name)
    names = [n for n, _t in out]
    if len(set(names)) != len(names):
        raise SpecError("a file name is given twice", file=sorted(n for n in names if names.count(n) > 1)[0])
    return sorted(out)


def _read(path: Path | str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", file=str(path)) from None


def read_stripped(spec_path: str | os.PathLike[str]) -> dict[str, str]:
    """The node's spec texts, local keys stripped, by name (a directory's *.toml but
    node.toml; a one-file spec: its Layout.name). Only files the loader would trust are read."""
    lay = layout(spec_path)
    root = Path(spec_path)
    if lay.directory and not root.is_dir():
        raise SpecError("no such directory", file=str(root))
    check_permissions(root)
    out: dict[str, str] = {}
    for f in spec_files(root):
        if f != root:
            check_permissions(f)
        out[f.name if lay.directory else lay.name] = strip_local(_read(f), file=str(f))
    return out


def revision_files(spec_path: str | os.PathLike[str]) -> tuple[SpecFile, ...]:
    """The files a revision of this spec holds: its texts with the local keys stripped, sorted
    by name."""
    return tuple(SpecFile(name=n, text=t) for n, t in sorted(read_stripped(spec_path).items()))


def concatenate(files: Files) -> str:
    """The files' texts in name order, as one text (each but the last ending with a line
    break, one added if it has none). One file: its text."""
    texts = [t for _n, t in _pairs(files)]
    return "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))


def check_concatenation(files: Files, *, origin: str) -> str:
    """`concatenate(files)`, or SpecError if it would not mean what the files mean apart (a file
    that ends inside a table the next one's top-level keys would fall into, a table defined in
    two files). `origin` names them in the error ("revision 7")."""
    pairs = _pairs(files)
    text = concatenate(pairs)
    merged: dict[str, Any] = {}
    for name, t in pairs:
        try:
            data = tomllib.loads(t)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"not valid TOML: {exc}", file=f"{origin}/{name}") from None
        for key, value in data.items():
            if key in merged:
                both = sorted(set(merged[key]) & set(value)) if isinstance(merged[key], dict) and isinstance(value, dict) else [""]
                if both:
                    field = f"{key}.{both[0]}" if both[0] else key
                    raise SpecError("also defined in another file: the files cannot be joined into one", file=f"{origin}/{name}", field=field)
                value = {**merged[key], **value}
            merged[key] = value
    try:
        together = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"the files joined into one are not valid TOML ({exc}): a directory spec can hold them", file=origin) from None
    if together != merged:
        raise SpecError("the files joined into one would mean something else (a file ends inside a table): a directory spec can hold them", file=origin)
    return text


def comparable(files: Files, lay: Layout) -> dict[str, str]:
    """What a node's `read_stripped` must equal to be in step with a revision of these files:
    the files by name (a directory spec), or their concatenation under the node's one name."""
    pairs = _pairs(files)
    if lay.directory:
        return dict(pairs)
    return {lay.name: concatenate(pairs)}


def normal(text: str) -> str:
    """`text` as in-step comparisons see it: without blank lines and trailing blanks. Taking
    the local keys out and putting them back (tomlkit) moves blank lines and a comment's
    place next to them; such a difference is never an edit, and never a reason to rewrite."""
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def texts_hash(texts: Mapping[str, str]) -> str:
    """A sha256 (hex) of texts by name, each `normal`: what spec-sync.json keeps of the last
    texts in step."""
    return hashlib.sha256(json.dumps(sorted((n, normal(t)) for n, t in texts.items()), ensure_ascii=False).encode()).hexdigest()


def _shows(old: str, new: str, *, file: str) -> bool:
    """Does a file holding `old` show `new` already (the same text bar blank lines and where
    its local keys stand, with the same local keys)? Then it is left alone."""
    if old == new:
        return True
    try:
        return (normal(strip_local(old, file=file)) == normal(strip_local(new, file=file))
                and local_items(old, file=file) == local_items(new, file=file))
    except SpecError:
        return False


def files_local(spec_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The local keys this node's spec files themselves hold (not its node file's): what a
    write-back puts back, as `local`."""
    for f in spec_files(spec_path) if os.path.exists(spec_path) else []:
        items = local_items(_read(f), file=str(f), keep_format=True)  # (their comments go back with them)
        if items:
            return items
    return {}


def _holder(pairs: Sequence[tuple[str, str]], root: Path, origin: str) -> str:
    """Which of a revision's files takes the node's local keys back: the one with a [cluster]
    table, else the one that held them on disk, else the first."""
    for name, text in pairs:
        try:
            if "cluster" in tomllib.loads(text):
                return name
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"not valid TOML: {exc}", file=f"{origin}/{name}") from None
    names = [n for n, _t in pairs]
    for f in spec_files(root):
        if f.name in names and local_items(_read(f), file=str(f)):
            return f.name
    if not names:
        raise SpecError("the revision has no files: this node's local keys would be lost; move them to node.toml first", file=str(root))
    return names[0]


def write_back(spec_path: str | os.PathLike[str], files: Files, *, revision: int, local: Mapping[str, Any], first_sync: bool) -> list[str]:
    """Replace this node's spec files with revision `revision`'s `files`, `local` (files_local:
    the local keys the spec files held; none with a node file) put back into [cluster]. Each
    file that changes is replaced atomically (mode and owner kept; a new one 0644, root's when
    run as root), through symbolic links; with `first_sync` the text it replaces is kept as
    NAME.before-rR. A directory spec's *.toml that the revision lacks is moved aside to
    NAME.removed-rR (node.toml is never touched). A one-file spec takes the files joined
    (check_concatenation: refused, nothing written, if that would change their meaning).
    Returns the paths written, kept or moved aside, in order. Raises SpecError."""
    lay = layout(spec_path)
    root = Path(spec_path)
    origin = f"revision {revision}"
    pairs = _pairs(files)
    bad = sorted(set(local) - set(LOCAL_KEYS))
    if bad:
        raise SpecError("not a local key", file=str(root), field=f"cluster.{bad[0]}")
    targets: dict[Path, str] = {}
    if lay.directory:
        if not root.is_dir():
            raise SpecError("no such directory", file=str(root))
        holder = _holder(pairs, root, origin) if local else ""
        for name, text in pairs:
            targets[root / name] = put_local(text, local, file=f"{origin}/{name}") if name == holder else text
        gone = [f for f in spec_files(root) if f.name not in dict(pairs)]
    else:
        text = check_concatenation(pairs, origin=origin)
        targets[root] = put_local(text, local, file=origin) if local else text
        gone = []
    done: list[str] = []
    for path, text in targets.items():
        real = Path(os.path.realpath(path))
        old = _read(real) if real.exists() else None
        if old is not None and _shows(old, text, file=str(path)):
            continue
        st = os.stat(real) if old is not None else None
        if old is not None and first_sync:
            kept = _free(path.with_name(f"{path.name}.before-r{revision}"))
            replace_file(kept, old, like=st)
            done.append(str(kept))
        replace_file(real, text, like=st)
        done.append(str(path))
    for f in gone:
        aside = _free(f.with_name(f"{f.name}.removed-r{revision}"))
        os.rename(f, aside)  # (a link is moved, not what it leads to)
        done.append(str(aside))
    if gone:
        _fsync_dir(str(root))
    return done


def _free(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ...: a name nothing has yet (a backup never overwrites)."""
    candidate, i = path, 0
    while os.path.lexists(candidate):
        i += 1
        candidate = path.with_name(f"{path.name}.{i}")
    return candidate


def replace_file(path: str | os.PathLike[str], text: str, *, like: os.stat_result | None) -> None:
    """Write `text` to `path` atomically and durably: a temp file in the same directory,
    fsynced, renamed over it, the directory fsynced; a crash leaves the old file or the new
    one, never a part. Mode and owner of `like` (the file replaced), else 0644 (and root's
    when run as root)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".reconciler.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if like is not None:
                os.fchmod(fh.fileno(), stat.S_IMODE(like.st_mode))
                os.fchown(fh.fileno(), like.st_uid, like.st_gid)
            else:
                os.fchmod(fh.fileno(), NEW_FILE_MODE)
                if os.geteuid() == 0:
                    os.fchown(fh.fileno(), 0, 0)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
