"""open_store(url): the backend for a store URL.

A module of its own, not part of the contract's package module (store/__init__.py), which
both backends import: were the factory there, each backend would reach the other through it
(the `store-backends` import contract keeps them independent).
"""

from __future__ import annotations

from typing import Any

from reconciler.spec import redact_url
from reconciler.store import Store, StoreError


def open_store(url: str, **options: Any) -> Store:
    """Build the backend for `url` ("dir:PATH" or "etcd://HOST:PORT,..."). Options: etcd TLS/auth."""
    if url.startswith("dir:"):
        from reconciler.store import directory

        return directory.DirectoryStore(url[4:])
    if url.startswith(("etcd://", "etcds://")):
        try:
            from reconciler.store import etcd
        except ImportError as exc:  # the etcd client is an optional extra (it brings grpcio)
            raise StoreError(f"{redact_url(url)}: etcd support is not installed ({exc.name}): pip install 'reconciler[etcd]'") from None

        return etcd.EtcdStore(url, **options)
    raise StoreError(f"{redact_url(url)}: unknown store (use dir:PATH or etcd://HOST:PORT)")
