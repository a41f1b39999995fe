"""`reconcile tell`: change one group's desired runlevel in the spec file that defines it.

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
    new_text = _rewrite(text, group, runlevel, path)
    before, after = tomllib.loads(text), tomllib.loads(new_text)
    before["groups"][group]["runlevel"] = runlevel
    if before != after:
        raise specmod.SpecError("could not rewrite the runlevel line safely; edit the file by hand", file=path, field=f"groups.{group}.runlevel")
    replace_file(real, new_text, like=st)
    return path


def _rewrite(text: str, group: str, runlevel: str, path: str) -> str:
    field = f"groups.{group}.runlevel"
    try:
        doc = tomlkit.parse(text)
        table: Any = doc["groups"][group]
        table["runlevel"] = runlevel
        return tomlkit.dumps(doc)
    except (tomlkit.exceptions.TOMLKitError, KeyError, TypeError) as exc:
        raise specmod.SpecError(f"cannot edit this file's layout ({exc}); edit it by hand", file=path, field=field) from None
