"""The directory store: the embedded default, local or on a shared NFS/GFS/CephFS directory.

Layout under the root:
    nodes/NODE               heartbeat: a symlink whose target is "COUNTER:WALL:DIGEST:INSTANCE"
                             (WALL may be empty; INSTANCE, the agent process's random id, may be
                             absent in records of older agents), replaced by rename (atomic). A symlink because its
                             target lives in the inode: creating and renaming one costs ~30 us,
                             a small file's write + rename ~300 us (ext4 flushes a file renamed
                             over another at once). Readers still accept the older
                             nodes/NODE.json file ({node, counter, digest}).
    status/NODE.json         published status; rewritten only when it changes
    claims/GROUP             a symlink whose target is "NODE:GENERATION": symlink(2) creates
                             it only if absent, atomically, on local filesystems and NFS alike
    ends/GROUP.GENERATION    a symlink created (exclusively) by whoever ends that instance
    generations/GROUP        the last ended generation, so the next claim's number is larger
    spec/NNNNNNNNNN.json     the cluster spec's revisions (published.SpecRevision), created
                             exclusively by link(2); the largest number is the current one

Ending a claim (release by its owner, break by a survivor) first wins the exclusive
`ends/GROUP.GENERATION` marker: for any one instance only one caller gets past that point,
so two survivors can never both remove it, and a stale owner can never remove a successor's
claim (the successor is a different instance with a larger generation).

Nothing here trusts the directory. setup() creates the layout once, at the agent's start;
afterwards a missing root or subdirectory is "store unreachable" (StoreError), never an
empty store. The root must be owned by root (or this process's user) and not writable by
group or others. Every access goes through directory file descriptors opened with
O_NOFOLLOW (a subdirectory replaced by a symlink is refused), files are opened O_NOFOLLOW
and created O_EXCL, heartbeats and claims (symlinks by design) are only ever readlink'd,
so no planted symlink makes an agent read or write elsewhere. A malformed or stray entry
is skipped, logged once and counted (reconciler/store/records.py); a corrupt generation
counter is an error for that group's claims, never read as 0.

The parts, one job each:
    layout.py      the root and its subdirectories: creating them, the trust checks, the
                   descriptors every access goes through, atomic replacement
    heartbeats.py  writing this node's heartbeat and status (and noticing another writer)
    reader.py      reading every heartbeat, status and claim, reusing what did not change
    claims.py      the claim protocol: claim, and ending a claim instance exactly once
    specs.py       the cluster spec's revisions: compare-and-swap, history, pruning, trust
    store.py       DirectoryStore: the Store contract, running the parts' blocking I/O in threads
"""

from reconciler.store.directory.layout import never_set_up  # noqa: F401 (for cli and dry-run)
from reconciler.store.directory.store import DirectoryStore  # noqa: F401 (the backend)
