"""Packaging: the version is single-sourced, and the sdist carries what operators need."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import reconciler

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_single_sourced_and_printed():
    out = subprocess.run([sys.executable, "-m", "reconciler.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"reconcile {reconciler.__version__}"
    assert importlib.metadata.version("reconciler") == reconciler.__version__
    assert f"## {reconciler.__version__} " in (ROOT / "CHANGELOG.md").read_text()


def test_sdist_carries_docs_contrib_specs_and_license(tmp_path):
    # setuptools' PEP 517 backend, in process in a child (no network, no isolated build env),
    # on a copy of the tree: the build writes its egg-info next to the sources, and the
    # checkout may not be ours to write (the unit tests run as any user)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "__pycache__",
                                                              ".hypothesis", ".pytest_cache"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=src)
    assert out.returncode == 0, out.stderr[-2000:]
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for wanted in ("LICENSE", "CHANGELOG.md", "README.md", "docs/design.md", "docs/operations.md",
                   "contrib/systemd/reconciler.service", "contrib/prometheus/alerts.yml", "specs/example.toml",
                   "specs/examples/webdb/db.toml", "specs/examples/openmosix/cltab", "docs/tutorial.md",
                   "reconciler/keeper.py"):
        assert wanted in members, f"{wanted} missing from {name}"
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)


def test_directory_store_runs_without_the_etcd_client():
    # aetcd (and grpcio) blocked as if the [etcd] extra were not installed
    code = """
import sys
sys.modules["aetcd"] = None
from reconciler.store import StoreError
from reconciler.store.factory import open_store
assert type(open_store("dir:" + sys.argv[1])).__name__ == "DirectoryStore"
try:
    open_store("etcd://127.0.0.1:2379")
except StoreError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code, "/nonexistent-reconciler-store"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "etcd://127.0.0.1:2379: etcd support is not installed (aetcd): pip install 'reconciler[etcd]'"
