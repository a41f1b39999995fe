"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
import os

import pytest

_TESTS = itertools.count(1)


@pytest.fixture(autouse=True)
def own_cgroup():
    """Each test runs in a cgroup of its own (MOUNT/rtest-PID-tN, pytest moved in and back):
    an agent it starts puts its node's subtree under its own cgroup (reconciler/cgroups.py),
    so tests, and parallel test runs, never share one. Removed when empty (a session
    fixture first requested by the test, etcd say, lives on in it: removed at the end)."""
    from reconciler.host import cgroups

    found, before = cgroups.mount(), cgroups.own_cgroup()
    if found is None or before is None or found[1] != "/":
        yield None
        return
    path = os.path.join(found[0], f"rtest-{os.getpid()}-t{next(_TESTS)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "cgroup.procs"), "w") as fh:
            fh.write("0")
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        with open(os.path.join(found[0], before.lstrip("/"), "cgroup.procs"), "w") as fh:
            fh.write("0")
        cgroups.remove(path)  # only what is empty


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cgroups():
    yield
    import glob

    from reconciler.host import cgroups

    found = cgroups.mount()
    if found is not None:
        for path in glob.glob(os.path.join(found[0], f"rtest-{os.getpid()}-t*")):
            cgroups.remove(path)


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


# --- the multi-node harness (tests/cluster.py) ----------------------------------------------


@pytest.fixture
def make_cluster(tmp_path):
    """make_cluster(**Cluster options) -> a Cluster under tmp_path; every cluster made is
    stopped at the end of the test, and its double-run checker must have found nothing."""
    from cluster import Cluster

    made = []

    def make(**kw):
        c = Cluster(tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        assert c.violations() == [], "\n".join(c.violations())
