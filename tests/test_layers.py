"""The checks that keep the package's shape (issue 13; CONTRIBUTING.md, "Layers and contracts").

- the import contracts of pyproject.toml [tool.importlinter], run by `lint-imports`; and that
  each contract does catch the import it forbids (planted in a copy of the package), so that
  a contract matching nothing cannot pass for a kept one;
- the keeper and host/ import only the standard library and host/ (a contract can forbid
  modules, not allow only some: this file checks the allow-list);
- mypy over the package, as configured in pyproject.toml [tool.mypy].

Both tools come with the `test` extra. A missing one fails here: it is never skipped.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reconciler"
# The console scripts of the environment running the tests (a venv's bin/).
BIN = Path(sys.executable).parent


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: pip install -e '.[test]' (the test extra brings it)")
    return path


def _contracts() -> dict[str, str]:
    """id -> name of each import contract in pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        config = tomllib.load(fh)["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def _lint_imports(cwd: Path, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [_tool("lint-imports"), "--no-cache", "--no-logo"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports: import contracts broken (pyproject.toml [tool.importlinter]):\n{out}"
    for name in _contracts().values():
        assert f"{name} KEPT" in out, out


# One import per contract that it alone forbids, appended to a copy of the package.
PLANTED = {
    "layers": ("store/records.py", "from reconciler.act import fence"),
    "pure-core-layers": ("decide/intent.py", "from reconciler.host import procfs"),
    "pure-core-stdlib": ("model.py", "import time"),
    "store-backends": ("store/directory.py", "from reconciler.store.etcd import conn"),
    "keeper-stdlib": ("host/leaserecord.py", "from reconciler import model"),
    "no-circles": ("spec/model.py", "from reconciler.spec import strictmodes"),
}


def test_each_contract_catches_what_it_forbids(tmp_path):
    contracts = _contracts()
    assert set(PLANTED) == set(contracts), "a contract without a planted violation here, or the reverse"
    shutil.copytree(PACKAGE, tmp_path / "reconciler", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for file, line in PLANTED.values():
        with open(tmp_path / "reconciler" / file, "a") as fh:
            fh.write(f"\n{line}\n")
    found = subprocess.run(  # where lint-imports will find the package: the copy
        [sys.executable, "-c", "import reconciler; print(reconciler.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, check=True,
    ).stdout
    assert found.startswith(str(tmp_path)), found

    result = _lint_imports(tmp_path, pythonpath=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    for cid, name in contracts.items():
        assert f"{name} BROKEN" in out, f"contract {cid!r} did not catch {PLANTED[cid]}:\n{out}"


# --- the keeper and host/: the standard library and host/ only ---------------------------------


def foreign_imports(source: str, *, package: str) -> list[str]:
    """The modules `source` (a module of `package`) imports that are neither the standard
    library nor reconciler.host: every import statement, at any depth (a function's too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            if name == "reconciler.host" or name.startswith("reconciler.host."):
                continue
            found.append(name)
    return found


def test_foreign_imports_finds_them():
    source = "import os\nimport attrs\ndef f():\n    from reconciler import spec\n    from . import procfs\n    from .. import model\n"
    assert foreign_imports(source, package="reconciler.host") == ["attrs", "reconciler", "reconciler"]


def test_keeper_and_host_import_only_the_standard_library_and_host():
    files = {PACKAGE / "keeper.py": "reconciler"}
    files.update({f: "reconciler.host" for f in sorted((PACKAGE / "host").glob("*.py"))})
    assert len(files) > 2
    bad = {str(f.relative_to(ROOT)): foreign_imports(f.read_text(), package=p) for f, p in files.items()}
    assert not {f: names for f, names in bad.items() if names}


# --- mypy ---------------------------------------------------------------------------------------


def test_mypy():
    # mypy's cache, kept between runs (a cold run takes seconds, a warm one a fraction) in the
    # temporary directory, one per checkout: mypy checks each entry against the source.
    cache = Path(tempfile.gettempdir()) / f"reconciler-mypy-{hashlib.sha1(bytes(ROOT)).hexdigest()[:12]}"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    if "No module named mypy" in out:
        pytest.fail(f"mypy is not installed for {sys.executable}: pip install -e '.[test]' (the test extra brings it)")
    assert result.returncode == 0, f"mypy (pyproject.toml [tool.mypy]):\n{out}"
    assert "Success: no issues found" in out, out
