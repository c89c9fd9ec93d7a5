"""Prefill engine -> connector -> decode engine, in one process: greedy outputs equal the monolithic engine's.

Each connector moves the KV of a batch of prompts (most not a whole number of blocks) from an engine in the
``prefill`` role to one in the ``decode`` role; the decode engine computes nothing of the prompts (only the
prefill's first token), produces the monolithic engine's tokens, and both engines end with every block free.
Both pods run with asynchronous scheduling too (forced: CPU defaults to off), against the synchronous monolithic
engine.
"""

from __future__ import annotations

import pytest

from disagg_helpers import MAX_TOKENS, disagg, engine, monolithic, options_for, prompts_of, settle
from tests.helpers.tiny_models import make_tiny_model

CONNECTORS = ["shared-fs", "redis", "grpc"]
LENGTHS = [5, 16, 17, 40, 33, 64]  # whole blocks and partial ones


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in ("llama", "qwen3")}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_models_token_identical(connector, arch, asynchronous, tiny_dirs, tmp_path, redis_url):
    model, prompts = tiny_dirs[arch], prompts_of(LENGTHS)
    opts = options_for(connector, tmp_path, redis_url)
    p = engine(model, "prefill", connector, asynchronous=asynchronous, **opts)
    d = engine(model, "decode", connector, asynchronous=asynchronous, **opts)
    assert disagg(p, d, prompts) == monolithic(model, prompts)
    # The decode engine computed only the prefill's first token of each request, then decoded.
    assert d.core.num_computed_tokens_total == len(prompts) * (MAX_TOKENS - 1)
    settle(p, d)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("connector", CONNECTORS)
def test_bundled_model_token_identical(connector, asynchronous, tmp_path, redis_url):
    model = "smollm2-135m-instruct"
    opts = options_for(connector, tmp_path, redis_url)
    p = engine(model, "prefill", connector, asynchronous=asynchronous, **opts)
    tok = p.tokenizer
    # 5 and 21 tokens: a partial block alone, and a full block plus a partial one.
    prompts = [tok(t).input_ids for t in ("The capital of France is", "Write a haiku about the sea, the moon and "
                                                                       "the tide coming in at night over the rocks.")]
    d = engine(model, "decode", connector, asynchronous=asynchronous, **opts)
    assert disagg(p, d, prompts, max_tokens=4) == monolithic(model, prompts, max_tokens=4)
    assert d.core.num_computed_tokens_total == len(prompts) * 3
    settle(p, d)
