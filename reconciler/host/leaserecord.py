"""The lease file's record: the one format the agent writes (reconciler/cluster/leasefile.py)
and the keeper reads (reconciler/keeper.py). Standard library only."""

from __future__ import annotations

import math
import zlib

RELEASED = float("-inf")  # read_deadline's value for the "released" record: no lease at all


def lease_record(deadline: float) -> bytes:
    """The lease file's content: "DEADLINE CRC32\n", always 30 bytes (the agent rewrites it
    in place, so a reader may catch it half-written: the checksum tells). RELEASED (-inf)
    gives the clean-shutdown record "released CRC32\n", as long and as checked."""
    text = f"{'released':>20}" if deadline == RELEASED else f"{deadline:020.6f}"
    return f"{text} {zlib.crc32(text.strip().encode()):08x}\n".encode()


def read_deadline(path: str) -> float | None:
    """The deadline in the lease file; RELEASED for the clean-shutdown record; None if the
    file is missing, caught mid-write, truncated, or anything but a checksummed record."""
    try:
        with open(path, "rb") as fh:
            fields = fh.read(64).split()
        if len(fields) != 2 or int(fields[1], 16) != zlib.crc32(fields[0]):
            return None
        if fields[0] == b"released":
            return RELEASED
        deadline = float(fields[0])
        return deadline if math.isfinite(deadline) else None
    except (OSError, ValueError):
        return None

