"""lm-evaluation-harness (the real ``lm_eval`` package, model ``local-completions``) scores shipped tasks against
``pdserve serve`` with the bundled model: per-sample loglikelihoods equal transformers' within 1e-3, for a
multiple-choice loglikelihood task and a rolling-loglikelihood (perplexity) task."""

from __future__ import annotations

import pytest

from api_servers import MODEL
from tests.helpers.lm_eval_check import HfScorer, assert_samples_match, run_lm_eval

pytestmark = pytest.mark.timeout(600)
pytest.importorskip("lm_eval")


def test_lm_eval_loglikelihoods_match_transformers(real_server, model_config, monkeypatch, tmp_path) -> None:
    model_dir = model_config.model.path
    samples = run_lm_eval(f"{real_server.url}/v1/completions", MODEL, model_dir, real_server.api_key,
                          ["pdserve_tiny_mc", "pdserve_tiny_ppl"], monkeypatch, tmp_path / "datasets")
    assert {len(samples["pdserve_tiny_mc"]), len(samples["pdserve_tiny_ppl"])} == {3, 2}
    assert assert_samples_match(samples, HfScorer(model_dir)) == 3 * 3 + 2
