"""The error a mount or address action raises (act/mounts.py, act/addresses.py), in a module
of its own: the facade act/resources.py imports those modules, and they need only this."""

from __future__ import annotations


class ResourceError(Exception):
    """A resource action failed; str() is the kernel's or mount(8)'s message, one line.

    `permanent=True`: retrying the same spec on this node cannot help (a missing device or
    interface, an unknown filesystem type, the IP on another interface)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.message = message
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"ResourceError({self.message!r}, permanent={self.permanent})"
