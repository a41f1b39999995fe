"""The words every layer shares, below all of them (model.py, published.py and the spec
re-export them): what a node, group, tag or runlevel name may look like, and the states an
entry can be in. Pure: no imports beyond `re`."""

from __future__ import annotations

import re

# What a node, group, tag or runlevel name may look like (the spec's loader uses this very
# pattern): it never starts with "-", so a name can never become an option where it reaches
# an argv (a fence hook). Names read from the store are checked with valid_name() before
# anything uses them (reconciler/store/*). \Z, not $: "$" would accept a trailing newline.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def valid_name(value: object) -> bool:
    """True if `value` is a node or group name the spec would accept."""
    return isinstance(value, str) and NAME_RE.match(value) is not None


# Entry states. Processes: stopped, running, stopping, done (once/wait exited), passed and
# failed (test), exited (respawn waiting for its next attempt). Resources (mount, address):
# stopped (absent), running (present as specified), mismatch (present but different),
# error (the last attempt failed; retry_at says when the next one is).
STATES = ("stopped", "running", "stopping", "done", "passed", "failed", "exited", "mismatch", "error")
