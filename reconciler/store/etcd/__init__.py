"""The etcd v3 backend (aetcd): the store itself (store.py) and the parts it composes: its
connection (conn.py), lease (lease.py), watch (watch.py), the mirror of the cluster's keys
(mirror.py), the claim transactions (claims.py), the renewal twin (twin.py), and the parsing of
what etcd holds (values.py)."""

from reconciler.store.etcd.store import EtcdStore  # noqa: F401 (re-exported: the backend)
