"""Loading a spec: TOML files (or a revision's texts) -> the frozen classes of `reconciler.spec`.

The converter (convert.py) turns each table into its class strictly; every problem becomes a
one-line SpecError naming the file and the field path. Cross-field rules that a type cannot
express (unique tags, known runlevels, each duration's range, a safe timing budget) are
checked after structuring, in `validate`. Which files may be read at all:
`reconciler.strictmodes`. Whether a new spec may replace the running one: `check_replacement`.
What is this node's own (the local keys, the node file): local.py.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from reconciler.spec.convert import structure
from reconciler.spec.local import NODE_FILE, check_local, load_node_file, overlay
from reconciler.spec.model import LOCAL_KEYS, STOP, Cluster, Group, Spec, SpecError, _FieldError, _name
from reconciler.spec.rules import validate
from reconciler.spec.strictmodes import check_permissions, read_secret

__all__ = [
    "check_permissions",
    "check_replacement",
    "load",
    "load_texts",
    "local_settings",
    "node_file_of",
    "peek",
    "spec_files",
    "validate",
]

# --- the files ---------------------------------------------------------------------


def spec_files(path: str | os.PathLike[str]) -> list[Path]:
    """The spec files of a spec path: the file itself, or a directory's *.toml files (not
    hidden ones, not the node file), sorted by name."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix == ".toml" and f.is_file() and not f.name.startswith(".") and f.name != NODE_FILE)
    return [p]


def node_file_of(path: str | os.PathLike[str], node_file: str | os.PathLike[str] | None = None) -> Path | None:
    """The node file that applies to the spec at `path`: `node_file` if given, else a
    directory spec's node.toml if there is one."""
    if node_file is not None:
        return Path(node_file)
    p = Path(path)
    if p.is_dir() and os.path.lexists(p / NODE_FILE):
        return p / NODE_FILE
    return None


def _read(f: Path | str, fname: str, text: str | None = None) -> dict[str, Any]:
    """One spec file's data (from disk, or `text`), with only the tables a spec file may have."""
    try:
        if text is None:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        else:
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}", file=fname) from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays/tables
        raise SpecError("not valid TOML: nested too deeply", file=fname) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", file=fname) from None
    extra = set(data) - {"cluster", "groups"}
    if extra:
        raise SpecError(f"unknown table{'s' if len(extra) > 1 else ''} {', '.join(sorted(extra))}", file=fname, field=sorted(extra)[0])
    if "cluster" in data and not isinstance(data["cluster"], dict):
        raise SpecError("must be a table", file=fname, field="cluster")
    return data


def _read_files(root: Path, files: Sequence[Path]) -> list[tuple[str, dict[str, Any]]]:
    check_permissions(root)  # the whole path: its ancestors and any link's target too
    out = []
    for f in files:
        if f != root:
            check_permissions(f)
        out.append((str(f), _read(f, str(f))))
    return out


def _spec_local(parsed: Sequence[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], str]:
    """(the local items the spec files' [cluster] sets, the file that holds [cluster])."""
    for fname, data in parsed:
        if "cluster" in data:
            return {k: v for k, v in data["cluster"].items() if k in LOCAL_KEYS}, fname
    return {}, ""


# --- building a Spec -----------------------------------------------------------------


@attrs.frozen
class _Local:
    """The local items to apply over [cluster], and the file each one comes from."""

    items: Mapping[str, Any]
    origin: Mapping[str, str]  # key -> file


