"""The agent's part of the one cluster spec: it keeps this node's spec files and the store's
current revision in step, and says which Spec the node runs.

One step at a time, as a task of its own on the loop (a store that hangs never holds up a
reconcile pass); the loop starts one when the files changed, the store's revision number
moved, or the last step must be retried (the store did not answer). What to do is
decide/specsync.py's; this does it:

- seed the empty store from the files; publish an edit as the next revision (compare-and-
  swap on the revision it was made on); write the store's revision into the files;
- run the store's current revision whenever it loads here (with this node's own local
  settings), and nothing else once the store holds one: a refused edit, a conflict or an
  unreachable store leave the node on the last good revision, and say why (status, log);
- never stop anything for a spec problem: a revision that does not load here is not run.

A refused step is not retried until something it depends on changes (the files, the
revision number): a conflict is logged once, not ten times a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reconciler import spec as specmod
from reconciler.agent import clusterspec
from reconciler.decide import specsync as rules
from reconciler.published import SpecRevision
from reconciler.spec import files as specfiles, loader
from reconciler.store import SpecConflict, Store, StoreError

log = logging.getLogger("reconciler.agent")


class SpecSync:
    """Keeps the files at `spec_path` and the cluster spec in `store` in step for `node`."""

    def __init__(self, *, spec_path: str, node_file: str | None, node: str, store: Store, node_dir: Path,
                 local: Mapping[str, Any], running: Callable[[], specmod.Spec],
                 published: Callable[[SpecRevision], None] = lambda rev: None):
        self.spec_path = spec_path
        self.node_file = node_file  # `--node-file` (a directory spec's node.toml the loader finds itself)
        self.node = node
        self.store = store
        self.node_dir = node_dir
        self.local = dict(local)  # this node's local settings, fixed at start (a change needs a restart)
        self._running = running  # the Spec the agent runs now (to summarise and check an edit against)
        self._published = published  # told of each revision this node publishes (the history: agent/events.py)
        self.revision = 0  # the store revision this node runs (0: none yet, its files)
        self.error = ""  # why the files or the store's revision are not what runs ("": they are)
        self.synced, _path = clusterspec.read_synced(node_dir)
        self._revs: dict[int, SpecRevision] = {}  # fetched revisions (the current and the last few)
        self._refused: tuple[object, ...] | None = None  # the inputs of the last refused step
        self.retry = False  # the last step failed on the store: the loop starts another at the next tick

    async def step(self, head: int) -> specmod.Spec | None:
        """One step, given the store's current revision number as last read (`head`, 0:
        none); returns the Spec to run from now on, or None to keep the one running."""
        self.retry = False
        try:
            return await self._step(head)
        except StoreError as exc:
            self.retry = True
            self._say(f"cluster spec: {exc} (running revision {self.revision or 'of the local files'})", error=False)
            return None

    def _examine(self, rev: SpecRevision | None) -> tuple[specmod.Spec | None, str | None, str, rules.Local]:
        """(the revision as this node's Spec, its hash as this node's files would hold it, why
        it does not load here; the files' hash, why they do not load). Files are read and
        parsed here: in a thread (a large spec takes a while; the loop must not wait)."""
        head_spec: specmod.Spec | None = None
        head_hash: str | None = None
        head_error = ""
        if rev is not None:
            try:
                head_spec = clusterspec.load_revision(rev, spec_path=self.spec_path, local=self.local)
                head_hash = clusterspec.comparable_hash(rev.files, self.spec_path)
            except specmod.SpecError as exc:
                head_error = f"revision {rev.number} does not load here, not run: {exc}"
        stamp = clusterspec.local_stamp(self.spec_path)  # (before the texts: a save in between shows as one)
        local_hash, read_error = clusterspec.local_hash(self.spec_path)
        # Whether the files load matters only when they are not the revision (an edit to
        # publish or refuse, or a seed): a revision was validated when it was loaded above.
        error = read_error or (self._load_error() if local_hash is None or local_hash != head_hash else "")
        return head_spec, head_hash, head_error, rules.Local(hash=local_hash, error=error, stamp=stamp)

    async def _step(self, head: int) -> specmod.Spec | None:
        if head < self.revision:
            return None  # a read from before this node's own publish: the next one shows it
        rev = await self._fetch(head) if head else None
        head_spec, head_hash, head_error, local = await asyncio.to_thread(self._examine, rev)
        local_hash = local.hash
        decision = rules.step(local=local, synced=self.synced, head=head, head_hash=head_hash, where=self.spec_path)
        inputs = (decision.kind, local_hash, local.stamp, head, self.synced)
        if inputs == self._refused:
            return None  # refused already for the same files and revision: said once
        run = self._run(rev, head_spec)
        if decision.kind == rules.SEED:
            return await self._publish(base=0, local=local, inputs=inputs)
        if decision.kind == rules.IN_STEP:
            self._remember(rules.Synced(revision=head, files=head_hash or "", stamp=local.stamp))
            self._clear(head_error)
            return run
        if decision.kind == rules.WRITE_BACK and rev is not None:
            try:
                written = await asyncio.to_thread(self._write_back, rev)
            except (OSError, specmod.SpecError) as exc:
                self._refuse(inputs, f"cannot write revision {rev.number} into {self.spec_path}: {exc}")
                return run
            log.info("spec files take revision %d (%s): %s", rev.number, rev.summary or "no summary", ", ".join(written) or "unchanged")
            new_hash, _ = await asyncio.to_thread(clusterspec.local_hash, self.spec_path)
            stamp = await asyncio.to_thread(clusterspec.local_stamp, self.spec_path)
            self._remember(rules.Synced(revision=rev.number, files=new_hash or "", stamp=stamp))
            self._clear(head_error)
            return run
        if decision.kind == rules.PUBLISH:
            return await self._publish(base=decision.base, local=local, inputs=inputs) or run
        self._refuse(inputs, head_error or decision.reason)
        return run

    # --- the steps ---------------------------------------------------------------------

    async def _fetch(self, head: int) -> SpecRevision | None:
        rev = self._revs.get(head)
        if rev is None:
            rev = await self.store.spec_get(head)
            if rev is not None:
                self._revs = {n: r for n, r in self._revs.items() if n > head - 3} | {head: rev}
        return rev

    def _write_back(self, rev: SpecRevision) -> list[str]:
        return specfiles.write_back(self.spec_path, rev.files, revision=rev.number, local=specfiles.files_local(self.spec_path),
                                    first_sync=self.synced is None)

    def _load_error(self) -> str:
        try:
            loader.load(self.spec_path, node_file=self.node_file)
        except specmod.SpecError as exc:
            return str(exc)
        return ""

    async def _publish(self, *, base: int, local: rules.Local, inputs: tuple[object, ...]) -> specmod.Spec | None:
        """Publish the files as revision base + 1; the Spec to run if it was stored."""
        current = self._running()
        try:
            new = loader.load(self.spec_path, node_file=self.node_file)
            files = specfiles.revision_files(self.spec_path)
        except specmod.SpecError as exc:
            self._refuse(inputs, f"{exc} (not published: keeping the last good spec, revision {base})")
            return None
        try:
            if base:
                loader.check_replacement(current, new, self.spec_path)  # an emptied spec stops nothing
        except specmod.SpecError as exc:
            self._refuse(inputs, str(exc))  # (it says that the last good spec stays)
            return None
        try:
            rev = await clusterspec.publish(self.store, files, new, base=base, previous=current if base else None,
                                            author=self.node)
        except SpecConflict as exc:
            # Another node's revision came first; the next step compares the files with it
            # (equal: in step; else a conflict to refuse, said then).
            log.info("cluster spec: publishing revision %d lost (%s): looking again", base + 1, exc)
            self.retry = True
            return None
        log.info("spec revision %d published from %s: %s", rev.number, self.spec_path, rev.summary)
        self._published(rev)
        self._revs[rev.number] = rev
        self._remember(rules.Synced(revision=rev.number, files=local.hash or "", stamp=local.stamp))
        self._clear("")
        return self._run(rev, clusterspec.load_revision(rev, spec_path=self.spec_path, local=self.local))

    def _run(self, rev: SpecRevision | None, spec: specmod.Spec | None) -> specmod.Spec | None:
        """Run `rev` (loaded as `spec`) from now on, if it loads here and is not running yet."""
        if rev is None or spec is None or rev.number == self.revision:
            return None
        log.info("running cluster spec revision %d (digest %s)", rev.number, rev.digest)
        self.revision = rev.number
        return spec

    def _remember(self, synced: rules.Synced) -> None:
        if synced == self.synced:
            return
        self.synced = synced
        try:
            clusterspec.write_synced(self.node_dir, synced, spec_path=self.spec_path)
        except OSError as exc:  # the next start syncs afresh (its files kept beside): slower, not unsafe
            log.warning("cannot record the spec sync in %s: %s", self.node_dir, exc.strerror or exc)

    def _refuse(self, inputs: tuple[object, ...], why: str) -> None:
        self._refused = inputs
        self._say(why, error=True)

    def _clear(self, error: str) -> None:
        self._refused = None
        if error:
            self._say(error, error=True)
        elif self.error:
            log.info("cluster spec: in step with revision %d again", self.revision)
            self.error = ""

    def _say(self, why: str, *, error: bool) -> None:
        if why != self.error:
            (log.error if error else log.warning)("%s", why)
        self.error = why
