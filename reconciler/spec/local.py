"""What is this node's own in a spec: the local keys of [cluster], and the node file.

A node needs some settings before it can reach the store (where the cluster's spec is), and
some differ from node to node: these are the local keys (`LOCAL_KEYS`). Everything else
(`cluster.name`, `cluster.timing`, `cluster.stop_all`, every group) is the same on every node
and is what the store's revisions hold. The local keys are kept out of a revision: they are
stripped from a spec file's text before it is published, and put back (for a node whose spec
files hold them) when a revision is written to its files.

The node file (`node.toml` in a directory spec, `--node-file PATH` for a one-file spec) holds
only local keys, in a [cluster] table; it is never published and never written back. Its
keys win over the spec files' (node file > spec files' [cluster] > defaults).

The texts are edited as TOML documents (tomlkit): comments and layout survive. Every edit is
parsed again and must mean exactly what was asked, or it is refused with a SpecError.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

import tomlkit
import tomlkit.exceptions

from reconciler.spec.convert import structure
from reconciler.spec.model import LOCAL_KEYS, Cluster, Spec, SpecError
from reconciler.spec.rules import validate
from reconciler.spec.strictmodes import check_permissions

__all__ = ["LOCAL_KEYS", "NODE_FILE", "PASSWORD_KEYS", "check_local", "load_node_file", "local_items", "overlay", "put_local", "strip_local"]

NODE_FILE = "node.toml"
# The password comes as one of two keys: a node file that sets either replaces both (a spec
# file's etcd_password and the node file's etcd_password_file would be "set both").
PASSWORD_KEYS = ("etcd_password", "etcd_password_file")
_LOCAL_LIST = ", ".join(LOCAL_KEYS)


def _plain(text: str, file: str) -> dict[str, Any]:
    """`text` as tomllib reads it (a tenth of tomlkit's time: a file without local keys, most
    of a directory spec, is never given to tomlkit)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}", file=file) from None
    except RecursionError:
        raise SpecError("not valid TOML: nested too deeply", file=file) from None


