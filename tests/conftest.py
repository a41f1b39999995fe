"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# --- etcd (tests/etcd_cluster.py) ---------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_single(tmp_path_factory):
    """One etcd member on free 127.0.0.1 ports for the whole session: use a unique prefix."""
    from etcd_cluster import EtcdCluster

    cluster = EtcdCluster(1, tmp_path_factory.mktemp("etcd-single")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_cluster3(tmp_path):
    """A fresh 3-member etcd cluster (fast elections) that a test may kill and restart."""
    from etcd_cluster import EtcdCluster

    cluster = EtcdCluster(3, tmp_path / "etcd3").start()
    try:
        yield cluster
    finally:
        cluster.stop()
