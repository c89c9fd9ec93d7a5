"""Every object the operator renders, for every example InferenceService, is valid for Kubernetes 1.29 and 1.33."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdserve.operator import constants as c
from pdserve.operator.cli import render_documents

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_rendered_objects_are_valid(manifest_problems, example: Path, version: str) -> None:
    docs = list(yaml.safe_load_all(example.read_text()))
    assert manifest_problems(docs, version) == []  # the example itself
    objs = render_documents(docs, namespace="default", default_image=c.DEFAULT_IMAGE)
    assert objs
    assert manifest_problems(objs, version) == []
