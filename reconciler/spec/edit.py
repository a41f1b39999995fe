"""`reconcile tell`: change one group's desired runlevel in the spec file that defines it
(`tell`), or in a spec file's text (`set_runlevel`: for a revision's file, before publishing).

The file is edited as a TOML document (tomlkit), so any valid layout works (a
`[groups.web]` header, dotted keys `groups.web.runlevel = "run"`, inline tables, a
`[groups]` table with `web.runlevel = ...`) and the operator's comments and layout survive.
The result is parsed again and must differ from the original in exactly that one value
before it replaces the file (atomically, same mode and owner, fsynced). A symbolic link is
written through (its target is replaced, the link stays); a file without the owner's write
bit is refused.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Sequence
from typing import Any

import tomlkit
import tomlkit.exceptions

from reconciler import spec as specmod
from reconciler.spec.files import replace_file


def tell(spec_path: str, group: str, runlevel: str) -> str:
    """Set groups.GROUP.runlevel; returns the file written. Raises SpecError, writes nothing on error."""
    spec = specmod.load(spec_path)
    g = spec.groups.get(group)
    if g is None:
        known = ", ".join(spec.groups) or "none"
        raise specmod.SpecError(f"unknown group {group!r} (known: {known})", file=spec_path, field=f"groups.{group}")
    if runlevel != specmod.STOP and runlevel not in g.levels():
        raise specmod.SpecError(
            f"no entry of {group} mentions runlevel {runlevel!r} (known: {', '.join(g.levels())}, stop)",
            file=g.source, field=f"groups.{group}.runlevel",
        )
    path = g.source
    # Through symbolic links: the file the link leads to is rewritten, the link is kept.
    real = os.path.realpath(path)
    st = os.stat(real)
    if not st.st_mode & stat.S_IWUSR:  # root could write it anyway: the mode is the owner's word
        raise specmod.SpecError(
            f"read-only (mode {stat.S_IMODE(st.st_mode):o}): not changed; make it writable to use tell", file=path
        )
    with open(real, encoding="utf-8") as fh:
        text = fh.read()
    replace_file(real, set_runlevel(text, group, runlevel, file=path), like=st)
    return path


def set_runlevel(text: str, group: str, runlevel: str, *, file: str) -> str:
    """`text` (one spec file's) with groups.GROUP.runlevel set to `runlevel`, comments and
    layout kept; the result must differ from `text` in exactly that one value. Whether the
    runlevel is one the group knows is the caller's check (a whole spec's: `tell`, or the
    revision loaded again). Raises SpecError naming `file`."""
    field = f"groups.{group}.runlevel"
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise specmod.SpecError(f"not valid TOML: {exc}", file=file) from None
    groups = before.get("groups")
    if not isinstance(groups, dict) or not isinstance(groups.get(group), dict):
        raise specmod.SpecError(f"no group {group!r} in this file", file=file, field=f"groups.{group}")
    new_text = _rewrite(text, group, runlevel, file)
    groups[group]["runlevel"] = runlevel
    if before != tomllib.loads(new_text):
        raise specmod.SpecError("could not rewrite the runlevel line safely; edit the file by hand", file=file, field=field)
    return new_text


def _rewrite(text: str, group: str, runlevel: str, path: str) -> str:
    field = f"groups.{group}.runlevel"
    try:
        doc = tomlkit.parse(text)
        table: Any = doc["groups"][group]
        table["runlevel"] = runlevel
        return tomlkit.dumps(doc)
    except (tomlkit.exceptions.TOMLKitError, KeyError, TypeError) as exc:
        raise specmod.SpecError(f"cannot edit this file's layout ({exc}); edit it by hand", file=path, field=field) from None


def set_runlevel_in(files: Sequence[tuple[str, str]], group: str, runlevel: str, *, origin: str) -> list[tuple[str, str]]:
    """A revision's files ((name, text) pairs) with `set_runlevel` applied to the one file that
    defines GROUP; the others unchanged. Raises SpecError naming `f"{origin}/{name}"`."""
    out = list(files)
    for i, (name, text) in enumerate(out):
        try:
            groups = tomllib.loads(text).get("groups")
        except tomllib.TOMLDecodeError as exc:
            raise specmod.SpecError(f"not valid TOML: {exc}", file=f"{origin}/{name}") from None
        if isinstance(groups, dict) and group in groups:
            out[i] = (name, set_runlevel(text, group, runlevel, file=f"{origin}/{name}"))
            return out
    raise specmod.SpecError(f"unknown group {group!r}", file=origin, field=f"groups.{group}")
