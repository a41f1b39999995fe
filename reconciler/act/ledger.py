"""The failure ledger: each group's failures on this node (an unhealthy restart, a rapid
exit, a failed start) and the `reconcile clear` requests, kept in STATE/NODE/health.json
so that an agent restart forgets neither a failure count nor a ban.

Bans are not stored: decide/health.ban_until derives them from the failures, so the
planner, `--dry-run` and the published status agree on one rule. Times are stored as wall
times and read back as monotonic ones (a ban outlives an agent restart, and a reboot too).

A file that cannot be read or parsed fails *open*: logged as an error, kept aside as
health.json.corrupt, and the node starts with no failures and no bans. A ban only steers
placement away from a node that keeps failing; the at-most-once guarantee does not depend
on it (claims and leases do), and a ledger that failed closed (every group banned) could
strand a group on every node at once. A write that fails is logged once and retried at
the next change: the counts in memory stay right meanwhile.

A clear request is a file STATE/NODE/clear/GROUP written by `reconcile clear` (its text: a
request id); the agent applies it on its next pass (apply_requests) and publishes the id in
the group's status (GroupStatus.cleared), which the command waits for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from reconciler import spec as specmod
from reconciler.decide import health
from reconciler.model import Failure, valid_name

log = logging.getLogger("reconciler.act")
KEEP = 1000  # failures kept per group at most (a crash loop without max_failures)
CLEAR_DIR = "clear"


class Ledger:
    def __init__(self, *, path: str | os.PathLike | None, on_failure: Callable[[str, str], None] = lambda group, cause: None,
                 readonly: bool = False):
        """`path`: STATE/NODE/health.json (None: in memory only, for --once and tests);
        `on_failure(group, cause)`: a failure was recorded (metrics); `readonly`: only read
        the file, never write or move it (--dry-run)."""
        self.path = Path(path) if path is not None else None
        self.readonly = readonly
        self.on_failure = on_failure
        self.failures: dict[str, tuple[Failure, ...]] = {}
        self.cleared: dict[str, str] = {}  # group -> the id of the last clear request applied
        self._write_error = ""
        self.changed = 0  # grows with every change (the observer rebuilds its view of bans then)
        self._load()

    # --- recording ----------------------------------------------------------------------

    def record(self, group: str, tag: str, cause: str, message: str = "", *, now: float | None = None) -> None:
        """One failure of `group` on this node now (`cause`: one of health.CAUSES)."""
        at = time.monotonic() if now is None else now
        kept = self.failures.get(group, ())[-(KEEP - 1):]
        self.failures[group] = (*kept, Failure(at=at, tag=tag, cause=cause, message=message[:200]))
        self.changed += 1
        # (DEBUG: the supervisor logs rapid exits once per backoff step, the executor each restart)
        log.debug("%s/%s: failure of the group here (%s)%s", group, tag, cause.replace("_", " "), f": {message}" if message else "",
                  extra={"group": group, "tag": tag})
        self.on_failure(group, cause)
        self.save()

    def clear(self, group: str, request: str = "") -> None:
        self.failures.pop(group, None)
        if request:
            self.cleared[group] = request
        self.changed += 1
        self.save()

    def prune(self, spec: specmod.Spec, now: float) -> None:
        """Drop what can change no answer any more (health.keep_since), and groups the spec no longer has."""
        dropped = False
        for group in list(self.failures):
            g = spec.groups.get(group)
            kept = () if g is None else tuple(f for f in self.failures[group] if f.at >= health.keep_since(g, now))
            if kept != self.failures[group]:
                dropped = True
                if kept:
                    self.failures[group] = kept
                else:
                    del self.failures[group]
        if dropped:
            self.changed += 1
            self.save()

    def bans(self, spec: specmod.Spec, now: float) -> dict[str, float]:
        """group -> when this node's ban from it ends, for the bans that last at `now`."""
        out = {}
        for group, failures in self.failures.items():
            g = spec.groups.get(group)
            if g is None or g.max_failures is None:
                continue
            until = health.ban_until(g, failures)
            if until is not None and until > now:
                out[group] = until
        return out

    # --- clear requests -----------------------------------------------------------------

    def apply_requests(self) -> list[str]:
        """Apply the clear requests waiting in STATE/NODE/clear/ (each file once); the groups cleared."""
        if self.path is None:
            return []
        folder = self.path.parent / CLEAR_DIR
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read clear requests in %s: %s", folder, exc)
            return []
        done = []
        for name in names:
            f = folder / name
            try:
                request = f.read_text()[:64].strip()
                f.unlink()
            except OSError as exc:
                log.warning("cannot apply the clear request %s: %s", f, exc)
                continue
            if not valid_name(name):
                continue  # (a temporary file of the command, or a stray)
            log.info("%s: failures and ban cleared (reconcile clear)", name, extra={"group": name})
            self.clear(name, request or "-")
            done.append(name)
        return done

    # --- the file -----------------------------------------------------------------------

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read %s: %s; starting with no failures and no bans", self.path, exc)
            return
        offset = time.time() - time.monotonic()
        try:
            doc = json.loads(text)
            failures = {
                str(group): tuple(Failure(at=float(f["at"]) - offset, tag=str(f["tag"]), cause=str(f["cause"]),
                                          message=str(f.get("message", ""))) for f in items)
                for group, items in doc["failures"].items()
            }
            cleared = {str(k): str(v) for k, v in doc.get("cleared", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            if self.readonly:
                return
            log.error("%s is not a failure ledger (%s): kept aside as %s; starting with no failures and no bans"
                      " (a ban steers placement; safety does not depend on it)", self.path, exc, aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            return
        self.failures = {g: tuple(sorted(fs, key=lambda f: f.at)) for g, fs in failures.items() if fs}
        self.cleared = cleared

    def save(self) -> None:
        if self.path is None or self.readonly:
            return
        offset = time.time() - time.monotonic()
        doc = {
            "failures": {g: [{"at": round(f.at + offset, 3), "tag": f.tag, "cause": f.cause, "message": f.message} for f in fs]
                         for g, fs in self.failures.items()},
            "cleared": self.cleared,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if str(exc) != self._write_error:
                log.error("cannot write %s: %s (the counts in memory stay right; retried at the next change)", self.path, exc)
            self._write_error = str(exc)
            return
        self._write_error = ""
