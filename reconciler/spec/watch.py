"""Seeing spec edits: which directories to watch for a spec path, and the watching thread.

Directories, not files, are watched: editors save by writing a new file and renaming it.
A spec reached through symbolic links is watched where it really is as well: the directory
of each link of the chain and of the file it ends at (an edit of the target is an edit of
the spec), and for a directory spec the directory of each file that is a link out of it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from reconciler import spec as specmod

log = logging.getLogger("reconciler.agent")
ANY_TOML = "*.toml"  # in `names`: every *.toml file of a watched directory counts


def roots(spec_path: str, spec: specmod.Spec) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the real directories to watch, the file names that matter in them)."""
    path = Path(spec_path)
    if path.is_dir():
        dirs = {os.path.realpath(path)}  # (inotify follows a link to the directory anyway)
        names = {ANY_TOML}  # (node.toml too)
        for f in (*spec.files, *([spec.node_file] if spec.node_file else [])):
            real = os.path.realpath(f)
            if os.path.dirname(real) != os.path.realpath(path):
                dirs.add(os.path.dirname(real))
                names.add(os.path.basename(real))
        return tuple(sorted(dirs)), frozenset(names)
    chain = [str(path.absolute())]
    for _ in range(40):  # each link of a chain (as the kernel, at most 40), then where it ends
        try:
            target = os.readlink(chain[-1])
        except OSError:
            break
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    chain.append(os.path.realpath(path))
    if spec.node_file:  # `--node-file`: an edit of it is an edit of this node's settings
        chain += [os.path.abspath(spec.node_file), os.path.realpath(spec.node_file)]
    # Real directories, once each: two names of one directory would be watched twice.
    return tuple(sorted({os.path.realpath(os.path.dirname(p)) for p in chain})), frozenset(os.path.basename(p) for p in chain)


def fingerprint(spec_path: str, node_file: str | None = None) -> tuple[tuple[object, ...], ...]:
    """What the spec's files look like on disk now (names, inodes, sizes, change times, and
    where links lead): compared once a tick, so that an edit the watch did not report (one
    made while the watch was still being set up, or an inotify queue overflow) is still
    applied. Level-triggered, like everything else in the agent: nothing depends on having
    seen the event. A directory's node.toml is one of its *.toml; another node file
    (`node_file`, a one-file spec's) is looked at too."""
    path = Path(spec_path)
    try:
        files = sorted(str(f) for f in path.iterdir() if f.suffix == ".toml") if path.is_dir() else [str(path)]
    except OSError:
        files = [str(path)]
    if node_file is not None and str(node_file) not in files:
        files.append(str(node_file))
    out: list[tuple[object, ...]] = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, os.path.realpath(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError as exc:
            out.append((f, exc.errno))
    return tuple(out)


def start(dirs: tuple[str, ...], names: frozenset[str], *, changed: Callable[[], object], stop: threading.Event) -> threading.Thread:
    """Call `changed` (from the watching thread) after each burst of changes to `names` in
    `dirs`, until `stop` is set. A daemon thread never joined keeps shutdown instant."""
    import watchfiles

    def only_specs(_change: object, path: str) -> bool:
        name = os.path.basename(path)
        return name in names or (ANY_TOML in names and name.endswith(".toml"))

    def run() -> None:
        try:
            # watchfiles wakes every `step` to look for changes (and a stop): 10 wake-ups a
            # second, and an edit is seen 100-200 ms after it is written (once a step
            # passes without further changes).
            for _changes in watchfiles.watch(
                *dirs, watch_filter=only_specs, recursive=False, step=100, debounce=100, stop_event=stop,
                rust_timeout=5000, yield_on_timeout=False, raise_interrupt=False,
            ):
                changed()
        except Exception as exc:  # the tick reloads nothing; say why edits are not seen
            log.warning("spec directory watch failed: %s", exc)

    thread = threading.Thread(target=run, name="spec-watch", daemon=True)
    thread.start()
    return thread
