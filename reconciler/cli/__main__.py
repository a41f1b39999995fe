"""`python -m reconciler.cli`: the `reconcile` command."""

from reconciler.cli import main

main()
