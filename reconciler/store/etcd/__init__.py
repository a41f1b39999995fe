"""The etcd v3 backend (aetcd): the store itself, its connection and lease, its watch, and
the mirror of the cluster's keys that a watch keeps current."""

from reconciler.store.etcd.store import EtcdStore  # noqa: F401 (re-exported: the backend)
