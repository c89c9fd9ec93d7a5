"""What each part of pdserve may import (docs/architecture.md, "What may import what").

Every product module is parsed (not imported) and each of its ``pdserve.*`` imports, at any depth of the code, is
checked against ``MAY_IMPORT``: the rule of the longest matching module prefix applies. No product module may
import the tests (or their doubles in ``tests/helpers``). Torch-freedom is checked by importing:
tests/test_no_torch_imports.py.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINE = ("pdserve.engine",)
# module prefix -> the pdserve packages its modules may import (besides their own prefix).
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "pdserve.proto": (),
    "pdserve.kernels": (),
    # The operator generates each InferenceService's cluster secret in the format the pods read.
    "pdserve.operator": ("pdserve.engine.security",),
    "pdserve.engine.core": ("pdserve.engine.config", "pdserve.engine.request", "pdserve.engine.sampling_params",
                            "pdserve.engine.outputs", "pdserve.engine.kv_transfer"),
    "pdserve.engine": ("pdserve.kernels", "pdserve.proto"),
    "pdserve.services.api": (*ENGINE, "pdserve.proto", "pdserve.cli.engine_args"),
    "pdserve.services.prefill": (*ENGINE, "pdserve.proto", "pdserve.services.api", "pdserve.cli.engine_args"),
    "pdserve.services.decode": (*ENGINE, "pdserve.proto", "pdserve.services.api", "pdserve.services.prefill",
                                "pdserve.cli.engine_args"),
    "pdserve.services.router": (*ENGINE, "pdserve.proto", "pdserve.services.api"),
    "pdserve.bench": ("pdserve",),
    # The simulator runs the real scheduler, servers and the operator's control law around a costed core.
    "pdserve.sim": (*ENGINE, "pdserve.services", "pdserve.operator.autoscaler", "pdserve.cli.engine_args"),
    "pdserve.cli": ("pdserve",),
    "pdserve": ENGINE,
}


def _product_modules() -> dict[str, Path]:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if not name.startswith("pdserve.pdserve"):  # pdserve/ maps to pdserve itself
                modules[name] = path
    return modules


def _imports(module: str, path: Path) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
    return found


def _rule(module: str) -> str:
    return max((p for p in MAY_IMPORT if module == p or module.startswith(p + ".")), key=len)


def _allowed(module: str, target: str) -> bool:
    rule = _rule(module)
    prefixes = (rule, *MAY_IMPORT[rule])
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_every_part() -> None:
    modules = _product_modules()
    for name in ("pdserve.engine.core.scheduler", "pdserve.kernels.attention", "pdserve.operator.crd",
                 "pdserve.services.router.plugins.base", "pdserve.bench.serve", "pdserve.cli.main",
                 "pdserve.proto.regen"):
        assert name in modules
    assert not any(name.startswith(("pdserve.tests", "pdserve.charts")) for name in modules)


def test_no_product_module_imports_the_tests() -> None:
    offenders = sorted(f"{m} imports {t}" for m, p in _product_modules().items() for t in _imports(m, p)
                       if t == "tests" or t.startswith("tests."))
    assert offenders == []


def test_every_import_follows_the_rules() -> None:
    offenders = sorted(f"{m} imports {t}" for m, p in _product_modules().items() for t in _imports(m, p)
                       if t.startswith("pdserve.") and not _allowed(m, t))
    assert offenders == []


def test_the_rules_can_fail() -> None:
    assert not _allowed("pdserve.engine.core.scheduler", "pdserve.engine.worker.model_runner")
    assert not _allowed("pdserve.services.router.engine", "pdserve.services.prefill.server")
    assert not _allowed("pdserve.engine.llm", "pdserve.services.api.app")
    assert not _allowed("pdserve.kernels.attention", "pdserve.engine.config")
    assert _allowed("pdserve.engine.worker.model_runner", "pdserve.kernels.attention")
