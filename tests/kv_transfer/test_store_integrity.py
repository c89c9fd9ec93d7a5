"""Stored KV that anyone with write access to the store could plant (issue 11, acceptance 3): a block with a valid
CRC but no valid MAC is refused and recomputed, and the answer equals the monolithic engine's."""

from __future__ import annotations

import dataclasses

import pytest

from disagg_helpers import MAX_TOKENS, connector_stats, decode_all, engine, monolithic, options_for, prefill_all
from disagg_helpers import prompts_of, settle
from pdserve.engine.kv_transfer.base import KVTransferParams
from pdserve.engine.kv_transfer.block_format import (ChecksumError, MACError, decode_block, encode_block,
                                                     make_header, verify_mac)
from pdserve.engine.kv_transfer.stores.store import block_key
from pdserve.engine.security import ClusterSecret, load_cluster_secret
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = prompts_of([21, 40, 9])
OTHER_KEY = ClusterSecret(b"an-attacker-guessed-secret").derive("kv-block")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-integrity") / "llama")


def test_block_mac_round_trip_and_refusals(descriptor):
    key = load_cluster_secret().derive("kv-block")
    payload = bytes(range(256)) * (descriptor.payload_bytes() // 256)
    blob = encode_block(descriptor, 7, descriptor.block_size, payload, key)
    header, view = decode_block(blob, descriptor, 7, descriptor.block_size, key)
    assert bytes(view) == payload and len(header.mac) == 32
    with pytest.raises(MACError, match="failed its MAC check"):
        decode_block(encode_block(descriptor, 7, descriptor.block_size, payload, OTHER_KEY), descriptor, 7,
                     mac_key=key)
    with pytest.raises(MACError, match="carries no MAC"):
        decode_block(encode_block(descriptor, 7, descriptor.block_size, payload), descriptor, 7, mac_key=key)
    # The MAC covers the header too: a valid block's MAC under another block hash does not verify.
    moved = dataclasses.replace(make_header(descriptor, 8, descriptor.block_size, payload), mac=header.mac)
    with pytest.raises(MACError):
        verify_mac(key, moved, payload)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ChecksumError):
        decode_block(bytes(tampered), descriptor, 7, mac_key=key)


@pytest.mark.parametrize("connector", ["shared-fs", "redis"])
def test_a_planted_block_with_a_valid_crc_is_refused_and_recomputed(connector, model, tmp_path, redis_url):
    opts = options_for(connector, tmp_path, redis_url, kv_load_timeout_s=0.3)
    p, d = engine(model, "prefill", connector, **opts), engine(model, "decode", connector, **opts)
    firsts = prefill_all(p, PROMPTS, tag="p")
    settle(p)  # every save written
    store = p.core.scheduler.kv_connector.store
    desc = p.core.scheduler.kv_connector.ctx.descriptor
    handle = KVTransferParams.from_dict(firsts["p1"].kv_transfer_params)
    victim = handle.block_hashes[1]
    header, payload = decode_block(store.get(block_key(victim)), desc)
    planted = bytes(b ^ 0x55 for b in payload)  # other KV under the same hash, a correct CRC, a foreign MAC
    store.put(block_key(victim), encode_block(desc, victim, header.num_tokens, planted, OTHER_KEY))
    rest = decode_all(d, PROMPTS, firsts)
    got = [firsts[f"p{i}"].outputs[0].token_ids + rest[f"p{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]
    assert got == monolithic(model, PROMPTS, MAX_TOKENS)
    assert connector_stats(d).failures == {"mac": 1}
    settle(p, d)


def test_a_planted_block_is_a_miss_even_under_the_fail_policy(model, tmp_path, redis_url):
    opts = options_for("redis", tmp_path, redis_url, kv_load_timeout_s=0.3)
    p = engine(model, "prefill", "redis", **opts)
    d = engine(model, "decode", "redis", load_failure_policy="fail", **opts)
    prompts = prompts_of([33], seed=5)
    firsts = prefill_all(p, prompts, tag="p")
    settle(p)
    store = p.core.scheduler.kv_connector.store
    desc = p.core.scheduler.kv_connector.ctx.descriptor
    victim = KVTransferParams.from_dict(firsts["p0"].kv_transfer_params).block_hashes[0]
    header, payload = decode_block(store.get(block_key(victim)), desc)
    store.put(block_key(victim), encode_block(desc, victim, header.num_tokens, bytes(payload)))  # no MAC at all
    rest = decode_all(d, prompts, firsts)
    assert rest["p0"].outputs[0].finish_reason != "abort"
    got = firsts["p0"].outputs[0].token_ids + rest["p0"].outputs[0].token_ids
    assert [got] == monolithic(model, prompts, MAX_TOKENS)
    assert connector_stats(d).failures == {"mac": 1}
    settle(p, d)
