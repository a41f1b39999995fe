"""The cluster spec's sync rule: what a node does about its spec files and the store's
current revision. Pure: the agent (reconciler/agent/specsync.py) reads the files and the
store, asks `step`, and does what it says.

The model (docs/spec.md, "One spec for the cluster"): the store holds numbered revisions of
the spec's text; every node's files show the current one. A node remembers the revision its
files were last *in step* with, and what they looked like then (`Synced`). Then:

- The store holds no spec yet: the node seeds it from its files (if they load).
- The files are the current revision's text: in step (nothing to do but remember it).
- The files did not change since the node was last in step (the same text, and not saved
  since: a save that put back an older revision's text is an edit too): the store moved on
  (another node's edit, `tell`, `rollback`): the node writes the current revision into its
  files.
- A node that was never in step (a new node, or the upgrade from per-node files) takes the
  store's revision too; its old text is kept beside (`NAME.before-rN`).
- Otherwise the files hold an edit of their own: published as the next revision if it was
  made on the current one and loads; refused (the file left as written, the cluster running
  on) if it does not load, or was made on an older revision (a conflict: somebody else's
  edit came first; merge and save again, or `reconcile apply --force`).

Texts are compared as hashes of what a revision holds (the files with their node-local
keys taken out): a node's store address or state directory is never an edit.
"""

from __future__ import annotations

import attrs

SEED, IN_STEP, WRITE_BACK, PUBLISH, REFUSE, WAIT = "seed", "in_step", "write_back", "publish", "refuse", "wait"


@attrs.frozen
class Synced:
    """The revision this node's files were last in step with, their hash then, and their
    stamp then (names, inodes, sizes, modification times): a file saved since, even with
    the very text it had, is not "unchanged"."""

    revision: int
    files: str
    stamp: str = ""


@attrs.frozen
class Local:
    """This node's spec files as they are now."""

    hash: str | None  # of their texts without node-local keys (None: they cannot be read as TOML)
    error: str = ""  # why they do not load as a spec ("": they do)
    stamp: str = ""  # their names, inodes, sizes and modification times


@attrs.frozen
class Step:
    kind: str  # SEED | IN_STEP | WRITE_BACK | PUBLISH | REFUSE | WAIT
    reason: str
    base: int = 0  # PUBLISH, SEED: the revision the new one replaces (its number - 1)


def step(*, local: Local, synced: Synced | None, head: int, head_hash: str | None, where: str = "the spec") -> Step:
    """What to do, given the files at `where` (`local`), what this node last synced, and the
    store's current revision number `head` (0: none) whose texts hash to `head_hash` as this
    node's layout compares them (None: not fetched, or it does not load here). A reason that
    refuses starts with the file it is about, as every spec error does."""
    if head == 0:
        if local.error or local.hash is None:
            return Step(WAIT, f"{local.error} (the store holds no spec yet: nothing to seed it with)")
        return Step(SEED, "the store holds no spec yet: seeding it from this node's files", base=0)
    if synced is not None and head < synced.revision:
        # A read older than what this node already synced (its own publish not read back
        # yet): never step back to it, nor write it over the newer files.
        return Step(WAIT, f"the store's revision {head} as last read is older than revision {synced.revision}")
    if head_hash is not None and local.hash == head_hash:
        return Step(IN_STEP, f"the files are revision {head}")
    if synced is None:
        if head_hash is None:
            return Step(WAIT, f"revision {head} is not available here")
        return Step(WRITE_BACK, f"first sync on this node: the files take revision {head} (their old text kept beside)")
    if local.hash == synced.files and local.stamp == synced.stamp:
        if head_hash is None:
            return Step(WAIT, f"revision {head} is not available here")
        if synced.revision == head:
            # In step with this very revision before, the same files, yet a different hash now:
            # only a different layout of the same revision can do that (a node's files changed
            # from one file to a directory): show the revision as this layout holds it.
            return Step(WRITE_BACK, f"the files show revision {head} in another layout")
        return Step(WRITE_BACK, f"the files are revision {synced.revision}, the cluster's is {head}: writing it")
    if local.error or local.hash is None:
        return Step(REFUSE, f"{local.error} (not published: keeping the last good spec, revision {head})")
    if local.hash == synced.files and synced.revision == head:
        return Step(WAIT, f"revision {head} is not available here")  # (saved again with its own text)
    if synced.revision != head:
        return Step(REFUSE, f"{where}: edit made on revision {synced.revision}, but the cluster is at revision {head}:"
                            " refused, the file is left as written (merge and save again, or `reconcile apply --force`)")
    return Step(PUBLISH, f"edit made on revision {head}: publishing revision {head + 1}", base=head)