def _assemble(parsed: Sequence[tuple[str, dict[str, Any]]], *, base: str, files: tuple[str, ...], local: _Local, node_file: str | None) -> Spec:
    cluster_raw: dict[str, Any] | None = None
    cluster_file = ""
    groups: dict[str, Group] = {}
    for fname, data in parsed:
        if "cluster" in data:
            if cluster_raw is not None:
                raise SpecError(f"[cluster] is also defined in {cluster_file}", file=fname, field="cluster")
            cluster_raw, cluster_file = data["cluster"], fname
        raw_groups = data.get("groups", {})
        if not isinstance(raw_groups, dict):
            raise SpecError("must be a table of groups", file=fname, field="groups")
        for name, raw in raw_groups.items():
            fpath = f"groups.{name}"
            try:
                _name(name, "group name")
            except _FieldError as exc:
                raise SpecError(str(exc), file=fname, field=fpath) from None
            if name in groups:
                raise SpecError(f"defined twice: here and in {groups[name].source}", file=fname, field=fpath)
            g = structure(raw, Group, fpath, fname)
            groups[name] = attrs.evolve(g, name=name, source=fname)
    default_file = cluster_file or (parsed[0][0] if parsed else node_file or base)
    raw = {k: v for k, v in (cluster_raw or {}).items() if k not in LOCAL_KEYS} | dict(local.items)
    cluster = structure(raw, Cluster, "cluster", default_file)
    cluster = _password_from_file(cluster, base, local.origin.get("etcd_password_file", default_file))
    spec = Spec(cluster=cluster, groups=groups, base=base, files=files, node_file=node_file)
    validate(spec, default_file)
    return spec


def _password_from_file(cluster: Cluster, base: str, cluster_file: str) -> Cluster:
    """`etcd_password_file`, relative to the spec's directory: read the password at load."""
    name = cluster.etcd_password_file
    if name is None:
        return cluster
    field = "cluster.etcd_password_file"
    if cluster.etcd_password is not None:
        raise SpecError("set etcd_password or etcd_password_file, not both", file=cluster_file, field=field)
    path = name if os.path.isabs(name) else os.path.join(base, name)
    return attrs.evolve(cluster, etcd_password=read_secret(path, file=cluster_file, field=field))


def _base(root: Path) -> str:
    return str(root if root.is_dir() else root.parent)


# --- loading -------------------------------------------------------------------------


def load(path: str | os.PathLike[str], *, node_file: str | os.PathLike[str] | None = None, allow_empty: bool = False) -> Spec:
    """Load and validate a spec file or directory, with its node file applied (`node_file`,
    else a directory spec's node.toml); raise SpecError (one line) on any problem.

    A directory with no spec file but a node file (a node that gets the spec from the store)
    loads as a spec with no groups; so does an empty directory if `allow_empty`."""
    root = Path(path)
    if not root.exists():
        raise SpecError("no such file or directory", file=str(root))
    files = spec_files(root)
    nf = node_file_of(root, node_file)
    if not files and not (nf is not None or allow_empty):
        raise SpecError("no *.toml files in this directory", file=str(root))
    parsed = _read_files(root, files) if files else []
    if not files:
        check_permissions(root)
    spec_items, spec_file = _spec_local(parsed)
    node_items = load_node_file(nf) if nf is not None else {}
    items = overlay(spec_items, node_items)
    origin = {k: (str(nf) if k in node_items else spec_file) for k in items}
    return _assemble(parsed, base=_base(root), files=tuple(str(f) for f in files), local=_Local(items, origin), node_file=None if nf is None else str(nf))


