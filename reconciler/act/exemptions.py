"""STATE/NODE/maintenance.json: the groups this node owns that are in maintenance, for the
keeper (reconciler/keeper.py: `exempt`), which then leaves their processes, mounts and
addresses alone when the lease runs out (an agent killed or cut off from the store during
maintenance must not take them down: docs/design.md, "Operator intents").

Written atomically (a temporary file renamed over it) whenever the list changes. A failed
write is reported by `save` returning False, and the agent then keeps publishing that it is
in maintenance: peers must not count on a keeper that may still spare what the agent no
longer lists (the status is the acknowledgement they wait for).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from reconciler.act.book import replace_file

log = logging.getLogger("reconciler.act")


class Exemptions:
    def __init__(self, path: Path | None):
        self.path = path  # None: nothing is written (--once: no keeper)
        # What the file holds (as the keeper reads it: a previous agent's list, if any).
        self._written: tuple[str, ...] = self._read()
        self._error = ""

    def _read(self) -> tuple[str, ...]:
        if self.path is None:
            return ()
        try:
            groups = json.loads(self.path.read_text()).get("groups", [])
        except (OSError, ValueError, AttributeError):
            return ()
        return tuple(sorted(g for g in groups if isinstance(g, str) and g)) if isinstance(groups, list) else ()

    def save(self, groups: Iterable[str]) -> bool:
        """Make the file list `groups`; True once it does (at once if it already did)."""
        want = tuple(sorted(groups))
        if self.path is None or want == self._written:
            return True
        try:
            replace_file(self.path, json.dumps({"groups": list(want)}) + "\n")
        except OSError as exc:
            error = f"cannot write {self.path}: {exc.strerror or exc}"
            if error != self._error:
                self._error = error
                log.error("%s (this node keeps showing maintenance until it can)", error)
            return False
        self._written, self._error = want, ""
        return True
