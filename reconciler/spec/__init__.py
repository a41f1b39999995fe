"""The spec: TOML -> Spec (frozen attrs), the first stage of the flow.

    model.py        the value classes (Spec, Group, Entry, Timing, ...) and small value types
    convert.py      the strict converter: TOML tables -> those classes, one-line errors
    loader.py       files (or a revision's texts) -> Spec; replacement checks
    local.py        what is each node's own: the local keys of [cluster], the node file
    files.py        the spec's texts on disk: a revision's files, in step or not, the write-back
    rules.py        the cross-field rules (ranges, the timing's safety, unique tags)
    strictmodes.py  who may write a spec that runs commands; secrets read from files
    changes.py      what changed between two specs, in a few words (a revision's summary)
    edit.py         `reconcile tell`: one group's runlevel changed in its file (or in a text)
    importer.py     `reconcile import`: an OpenMosix::HA inittab -> TOML
    watch.py        where the spec really is on disk, watched for edits

`reconciler.spec` re-exports the model and `load`, so callers write `spec.Spec`,
`spec.load(path)`.
"""

# re-exported: the package's interface (__all__ at the end names it for type checkers)
from reconciler.spec.model import (
    Address,
    Cluster,
    control_char,
    DEFAULT_SPEC_PATH,
    digest,
    LOCAL_KEYS,
    Entry,
    ENTRY_RANGES,
    FOREGROUND,
    format_duration,
    Group,
    GROUP_RANGES,
    Health,
    HEALTH_RANGES,
    MODES,
    Mount,
    NAME_RE,
    no_control,
    parse_duration,
    parse_signal,
    redact_url,
    Spec,
    SpecError,
    STOP,
    Timing,
    TIMING_RANGES,
)
from reconciler.spec.loader import load

__all__ = [
    "Address",
    "Cluster",
    "control_char",
    "DEFAULT_SPEC_PATH",
    "digest",
    "LOCAL_KEYS",
    "Entry",
    "ENTRY_RANGES",
    "FOREGROUND",
    "format_duration",
    "Group",
    "GROUP_RANGES",
    "Health",
    "HEALTH_RANGES",
    "MODES",
    "Mount",
    "NAME_RE",
    "no_control",
    "parse_duration",
    "parse_signal",
    "redact_url",
    "Spec",
    "SpecError",
    "STOP",
    "Timing",
    "TIMING_RANGES",
    "load",
]
