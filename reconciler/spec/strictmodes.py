"""Which files the loader may trust: sshd's StrictModes for every path a spec is read from.

A spec runs commands as root, so a spec file, its directory, every directory above them and
everything a symbolic link on the way points at must be beyond the reach of other users.
The path is resolved as the kernel would, one component at a time, so a link's target (each
of its own components, up to `/`) is checked like the path itself. Every component must be
owned by root or by this process's effective user and not be writable by group or others;
the one exception is a root-owned sticky directory (like /tmp) as an ancestor, in which
nobody else can rename or replace what is there. A secret (`etcd_password_file`) may not be
readable by group or others either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reconciler.spec.model import SpecError, _FieldError, no_control

_MAX_LINKS = 40  # the kernel's ELOOP limit
_MAX_SECRET = 4096


def check_permissions(path: Path | str, *, secret: bool = False) -> str:
    """Raise SpecError (naming the offending path) unless only root or this user can change
    `path`; return the path resolved."""
    return _walk(str(path), secret=secret, final=True, depth=0)


def _walk(path: str, *, secret: bool, final: bool, depth: int) -> str:
    if depth > _MAX_LINKS:
        raise SpecError("too many levels of symbolic links: refused", file=path)
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    parts = [p for p in path.split("/") if p and p != "."]
    cur = "/"
    _check(cur, _lstat(cur), final=final and not parts, secret=secret)
    for i, part in enumerate(parts):
        last = final and i == len(parts) - 1
        if part == "..":
            cur = os.path.dirname(cur)  # cur is resolved already: its parent is the real one
            if last:
                _check(cur, _lstat(cur), final=True, secret=secret)
            continue
        nxt = os.path.join(cur, part)
        st = _lstat(nxt)
        if stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing; where it leads does
            try:
                target = os.readlink(nxt)
            except OSError as exc:
                raise SpecError(f"cannot read the link: {exc.strerror or exc}", file=nxt) from None
            cur = _walk(target if os.path.isabs(target) else os.path.join(cur, target), secret=secret, final=last, depth=depth + 1)
        else:
            _check(nxt, st, final=last, secret=secret)
            cur = nxt
    return cur


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise SpecError(exc.strerror or str(exc), file=path) from None


def _check(path: str, st: os.stat_result, *, final: bool, secret: bool) -> None:
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise SpecError(f"owned by uid {st.st_uid}, not by root or uid {me}: refused", file=path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky_ancestor = not final and stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX and st.st_uid == 0
        if not sticky_ancestor:
            raise SpecError(f"writable by others (mode {mode:o}): refused", file=path)
    if secret and final and mode & (stat.S_IRGRP | stat.S_IROTH):
        raise SpecError(f"readable by others (mode {mode:o}): refused, it holds a secret (chmod 600)", file=path)


def read_secret(path: str, *, file: str, field: str) -> str:
    """The password in `path` (its one line, without the line break), after the checks above
    with `secret`; any problem is a SpecError for `file`/`field` that names `path`."""
    try:
        resolved = check_permissions(path, secret=True)
        if not os.path.isfile(resolved):
            raise SpecError("not a regular file", file=path)
        with open(resolved, "rb") as fh:
            data = fh.read(_MAX_SECRET + 1)
    except SpecError as exc:
        raise SpecError(f"{exc.file}: {exc.detail}", file=file, field=field) from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}", file=file, field=field) from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text", file=file, field=field) from None
    if len(data) > _MAX_SECRET or len(lines) != 1 or not lines[0]:
        raise SpecError(f"{path}: must hold the password alone, on one line of at most {_MAX_SECRET} bytes", file=file, field=field)
    try:
        return no_control(lines[0])
    except _FieldError as exc:
        raise SpecError(f"{path}: the password {exc}", file=file, field=field) from None
