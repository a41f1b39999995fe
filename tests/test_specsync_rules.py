"""The cluster spec's sync rule (reconciler/decide/specsync.py): a decision table over what a
node's files hold, what it last synced and the store's current revision, and properties:
nothing is ever published over a newer revision, nor written over an edit of the node's own."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from reconciler.decide import specsync as rules
from reconciler.decide.specsync import Local, Synced

A, B, C = "hash-a", "hash-b", "hash-c"

TABLE = [
    # id, local, synced, head, head_hash, kind, base
    ("empty-store-seeds", Local(A), None, 0, None, rules.SEED, 0),
    ("empty-store-bad-files-wait", Local(A, "x.toml: bad"), None, 0, None, rules.WAIT, 0),
    ("empty-store-unreadable-wait", Local(None, "x.toml: not TOML"), None, 0, None, rules.WAIT, 0),
    ("files-are-the-head", Local(A), Synced(3, B), 4, A, rules.IN_STEP, 0),
    ("never-synced-but-equal", Local(A), None, 4, A, rules.IN_STEP, 0),
    ("never-synced-takes-the-store", Local(A), None, 4, B, rules.WRITE_BACK, 0),
    ("never-synced-head-unavailable-waits", Local(A), None, 4, None, rules.WAIT, 0),
    ("untouched-since-sync-store-moved", Local(A), Synced(3, A), 4, B, rules.WRITE_BACK, 0),
    ("untouched-head-does-not-load-here", Local(A), Synced(3, A), 4, None, rules.WAIT, 0),
    ("same-revision-other-layout", Local(A), Synced(4, A), 4, B, rules.WRITE_BACK, 0),
    ("edit-on-the-head-publishes", Local(C), Synced(4, A), 4, A, rules.PUBLISH, 4),
    ("edit-on-the-head-unfetched-publishes", Local(C), Synced(4, A), 4, None, rules.PUBLISH, 4),
    ("edit-on-an-old-revision-conflicts", Local(C), Synced(3, A), 4, B, rules.REFUSE, 0),
    ("bad-edit-refused", Local(C, "x.toml: groups.web.runlevel: bad"), Synced(4, A), 4, A, rules.REFUSE, 0),
    ("unreadable-edit-refused", Local(None, "x.toml: not TOML"), Synced(4, A), 4, A, rules.REFUSE, 0),
    # saved since the sync with the text it had then (an edit back to an older revision's
    # text, on a node that has not taken the newer one yet): an edit, never written over
    ("resaved-old-text-is-an-edit", Local(A, stamp="t2"), Synced(3, A, "t1"), 4, B, rules.REFUSE, 0),
    # a read older than this node's own publish (not read back yet): never stepped back to
    ("stale-read-never-written-back", Local(A, stamp="t1"), Synced(5, A, "t1"), 4, B, rules.WAIT, 0),
    ("untouched-same-stamp-written-back", Local(A, stamp="t1"), Synced(3, A, "t1"), 4, B, rules.WRITE_BACK, 0),
]


@pytest.mark.parametrize("local, synced, head, head_hash, kind, base", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_the_sync_table(local, synced, head, head_hash, kind, base):
    s = rules.step(local=local, synced=synced, head=head, head_hash=head_hash)
    assert (s.kind, s.base) == (kind, base), s.reason
    assert s.reason


def test_a_conflict_names_both_revisions_and_how_out():
    s = rules.step(local=Local(C), synced=Synced(3, A), head=5, head_hash=B)
    assert "revision 3" in s.reason and "revision 5" in s.reason and "apply --force" in s.reason


hashes = st.sampled_from([A, B, C, None])
synceds = st.none() | st.builds(Synced, revision=st.integers(1, 6), files=st.sampled_from([A, B, C]),
                                stamp=st.sampled_from(["t1", "t2"]))


@given(local_hash=hashes, error=st.sampled_from(["", "bad"]), synced=synceds, head=st.integers(0, 6), head_hash=hashes,
       stamp=st.sampled_from(["t1", "t2"]))
def test_never_over_a_newer_revision_nor_over_an_edit(local_hash, error, synced, head, head_hash, stamp):
    if head == 0:
        head_hash = None
    local = Local(local_hash, error if local_hash is not None else "unreadable", stamp=stamp)
    s = rules.step(local=local, synced=synced, head=head, head_hash=head_hash)
    if s.kind in (rules.PUBLISH, rules.SEED):
        assert s.base == head  # compare-and-swap on the store's current revision, never an older one
        assert not local.error and local.hash is not None  # only files that load are published
    if s.kind == rules.PUBLISH:
        assert synced is not None and synced.revision == head and local.hash != synced.files
    if synced is not None and 0 < head < synced.revision:
        assert s.kind == rules.WAIT  # never back to an older revision than this node synced
    if s.kind == rules.WRITE_BACK:
        # only files untouched since the last sync (or never synced) are written over
        assert synced is None or (local.hash == synced.files and local.stamp == synced.stamp)
        assert head_hash is not None
    if s.kind == rules.IN_STEP:
        assert local.hash == head_hash