def _parse(text: str, file: str) -> tuple[tomlkit.TOMLDocument, dict[str, Any]]:
    try:
        plain = tomllib.loads(text)
        return tomlkit.parse(text), plain
    except (tomllib.TOMLDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise SpecError(f"not valid TOML: {exc}", file=file) from None
    except RecursionError:
        raise SpecError("not valid TOML: nested too deeply", file=file) from None


def _cluster_of(plain: dict[str, Any], file: str) -> dict[str, Any]:
    c = plain.get("cluster", {})
    if not isinstance(c, dict):
        raise SpecError("must be a table", file=file, field="cluster")
    return c


def local_items(text: str, *, file: str, keep_format: bool = False) -> dict[str, Any]:
    """The local keys this text's [cluster] table sets, as written (values not checked).
    `keep_format`: as tomlkit items where the table allows, so that `put_local` puts them
    back with their comments (`store = "..."  # why`), not only their values."""
    plain = _plain(text, file)
    c = _cluster_of(plain, file)
    out = {k: c[k] for k in LOCAL_KEYS if k in c}
    if keep_format and out:
        doc, _ = _parse(text, file)
        try:
            table: Any = doc["cluster"]
            out = {k: table.item(k) for k in out}
        except (tomlkit.exceptions.TOMLKitError, KeyError, AttributeError, TypeError):
            pass  # a layout without one [cluster] table: the values alone
    return out


def _expected(plain: dict[str, Any], items: Mapping[str, Any], file: str) -> dict[str, Any]:
    """What `plain` must parse to once its local keys are exactly `items`."""
    out = dict(plain)
    c = {k: v for k, v in _cluster_of(plain, file).items() if k not in LOCAL_KEYS}
    c.update(items)
    if c or "cluster" in plain:
        out["cluster"] = c
    return out


def _same(new_text: str, expected: dict[str, Any]) -> bool:
    """Whether `new_text` means `expected` (an empty [cluster] table, or none, alike)."""
    try:
        got = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        return False
    return _no_empty_cluster(got) == _no_empty_cluster(expected)


def _no_empty_cluster(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (k == "cluster" and v == {})}


def strip_local(text: str, *, file: str) -> str:
    """`text` without the local keys of its [cluster] table, the rest kept as tomlkit keeps it
    (comments, order, blank lines; an emptied [cluster] header stays). A text without local
    keys is returned unchanged, byte for byte."""
    plain = _plain(text, file)
    c = _cluster_of(plain, file)
    present = [k for k in LOCAL_KEYS if k in c]
    if not present:
        return text
    doc, _ = _parse(text, file)
    try:
        # Each piece of the document that defines part of [cluster]: the table, an inline
        # table, or one `cluster.KEY = ...` line each (tomlkit's proxy over dotted keys
        # cannot delete).
        for key, piece in doc.body:
            item: Any = piece
            if key is not None and key.key == "cluster" and hasattr(item, "keys"):
                for k in [k for k in item.keys() if k in LOCAL_KEYS]:
                    del item[k]
        new_text = tomlkit.dumps(doc)
    except (tomlkit.exceptions.TOMLKitError, KeyError, TypeError, IndexError) as exc:
        raise SpecError(f"cannot take the local keys out of this layout ({exc}); use a [cluster] table", file=file, field="cluster") from None
    if not _same(new_text, _expected(plain, {}, file)):
        raise SpecError("cannot take the local keys out of this layout safely; use a [cluster] table", file=file, field="cluster")
    return new_text


def put_local(text: str, items: Mapping[str, Any], *, file: str) -> str:
    """`text` whose [cluster] table holds exactly the local keys `items` (others removed, these
    set; a [cluster] table is added at the top if there is none). No items: `strip_local`."""
    bad = sorted(set(items) - set(LOCAL_KEYS))
    if bad:
        raise SpecError(f"not a local key (local keys: {_LOCAL_LIST})", file=file, field=f"cluster.{bad[0]}")
    stripped = strip_local(text, file=file)
    if not items:
        return stripped
    doc, plain = _parse(stripped, file)
    expected = _expected(plain, items, file)
    candidates: list[str] = []
    try:
        if "cluster" in doc:
            table: Any = doc["cluster"]
            for k in LOCAL_KEYS:
                if k in items:
                    table[k] = items[k]
            candidates.append(tomlkit.dumps(doc))
        else:
            new = tomlkit.table()
            for k in LOCAL_KEYS:
                if k in items:
                    new[k] = items[k]
            # At the top, where people look for it; a text that starts with top-level keys
            # (`groups.web.runlevel = ...`) cannot take a table above them: then at the end.
            candidates.append(tomlkit.dumps({"cluster": new}) + ("\n" if stripped.strip() else "") + stripped)
            doc["cluster"] = new
            candidates.append(tomlkit.dumps(doc))
    except (tomlkit.exceptions.TOMLKitError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise SpecError(f"cannot put the local keys into this layout ({exc}); use a [cluster] table", file=file, field="cluster") from None
    for new_text in candidates:
        if _same(new_text, expected):
            return new_text
    raise SpecError("cannot put the local keys into this layout safely; use a [cluster] table", file=file, field="cluster")


def check_local(items: Mapping[str, Any], *, file: str) -> None:
    """Raise SpecError (naming `file` and the field) unless `items` are valid local settings:
    local keys only, of the right types, a store and membership of the known forms."""
    bad = sorted(set(items) - set(LOCAL_KEYS))
    if bad:
        raise SpecError(f"not a local key (local keys: {_LOCAL_LIST})", file=file, field=f"cluster.{bad[0]}")
    cluster: Cluster = structure(dict(items), Cluster, "cluster", file)
    validate(Spec(cluster=cluster, groups={}), file)


def load_node_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The local items of a node file: only a [cluster] table of local keys, checked like a
    spec's (types, the store's and membership's forms; who may write it, as for spec files).
    Raises SpecError naming the file and field."""
    fname = str(path)
    resolved = check_permissions(fname)
    try:
        with open(resolved, "rb") as fh:
            text = fh.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", file=fname) from None
    try:
        plain = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}", file=fname) from None
    except RecursionError:
        raise SpecError("not valid TOML: nested too deeply", file=fname) from None
    for key in plain:
        if key != "cluster":
            raise SpecError(f"the node file holds only [cluster] local keys ({_LOCAL_LIST})", file=fname, field=key)
    c = _cluster_of(plain, fname)
    for key in c:
        if key not in LOCAL_KEYS:
            raise SpecError(
                f"the node file holds only [cluster] local keys ({_LOCAL_LIST}); this one is the cluster's, it belongs in the spec",
                file=fname,
                field=f"cluster.{key}",
            )
    check_local(c, file=fname)
    return dict(c)


def overlay(spec_items: Mapping[str, Any], node_items: Mapping[str, Any]) -> dict[str, Any]:
    """The local items in force: the node file's over the spec files' (a node file that sets
    the password either way replaces both ways of the spec files)."""
    out = dict(spec_items)
    if any(k in node_items for k in PASSWORD_KEYS):
        for k in PASSWORD_KEYS:
            out.pop(k, None)
    out.update(node_items)
    return out

