"""The import mapping is ordinary and strict (docs/architecture.md, pyproject.toml).

Only the folders that ``package-dir`` maps import as ``pdserve.*``. The repository root is no import location
(pyproject.toml): the suite keeps it last on sys.path, so its ``operator/`` and ``kernels/`` never shadow the
standard library's ``operator`` or the PyPI package ``kernels``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    # `python -m` from the repository root: the working directory goes first on sys.path, as for a user there.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["pdserve.tests", "pdserve.charts", "pdserve.pdserve", "pdserve.docs",
                                  "pdserve.scripts", "pdserve.tests.helpers"])
def test_unmapped_folders_do_not_import_under_pdserve(name: str) -> None:
    result = _run(f"import {name}")
    assert result.returncode != 0
    assert f"No module named '{name.rsplit('.', 1)[0] if name.count('.') > 1 else name}'" in result.stderr


def test_mapped_folders_import_from_the_repository() -> None:
    code = ("import pdserve.engine.core, pdserve.kernels, pdserve.operator, pdserve.services.router, "
            "pdserve.proto.pdserve.v1.generate_pb2 as g, pdserve.cli; "
            "print(pdserve.engine.core.__file__, pdserve.kernels.__file__, pdserve.operator.__file__, g.__file__)")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(ROOT / "engine/core/__init__.py"), str(ROOT / "kernels/__init__.py"),
                                     str(ROOT / "operator/__init__.py"),
                                     str(ROOT / "proto/pdserve/v1/generate_pb2.py")]


def test_the_suite_keeps_the_root_last_on_sys_path() -> None:
    at = [i for i, p in enumerate(sys.path) if Path(p or ".").resolve() == ROOT]
    assert len(at) == 1
    # After the standard library and site-packages. (Libraries may append folders of their own at run time:
    # grpc_tools adds its bundled .proto files, so the root need not stay the very last entry.)
    import sysconfig

    base_dirs = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "purelib", "platlib")}
    assert all(i < at[0] for i, p in enumerate(sys.path) if Path(p or ".").resolve() in base_dirs)
    import operator

    assert Path(operator.__file__).name == "operator.py"
    # `kernels` is also a PyPI package (transformers imports it where installed): that one must win.
    spec = importlib.util.find_spec("kernels")
    installed = [d for d in importlib.metadata.distributions() if d.metadata["Name"] == "kernels"]
    assert spec is not None and (Path(spec.origin).parent != ROOT / "kernels") == bool(installed)


def test_every_python_folder_under_a_mapped_root_is_a_package() -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    missing = [str(d.relative_to(ROOT)) for folder in mapping.values() for d in (ROOT / folder).rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    missing += [folder for folder in mapping.values() if not (ROOT / folder / "__init__.py").is_file()]
    assert missing == []


def test_a_built_wheel_carries_every_data_file_the_packages_read(tmp_path: Path) -> None:
    """A non-editable install (the container image's) gets only what the wheel holds: every tracked non-Python
    file under a mapped root must be in it, or code that reads it (the simulator's profiles) fails there."""
    import zipfile

    roots = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tracked = subprocess.run(["git", "ls-files", *roots.values()], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = {f for f in tracked if not f.endswith((".py", ".pyi"))}
    subprocess.run([sys.executable, "-P", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    wheel = next(tmp_path.glob("pdserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    folder_of = {folder: name.replace(".", "/") for name, folder in roots.items()}
    expected = set()
    for f in data:
        folder, _, rest = f.partition("/")
        expected.add(f"{folder_of[folder]}/{rest}")
    assert expected and expected <= names, sorted(expected - names)
