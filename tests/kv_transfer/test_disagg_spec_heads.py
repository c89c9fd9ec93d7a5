"""A decode engine speculating with an EAGLE head after a KV handover: the prompt's KV (and so its hidden states)
was computed by the prefill engine, so the head's context starts at the decode engine's first step; outputs still
equal the monolithic engine's, and a head that predicts well gets its drafts accepted there."""

from __future__ import annotations

import json

from disagg_helpers import disagg, engine, monolithic, options_for, prompts_of, settle
from tests.helpers.spec_heads import copying_head
from tests.helpers.tiny_models import make_tiny_model


def test_decode_engine_speculates_with_eagle_after_the_handover(tmp_path) -> None:
    model = make_tiny_model("llama", tmp_path / "one", num_hidden_layers=1)
    spec = {"method": "eagle", "model": copying_head(model, tmp_path / "head"), "num_speculative_tokens": 3,
            "draft_kv_cache_gib": 0.001}
    prompts = prompts_of([5, 17, 40])
    opts = options_for("shared-fs", tmp_path, "")
    p = engine(model, "prefill", "shared-fs", **opts)
    d = engine(model, "decode", "shared-fs", config_overrides={"speculative_config": json.dumps(spec)}, **opts)
    assert disagg(p, d, prompts, max_tokens=24) == monolithic(model, prompts, max_tokens=24)
    stats = d.core.get_stats().spec_decode
    assert 0 < stats["num_accepted_tokens"] <= stats["num_draft_tokens"]
    settle(p, d)
