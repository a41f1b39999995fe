"""The fence hook: make sure a dead owner is really off before its group is taken over.

Contract (contrib/fence/README.md): the hook is run as an argv, no shell, with the dead
node's name filled in; exit 0 within the group's fence_timeout means the node is certainly
off or isolated. Anything else (non-zero exit, a timeout, a hook that cannot be started) is
a failure, and takeover must not happen.
"""

from __future__ import annotations

import asyncio
import time

import attrs

from reconciler.model import valid_name


@attrs.frozen
class Outcome:
    ok: bool
    message: str
    seconds: float


async def fence(argv: tuple[str, ...], *, node: str, timeout: float) -> Outcome:
    """Run the hook; never raises. The node name is checked again: it reaches a command line,
    and a name from the store such as "--all" must never become an option of the hook."""
    started = time.monotonic()
    if not valid_name(node):
        return Outcome(False, f"refused to fence {node!r}: not a valid node name", 0.0)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return Outcome(False, f"fence hook {argv[0]} cannot start: {exc.strerror or exc}", time.monotonic() - started)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Outcome(False, f"fence hook {argv[0]} timed out after {timeout:g}s", time.monotonic() - started)
    text = out.decode(errors="replace").strip().splitlines()
    last = text[-1][:200] if text else ""
    took = time.monotonic() - started
    if proc.returncode == 0:
        return Outcome(True, f"fenced {node}" + (f": {last}" if last else ""), took)
    return Outcome(False, f"fence hook {argv[0]} failed with exit {proc.returncode}" + (f": {last}" if last else ""), took)
