"""The spec: TOML -> Spec (frozen attrs), the first stage of the flow.

    model.py        the value classes (Spec, Group, Entry, Timing, ...) and small value types
    loader.py       files -> Spec: the converter, includes, replacement checks
    rules.py        the cross-field rules (ranges, the timing's safety, unique tags)
    strictmodes.py  who may write a spec that runs commands; secrets read from files
    edit.py         `reconcile tell`: one group's runlevel changed in its file
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
