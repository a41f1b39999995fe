"""Shared pytest fixtures, and what each test needs.

A test is either a unit test (no root, namespaces, etcd, keepalived, Prometheus, supervisord
or spawned agents: `pytest -m "not integration"` runs them alone, as any user) or marked
`integration`. An integration test names what it needs, `@pytest.mark.needs("root", "etcd")`
(REQUIREMENTS in tests/helpers.py; the etcd and multi-node fixtures imply theirs:
FIXTURE_NEEDS below), and fails before it starts, with one line naming what is missing and
how to install it, when a requirement is not met: it never skips silently (.ci/run installs
everything).
"""

from __future__ import annotations

import itertools
import os

import pytest

from helpers import REQUIREMENTS, require

_TESTS = itertools.count(1)


# --- what tests need -------------------------------------------------------------------------


# fixture -> what a test using it needs (the fixtures below)
FIXTURE_NEEDS: dict[str, tuple[str, ...]] = {
    "etcd_single": ("etcd",),
    "etcd_cluster3": ("etcd",),
    "make_cluster": ("root", "unshare"),
}


def _needs(item: pytest.Item) -> list[str]:
    return [n for mark in item.iter_markers("needs") for n in mark.args]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the markers added here count
def pytest_collection_modifyitems(config, items):
    for item in items:
        implied = {n for fixture, needs in FIXTURE_NEEDS.items() if fixture in item.fixturenames for n in needs}
        # a parametrized store backend (test_store_contract.py): its etcd case needs etcd
        if getattr(item, "callspec", None) is not None and item.callspec.params.get("backend") == "etcd":
            implied.add("etcd")
        if implied:
            item.add_marker(pytest.mark.needs(*sorted(implied)))
            item.add_marker(pytest.mark.integration)
        needs = _needs(item)
        unknown = sorted(set(needs) - set(REQUIREMENTS))
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown requirement(s) {unknown}; known: {sorted(REQUIREMENTS)}")
        if needs and item.get_closest_marker("integration") is None:
            raise pytest.UsageError(f"{item.nodeid}: needs{tuple(needs)} but is not marked integration")


@pytest.hookimpl(tryfirst=True)  # before any fixture starts what the test needs
def pytest_runtest_setup(item):
    require(*dict.fromkeys(_needs(item)))


# --- fixtures ----------------------------------------------------------------------------------


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
