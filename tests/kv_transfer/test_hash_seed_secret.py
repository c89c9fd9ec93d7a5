"""The block-hash seed derives from the cluster secret at every entry point (engines and router) and is never
echoed: handles and block headers carry only its public id (issue 11)."""

from __future__ import annotations

import argparse
import json

from disagg_helpers import engine, options_for, prefill_all, prompts_of
from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs
from pdserve.engine.core.block_hash import seed_id
from pdserve.engine.security import load_cluster_secret
from pdserve.services.router.cli import router_hash_seed
from tests.helpers.tiny_models import make_tiny_model


def test_engines_and_the_router_take_the_seed_from_the_cluster_secret():
    secret = load_cluster_secret()  # tests/conftest.py sets one for every test
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs(parser.parse_args([]))["hash_seed"] == secret.hash_seed() != 0
    assert router_hash_seed(None, secret) == secret.hash_seed()
    assert router_hash_seed(5, secret) == 5  # an explicit --hash-seed wins


def test_a_handle_carries_the_seed_id_never_the_seed(tmp_path, redis_url):
    seed = load_cluster_secret().hash_seed()
    model = make_tiny_model("llama", tmp_path / "llama")
    p = engine(model, "prefill", "shared-fs", config_overrides={"hash_seed": seed},
               **options_for("shared-fs", tmp_path, redis_url))
    handle = prefill_all(p, prompts_of([20]))["p0"].kv_transfer_params
    assert handle["descriptor"]["hash_seed_id"] == seed_id(seed) != seed
    assert "hash_seed" not in handle["descriptor"]
    text = json.dumps(handle)
    assert str(seed) not in text and f"{seed:x}" not in text


def test_the_routers_info_shows_the_seed_id_not_the_seed():
    from pdserve.services.router.hashing import PromptHasher

    seed = load_cluster_secret().hash_seed()
    info = PromptHasher(16, seed).describe()
    assert info["hash_seed_id"] == seed_id(seed) and seed not in info.values()
