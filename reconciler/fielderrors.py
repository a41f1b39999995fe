"""Where in a value cattrs failed: its exception groups -> (field path, one-line message).

The spec's loader and the published status record both structure untrusted input with a
strict cattrs converter and report the first problem as one line naming the field
(`groups.web.entries[1].mode`, `status.groups.web.entries.db.state`); this is that walk,
once. Pure: no I/O.
"""

from __future__ import annotations

import re

import cattrs


class FieldError(ValueError):
    """Raised inside structure hooks: `message` about the value at `sub`, a further path
    segment inside it (`[2]` of an argv, `.NAME` of a table), below where cattrs was."""

    def __init__(self, message: str, sub: str = ""):
        super().__init__(message)
        self.sub = sub


def first_error(exc: BaseException, path: str = "", *, brief: bool = False) -> tuple[str, str]:
    """Walk `exc` (what a cattrs structure call raised) to its first leaf: (the field path
    below `path`, what is wrong). `brief` clips what the input itself may make long (unknown
    keys, a library's message), for values read from peers."""
    if isinstance(exc, cattrs.errors.ForbiddenExtraKeysError):
        names = sorted(str(k)[:40] if brief else str(k) for k in exc.extra_fields)
        return path, f"unknown field{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            seg = ""
            for note in getattr(sub, "__notes__", []):
                note = str(note)
                if "@ attribute " in note:
                    seg = "." + note.rsplit("@ attribute ", 1)[1].strip()
                elif "@ index " in note:
                    seg = f"[{note.rsplit('@ index ', 1)[1].strip()}]"
            return first_error(sub, path + seg, brief=brief)
    if isinstance(exc, FieldError):
        return path + exc.sub, str(exc)
    if isinstance(exc, KeyError):
        key = f".{exc.args[0]}"  # cattrs' note usually named the attribute already
        return (path if path.endswith(key) else path + key), "is required"
    if isinstance(exc, TypeError) and "missing" in str(exc):
        missing = re.findall(r"'(\w+)'", str(exc))
        return (path + "." + missing[0]) if missing else path, "is required"
    return path, f"invalid value ({str(exc)[:80] if brief else exc})"
