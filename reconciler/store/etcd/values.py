"""The values under the etcd store's prefix: parsed (and checked, through
reconciler/store/records.py) and hashed the same way by the store and its mirror.

    nodes/NODE     {"node", "counter", "digest", "status_hash", "wall", "instance"} (JSON)
    status/NODE    the node's status record (reconciler/published.py, JSON); status_hash() names it
    claims/GROUP   "NODE:GENERATION"; the key's create revision is the claim's token
    spec/head      the number of the current cluster spec revision (decimal)
    spec/rev/NNNNNNNNNN  one revision (published.revision_dumps; NNNNNNNNNN: its number)
"""

from __future__ import annotations

import hashlib
import json

from reconciler.published import EMPTY, NodeStatus
from reconciler.store import Claim, Heartbeat, records


def status_hash(value: bytes) -> str:
    """The hash a heartbeat names of its node's status value."""
    return hashlib.blake2b(value, digest_size=12).hexdigest()


def parse_status(value: bytes) -> tuple[bytes, NodeStatus, str, str]:
    """A status value, parsed (published.EMPTY if malformed), with its hash and why it is
    malformed ("" if it is not)."""
    doc = records.parse_status(value)
    if isinstance(doc, str):
        return value, EMPTY, status_hash(value), doc
    return value, doc, status_hash(value), ""


def announced_hash(beat) -> str | None:
    """The status_hash a parsed heartbeat names (None: none, as written by older versions)."""
    h = beat.get("status_hash") if isinstance(beat, dict) else None
    return h if isinstance(h, str) else None


def parse_heartbeat(node: str, beat, status: NodeStatus) -> Heartbeat | str:
    """A parsed nodes/NODE value as a Heartbeat carrying `status`; why not, if malformed."""
    why = records.check_name(node, "node")
    if why:
        return why
    if not isinstance(beat, dict):
        return "heartbeat is not a JSON object"
    fields = records.beat_fields(beat.get("counter"), beat.get("wall"), beat.get("digest"), beat.get("instance"))
    if isinstance(fields, str):
        return fields
    counter, wall, digest, instance = fields
    return Heartbeat(node=node, counter=counter, digest=digest, status=status, wall=wall, instance=instance)


def parse_claim_key(group: str, kv) -> Claim | str:
    """A claims/GROUP key as a Claim; why not, if malformed."""
    why = records.check_name(group, "group")
    if why:
        return why
    parsed = records.parse_claim(kv.value.decode(errors="replace"))
    if isinstance(parsed, str):
        return parsed
    return Claim(group=group, node=parsed[0], generation=parsed[1], token=str(kv.create_revision))


def parse_json(raw: bytes):
    """`raw` as JSON; None if empty or malformed."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def claim_owner(raw: bytes) -> tuple[str, int]:
    """"NODE:GENERATION" -> (NODE, GENERATION); ("", 0) if malformed."""
    parsed = records.parse_claim(raw.decode(errors="replace"))
    return ("", 0) if isinstance(parsed, str) else parsed


def parse_spec_head(raw: bytes) -> int | str:
    """spec/head's value: the current revision number (>= 1), or why it is malformed."""
    if not (raw.isdigit() and len(raw) <= 10 and int(raw) >= 1):
        return f"spec/head holds {raw[:20]!r}, not a revision number"
    return int(raw)
