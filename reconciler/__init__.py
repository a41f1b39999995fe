"""reconciler: high availability for a cluster of Linux machines, declared in TOML."""

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic) and
# `reconcile --version` prints it. Bump it with every release and name the release in CHANGELOG.md.
__version__ = "0.2.0"
