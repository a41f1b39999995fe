"""What is really there on this node: Observed, built by the observers in this package.

Observed is a frozen value: the planner reads it, never the kernel.
"""

from __future__ import annotations


from reconciler.model import STATES, EntryState, Observed  # noqa: F401  (the values observers build)
