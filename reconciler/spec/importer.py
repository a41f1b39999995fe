"""The importer: an OpenMosix::HA cltab + hactl pair -> an equivalent reconciler spec (TOML).

`reconcile import CLTAB [HACTL]` prints the spec; the notes go to stderr and, as comments,
to the head of the spec.

cltab lines are `group:tag:runlevels:mode:command`, split into at most five fields, so the
command may contain colons. Comment lines (`#`, also indented) and blank lines are skipped. `:::var:value` lines are
Cluster::Init settings (socket, clstat, log): reconciler has no equivalent for any of them,
so they are reported in the notes and otherwise ignored. Fields are stripped of blanks.

The runlevels field, as Cluster::Init read it, matches a requested level L when the whole
field equals L, or when L is one of its items: with commas the items are the comma-separated
names (`run,maint`), without commas every single character is an item (`12` = 1 and 2). A
reconciler entry needs a fixed list of level names instead, so each field becomes:

* with commas: its items;
* without commas, made only of digits (`12`, `2345`): one level per digit;
* without commas, anything else (`start`, `test`, `S1`): one whole level name. Cluster::Init
  also ran `start` at the levels `s`, `t`, `a` and `r`; that accident is not carried over...
* ...except for the level names the group really uses: its hactl level and every level that
  one of its entries lists by the three rules above. Each of those that Cluster::Init would
  match is added to the list (`12` with hactl level `12` becomes 1, 2 and 12; `start` with
  hactl level `s` becomes start and s; `r1` next to an entry at level `1` becomes r1 and 1), so
  at every level the group names, the same entries are active as in Cluster::Init.

hactl lines are `group level`; `#` starts a comment. A group missing from hactl is told `stop`.
A hactl level that no entry of the group lists ran nothing in Cluster::Init; reconciler refuses
such a runlevel, so the group becomes `stop` (nothing runs either way) and a note says so.
Entries listed for the level `stop` are dropped from it: in reconciler nothing runs at `stop`.

A command with no shell metacharacters whose first word is an absolute path becomes an argv
list; any other command stays one string, which reconciler runs through /bin/sh -c as
Cluster::Init did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dataclasses_field
from typing import Any

import tomli_w

from reconciler.spec.model import MODES, NAME_RE, STOP

# What reconciler offers instead of each known Cluster::Init setting (its Conf knew these three).
_SETTINGS = {
    "socket": "the agent has no control socket; `reconcile` talks to the store",
    "clstat": "status lives in the store, not in a clstat file",
    "log": "the agent logs to stdout/stderr (the journal under systemd)",
}
# OpenMosix::HA told every group these levels itself while claiming it; reconciler does not.
_HA_PHASES = {
    "plan": "a no-op level OpenMosix::HA entered to claim a group",
    "test": "the level OpenMosix::HA ran before the hactl level to prove a node fit",
}
# Words that /bin/sh passes through unchanged: no quoting, globbing, expansion or redirection.
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_./=:,@%+-]+$")


class CltabError(ValueError):
    """A cltab or hactl that cannot be converted; str() is `FILE:LINE: what is wrong`."""

    def __init__(self, file: str, line: int, detail: str):
        self.file = file
        self.line = line
        self.detail = detail
        super().__init__(f"{file}:{line}: {detail}")


@dataclass
class _Line:
    """One cltab entry line, as read."""

    line: int
    group: str
    tag: str
    field: str  # the raw runlevels field
    mode: str
    command: str
    # (dataclasses_field: the class's own `field` would hide dataclasses.field from type checkers)
    levels: list[str] = dataclasses_field(default_factory=list)  # filled in by _levels


def convert(
    cltab_text: str,
    hactl_text: str | None,
    *,
    cltab_name: str = "cltab",
    hactl_name: str = "hactl",
) -> tuple[str, list[str]]:
    """Return (TOML text of the spec, notes). Raise CltabError naming FILE:LINE on bad input."""
    notes: list[str] = []
    entries = _read_cltab(cltab_text, cltab_name, notes)
    wanted = _read_hactl(hactl_text, hactl_name) if hactl_text is not None else {}
    if hactl_text is None:
        notes.append(f"no {hactl_name} given: every group is told 'stop'")

    groups: dict[str, list[_Line]] = {}
    for e in entries:
        groups.setdefault(e.group, []).append(e)
    for name, (_, line) in wanted.items():
        if name not in groups:
            notes.append(f"{hactl_name}:{line}: group {name} has no entries in {cltab_name}: ignored")

    out: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        level = wanted.get(name, (STOP, 0))[0]
        if name not in wanted and hactl_text is not None:
            notes.append(f"group {name} is not in {hactl_name}: runlevel 'stop'")
        _levels(members, level, cltab_name, notes)
        for e in [e for e in members if not e.levels]:
            notes.append(f"{cltab_name}:{e.line}: entry {e.tag} ran only at 'stop': dropped (a stop-time command needs another home)")
        members = [e for e in members if e.levels]
        known = {lvl for e in members for lvl in e.levels}
        if level != STOP and level not in known:
            line = wanted[name][1]
            notes.append(
                f"{hactl_name}:{line}: no entry of group {name} lists level {level!r}, so nothing ran there;"
                " reconciler needs a listed level: runlevel 'stop' (nothing runs either way)"
            )
            level = STOP
        _phase_notes(name, members, level, notes)
        out[name] = {"runlevel": level, "entries": [_entry(e) for e in members]}
    notes.append(
        "no [cluster] table is written, so this file can join a spec directory that has one; alone,"
        ' the defaults apply (membership = "hpc:/proc/hpc" in [cluster] keeps openMosix membership)'
    )
    return _render(out, cltab_name, hactl_name if hactl_text is not None else None, notes), notes


# --- reading ---------------------------------------------------------------------------


def _read_cltab(text: str, name: str, notes: list[str]) -> list[_Line]:
    entries: list[_Line] = []
    first_tag: dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        fields = raw.split(":", 4)
        if raw.startswith(":::") and len(fields) < 5:
            raise CltabError(name, no, "a setting line must be :::name:value")
        if len(fields) < 5:
            raise CltabError(name, no, f"expected group:tag:runlevels:mode:command, found {len(fields)} field(s)")
        group, tag, levels, mode = (f.strip() for f in fields[:4])
        command = fields[4].strip()
        if not group and not tag and not levels:
            _setting(mode, command, name, no, notes)
            continue
        if not group or not tag:
            raise CltabError(name, no, "group and tag must not be empty")
        _check_name(group, "group", name, no)
        _check_name(tag, "tag", name, no)
        if tag in first_tag:
            raise CltabError(name, no, f"duplicate tag {tag} (first on line {first_tag[tag]})")
        first_tag[tag] = no
        if mode not in MODES:
            raise CltabError(name, no, f"bad mode {mode!r}: must be one of {', '.join(MODES)}")
        if not levels:
            raise CltabError(name, no, "empty runlevels field")
        if not command:
            raise CltabError(name, no, "empty command")
        entries.append(_Line(no, group, tag, levels, mode, command))
    if not entries:
        notes.append(f"{name} has no entries")
    return entries


def _check_name(value: str, what: str, file: str, line: int) -> None:
    """The spec's rule for group, tag and level names, reported at the cltab/hactl line."""
    if not NAME_RE.match(value):
        raise CltabError(file, line, f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")


def _setting(var: str, value: str, name: str, no: int, notes: list[str]) -> None:
    if not var:
        raise CltabError(name, no, "a setting line must be :::name:value")
    why = _SETTINGS.get(var, "not a Cluster::Init setting reconciler knows")
    notes.append(f"{name}:{no}: setting {var} = {value!r} ignored: {why}")


def _read_hactl(text: str, name: str) -> dict[str, tuple[str, int]]:
    """{group: (level, line)}. A group given twice is an error: which line won was never clear."""
    wanted: dict[str, tuple[str, int]] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise CltabError(name, no, f"expected 'group level', found {len(words)} word(s)")
        group, level = words
        if group in wanted:
            raise CltabError(name, no, f"group {group} given twice (first on line {wanted[group][1]})")
        if level != STOP:
            _check_name(level, "level", name, no)
        wanted[group] = (level, no)
    return wanted


# --- runlevels -------------------------------------------------------------------------


def items(fieldval: str) -> list[str]:
    """Cluster::Init's items of a runlevels field: comma-separated names, or its characters."""
    if "," in fieldval:
        return [i.strip() for i in fieldval.split(",") if i.strip()]
    return list(fieldval)


def matches(fieldval: str, level: str) -> bool:
    """Would Cluster::Init run an entry with this runlevels field at this level?"""
    return fieldval == level or level in items(fieldval)


def _natural(fieldval: str) -> list[str]:
    if "," in fieldval or fieldval.isdigit():
        return items(fieldval)
    return [fieldval]


def _levels(members: list[_Line], hactl_level: str, cltab: str, notes: list[str]) -> None:
    """Fill in each entry's level list (the rule is in the module docstring)."""
    used: dict[str, None] = {}
    if hactl_level != STOP:
        used[hactl_level] = None
    for e in members:
        used.update(dict.fromkeys(_natural(e.field)))
    for e in members:
        natural = _natural(e.field)
        extra = [lvl for lvl in used if lvl not in natural and matches(e.field, lvl)]
        levels = list(dict.fromkeys(natural + extra))
        if "," not in e.field and e.field.isdigit() and len(e.field) > 1:
            notes.append(f"{cltab}:{e.line}: runlevels {e.field!r} read as the levels {', '.join(levels)}")
        elif extra:
            matched = ", ".join(extra)
            notes.append(f"{cltab}:{e.line}: runlevels {e.field!r} also matched level(s) {matched} in Cluster::Init: kept")
        for lvl in levels:
            if lvl != STOP:
                _check_name(lvl, "runlevel", cltab, e.line)
        if STOP in levels:
            notes.append(f"{cltab}:{e.line}: level 'stop' dropped from {e.tag}: nothing runs at 'stop' in reconciler")
            levels.remove(STOP)
        e.levels = levels


def _phase_notes(group: str, members: list[_Line], level: str, notes: list[str]) -> None:
    for phase, what in _HA_PHASES.items():
        tags = [e.tag for e in members if phase in e.levels and level not in e.levels]
        if tags and level != phase:
            notes.append(
                f"group {group}: {', '.join(tags)} listed for {phase!r}, {what}; reconciler has no such phase,"
                f" so they run only when the group's runlevel is {phase!r}: add the working level to their"
                " runlevels if they should gate the group"
            )


# --- writing ---------------------------------------------------------------------------


def command_value(command: str) -> str | list[str]:
    """An argv list when /bin/sh would pass every word through unchanged, else the string."""
    words = command.split()
    if words and words[0].startswith("/") and "=" not in words[0] and all(_PLAIN_WORD.match(w) for w in words):
        return words
    return command


def _entry(e: _Line) -> dict[str, Any]:
    return {"tag": e.tag, "runlevels": e.levels, "mode": e.mode, "command": command_value(e.command)}


def _render(groups: dict[str, dict[str, Any]], cltab: str, hactl: str | None, notes: list[str]) -> str:
    src = f"{cltab} and {hactl}" if hactl else cltab
    head = [
        f"# Converted from the OpenMosix::HA files {src} by reconciler.importer.",
        "# Groups and entries keep the cltab's order. Read the notes before using this spec.",
    ]
    if notes:
        head.append("# Notes:")
        head += [f"#   {n}".replace("\n", " ") for n in notes]
    body = tomli_w.dumps({"groups": groups}) if groups else ""
    return "\n".join(head) + "\n\n" + body

