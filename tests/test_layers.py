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


def _config() -> list[dict]:
    """The import contracts in pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["importlinter"]["contracts"]


def _contracts() -> dict[str, str]:
    """id -> name of each import contract."""
    return {c["id"]: c["name"] for c in _config()}


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


def test_pure_core_contracts_name_every_pure_layer():
    """decide/ and every layer below spec that exists are the pure core: both pure-core
    contracts must name each (a layer added below spec is pure or it is misplaced)."""
    contracts = {c["id"]: c for c in _config()}
    layers = [name.strip("()") for name in contracts["layers"]["layers"]]
    pure = ["decide"] + layers[layers.index("spec") + 1 :]
    present = {f"reconciler.{n}" for n in pure if (PACKAGE / f"{n}.py").exists() or (PACKAGE / n).is_dir()}
    assert "reconciler.model" in present and "reconciler.decide" in present
    for cid in ("pure-core-layers", "pure-core-stdlib"):
        assert present <= set(contracts[cid]["source_modules"]), f"{cid}: add {sorted(present - set(contracts[cid]['source_modules']))}"


# For each contract, modules added to a copy of the package with an import that it alone forbids
# (new modules: they stay valid however the package's own modules are split later).
PLANTED = {
    "layers": {"store/planted.py": "import reconciler.act"},
    "pure-core-layers": {"decide/planted_host.py": "import reconciler.host"},
    "pure-core-stdlib": {"decide/planted_clock.py": "import time"},
    "store-backends": {"store/etcd/planted.py": "import reconciler.store.directory"},
    "keeper-stdlib": {"host/planted.py": "import reconciler.model"},
    "no-circles": {"spec/planted_a.py": "from reconciler.spec import planted_b", "spec/planted_b.py": "from reconciler.spec import planted_a"},
}


def test_each_contract_catches_what_it_forbids(tmp_path):
    contracts = _contracts()
    assert set(PLANTED) == set(contracts), "a contract without a planted violation here, or the reverse"
    shutil.copytree(PACKAGE, tmp_path / "reconciler", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for modules in PLANTED.values():
        for file, source in modules.items():
            assert not (tmp_path / "reconciler" / file).exists(), file
            (tmp_path / "reconciler" / file).write_text(f"{source}\n")
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
            module = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            names = [f"{module}.{a.name}" for a in node.names]
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
    source = (
        "from __future__ import annotations\nimport os.path\nimport attrs\nfrom reconciler import host\n"
        "def f():\n    from reconciler import spec\n    from . import procfs\n    from .. import model\n    from cattrs import gen\n"
    )
    assert foreign_imports(source, package="reconciler.host") == ["attrs", "reconciler.spec", "reconciler.model", "cattrs.gen"]


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