def local_settings(path: str | os.PathLike[str], *, node_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """This node's local items (LOCAL_KEYS) as written: the spec files' [cluster] local keys
    overlaid by the node file's (`node_file`, else a directory spec's node.toml). Values are
    checked (types, the store's form); an etcd_password_file stays a path (relative ones
    resolve against the spec's directory, as in the spec). Raises SpecError."""
    root = Path(path)
    if not root.exists():
        raise SpecError("no such file or directory", file=str(root))
    files = spec_files(root)
    parsed = _read_files(root, files) if files else []
    spec_items, spec_file = _spec_local(parsed)
    if spec_items:
        check_local(spec_items, file=spec_file)
    nf = node_file_of(root, node_file)
    return overlay(spec_items, load_node_file(nf) if nf is not None else {})


def load_texts(
    files: Sequence[tuple[str, str]], *, spec_path: str | os.PathLike[str], local: Mapping[str, Any], origin: str
) -> Spec:
    """The spec that `files` ((name, text) pairs: a revision's) would be at `spec_path`, with
    this node's `local` items (local_settings) applied over [cluster]; validated as `load`
    does. Errors, and each Group.source, name `f"{origin}/{name}"` (origin: "revision 7").
    A text that sets a local key is refused: a revision holds the cluster's part only."""
    root = Path(spec_path)
    parsed = []
    for name, text in sorted(files):
        fname = f"{origin}/{name}"
        data = _read(fname, fname, text)
        for k in LOCAL_KEYS:
            if k in data.get("cluster", {}):
                raise SpecError("a revision holds no local keys (they are each node's own: node.toml)", file=fname, field=f"cluster.{k}")
        parsed.append((fname, data))
    bad = sorted(set(local) - set(LOCAL_KEYS))
    if bad:
        raise SpecError(f"not a local key (local keys: {', '.join(LOCAL_KEYS)})", file=f"{origin} (this node's settings)", field=f"cluster.{bad[0]}")
    directory = root.is_dir()
    on_disk = tuple(str(root / n) for n, _t in sorted(files)) if directory else (str(root),)
    nf = node_file_of(root) if directory else None
    return _assemble(parsed, base=_base(root), files=on_disk, local=_Local(dict(local), {}), node_file=None if nf is None else str(nf))


def check_replacement(current: Spec, new: Spec, path: str | os.PathLike[str]) -> None:
    """Refuse a new spec that would stop every group the current one runs, by removing them
    all (an emptied file, `: > spec.toml`; a directory whose files were deleted), unless it
    says so with `[cluster] stop_all = true`. A group set to runlevel "stop" by name is the
    operator's word and is not refused; neither is a first start with an empty spec."""
    if new.cluster.stop_all:
        return
    running = [n for n, g in current.groups.items() if g.runlevel != STOP]
    if not running or any(n in new.groups for n in running):
        return
    shown = ", ".join(running[:3]) + (f" and {len(running) - 3} more" if len(running) > 3 else "")
    raise SpecError(
        f"would stop every group that runs ({shown}) by removing it: refused, the last good spec stays;"
        ' to stop them all, set stop_all = true in [cluster] (or each group\'s runlevel to "stop")',
        file=str(path),
        field="groups",
    )


def peek(path: str | os.PathLike[str], *, node_file: str | os.PathLike[str] | None = None) -> Spec:
    """Only the [cluster] table of a spec that does not load as a whole (with its node file
    applied), with no groups.

    For read-only commands (`reconcile status`) after a bad edit: the agents still run the
    last good spec, and showing what they publish needs only the store's address. Raises
    SpecError if even the [cluster] table cannot be read, or the node file does not load.
    """
    root = Path(path)
    files = spec_files(root)
    base = _base(root)
    nf = node_file_of(root, node_file)
    node_items = load_node_file(nf) if nf is not None else {}  # (bad: the store is unknown, say so)
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            continue
        if isinstance(data.get("cluster"), dict):
            raw = data["cluster"]
            if node_items:
                raw = {k: v for k, v in raw.items() if k not in LOCAL_KEYS} | overlay({k: v for k, v in raw.items() if k in LOCAL_KEYS}, node_items)
            cluster = structure(raw, Cluster, "cluster", str(f))
            origin = str(nf) if "etcd_password_file" in node_items else str(f)
            return Spec(cluster=_password_from_file(cluster, base, origin), groups={}, base=base, files=(str(f),))
    if node_items or (files and all(f.exists() for f in files)):
        cluster = structure(dict(node_items), Cluster, "cluster", str(nf))
        return Spec(cluster=_password_from_file(cluster, base, str(nf)), groups={}, base=base, files=tuple(str(f) for f in files))
    raise SpecError("no readable [cluster] table", file=str(root))
