"""EAGLE, EAGLE-3 and Medusa proposers end to end in the engine core on CPU: heads saved in the published checkpoint
layouts and loaded through the loader; greedy outputs token-identical with speculation on and off (chunked
prefill, prefix caching, preemption, asynchronous scheduling), on tiny Llama / Qwen3 configs and the bundled
model; a head that predicts well gets its drafts accepted; sampling keeps its distribution; bad checkpoints are
refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec_decode.eagle_head import save_eagle_checkpoint
from tests.engine.spec_decode.test_spec_engine import (GREEDY, assert_sampling_distribution_unchanged, engine,
                                                       prompts, run)
from tests.helpers.spec_heads import as_pickle, copying_head, make_eagle3_head, make_eagle_head, make_medusa_heads
from tests.helpers.tiny_models import make_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: conftest.py


def head_specs(target: str, directory: Path, qkv_bias: bool = False) -> list[dict]:
    kv = {"draft_kv_cache_gib": 0.001}
    return [{"method": "eagle", "model": make_eagle_head(target, directory / "eagle", qkv_bias=qkv_bias),
             "num_speculative_tokens": 3, **kv},
            {"method": "eagle3", "model": make_eagle3_head(target, directory / "eagle3"),
             "num_speculative_tokens": 3, **kv},
            {"method": "medusa", "model": make_medusa_heads(target, directory / "medusa"), "num_speculative_tokens": 3},
            {"method": "medusa", "model": make_medusa_heads(target, directory / "medusa-vllm", num_heads=2,
                                                            num_layers=2, layout="vllm"),
             "num_speculative_tokens": 2}]


def assert_identical(model: str, specs: list[dict], configs: list[dict], requests=None, **kw) -> None:
    requests = requests or [(p, GREEDY) for p in prompts()]
    for config in configs:
        base = run(engine(model, **config, **kw), requests)
        for spec in specs:
            core = engine(model, spec, **config, **kw)
            assert run(core, requests) == base, (config, spec["method"])
            assert core.get_stats().spec_decode["num_draft_tokens"] > 0, (config, spec)
            if config.get("num_blocks"):
                assert core.get_stats().num_preemptions > 0
            if spec["method"] != "medusa":  # every block of the head's own cache came back
                proposer = core.spec.proposer
                assert not proposer._tables and len(proposer._free) == proposer.num_blocks


def test_random_heads_greedy_identity_llama(llama, tmp_path) -> None:
    """Default pool (chunked prefill: prompts of 25 to 41 tokens at 32 a step; prefix hits on the shared prefix),
    a pool so small that requests are preempted, and asynchronous scheduling."""
    assert_identical(llama, head_specs(llama, tmp_path),
                     [{}, {"num_blocks": 6}, {"async_scheduling": True}])


def test_random_heads_greedy_identity_qwen3(tmp_path) -> None:
    qwen3 = make_tiny_model("qwen3", tmp_path / "qwen3")
    assert_identical(qwen3, head_specs(qwen3, tmp_path, qkv_bias=True)[:3], [{}])  # a head with q/k/v biases


def test_random_heads_greedy_identity_bundled_model(tmp_path) -> None:
    from pdserve.engine.model_loader.bundled import ensure_bundled

    target = str(ensure_bundled("smollm2-135m-instruct"))
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(100, 10000, (20,), generator=g).tolist()
    requests = [(shared + torch.randint(100, 10000, (n,), generator=g).tolist(),
                 SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)) for n in (3, 20)]
    specs = head_specs(target, tmp_path)
    # EAGLE-3 reading the authors' default layers (2, 15, 27) of the 30.
    specs[1]["model"] = make_eagle3_head(target, tmp_path / "e3-default", draft_vocab=512, aux_layers=None)
    assert_identical("smollm2-135m-instruct", specs[:3], [{}], requests, max_num_batched_tokens=24)


def test_a_head_that_predicts_is_accepted(tmp_path) -> None:
    target = make_tiny_model("llama", tmp_path / "one", num_hidden_layers=1)
    spec = {"method": "eagle", "model": copying_head(target, tmp_path / "copy"), "num_speculative_tokens": 3,
            "draft_kv_cache_gib": 0.001}
    requests = [(p, GREEDY) for p in prompts()]
    base = run(engine(target), requests)
    core = engine(target, spec)
    steps = core.num_steps
    assert run(core, requests) == base
    stats = core.get_stats().spec_decode
    assert stats["num_accepted_tokens"] > 0.5 * stats["num_draft_tokens"] > 0
    assert all(n > 0 for n in stats["accepted_per_pos"])  # every position accepts sometimes: mean length > 2
    assert 1 + stats["num_accepted_tokens"] / stats["num_drafts"] > 2
    assert core.num_steps - steps < 3 * 30 * 0.6  # far fewer steps than tokens


def test_sampling_distribution_is_unchanged_with_eagle(tmp_path) -> None:
    """Tokens 2 to 4 of many sampled continuations with a random EAGLE head (an 8-token vocabulary: its guesses
    are right often enough to be verified both ways) have the distribution of plain sampling."""
    model = make_tiny_model("llama", tmp_path / "v8", vocab_size=8, initializer_range=0.2)
    spec = {"method": "eagle", "model": make_eagle_head(model, tmp_path / "eagle"), "num_speculative_tokens": 2,
            "adaptive": False, "draft_kv_cache_gib": 0.01}
    prompt = [3, 4, 5, 6, 7, 3, 5, 7]
    sp = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.9, top_p=0.8)
    n = 500
    assert_sampling_distribution_unchanged(model, spec, prompt, sp, n)


def test_pickled_checkpoints_load_too(llama, tmp_path) -> None:
    """Heads shipped as ``pytorch_model.bin`` (EAGLE) and ``medusa_lm_head.pt`` (Medusa) load like safetensors."""
    eagle = as_pickle(make_eagle_head(llama, tmp_path / "e1"), "pytorch_model.bin")
    medusa = as_pickle(make_medusa_heads(llama, tmp_path / "m"), "medusa_lm_head.pt")
    requests = [(prompts()[0], GREEDY)]
    base = run(engine(llama), requests)
    for spec in ({"method": "eagle", "model": eagle, "draft_kv_cache_gib": 0.001},
                 {"method": "medusa", "model": medusa, "num_speculative_tokens": 3}):
        core = engine(llama, spec)
        assert run(core, requests) == base
        assert core.get_stats().spec_decode["num_draft_tokens"] > 0


def test_bad_checkpoints_are_refused(llama, tmp_path) -> None:
    eagle3 = make_eagle3_head(llama, tmp_path / "e3")
    with pytest.raises(ValueError, match="use method eagle3"):
        engine(llama, {"method": "eagle", "model": eagle3})
    with pytest.raises(ValueError, match="not an EAGLE-3 checkpoint"):
        engine(llama, {"method": "eagle3", "model": make_eagle_head(llama, tmp_path / "e1")})
    with pytest.raises(ValueError, match="has 2 heads"):
        engine(llama, {"method": "medusa", "model": make_medusa_heads(llama, tmp_path / "m", num_heads=2),
                       "num_speculative_tokens": 3})
    with pytest.raises(ValueError, match="needs \"model\""):
        engine(llama, {"method": "eagle"})
    with pytest.raises(ValueError, match="not a head checkpoint directory"):
        engine(llama, {"method": "eagle", "model": str(tmp_path / "nowhere")})
    other = make_tiny_model("llama", tmp_path / "wide", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="hidden size"):
        engine(llama, {"method": "eagle", "model": make_eagle_head(other, tmp_path / "e-wide")})


def test_trainable_head_matches_the_engine_head(llama, tmp_path) -> None:
    """The training script's head and the engine's, loaded from what the former saves, compute the same guesses
    over a sequence (dense causal attention there, the paged cache here), and the script's second pass is the
    engine's second guess."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.spec_decode.eagle_train import EagleTrainHead
    from pdserve.engine.worker.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig.create(llama, device="cpu", attention_backend="torch"))
    target = runner.model
    torch.manual_seed(0)
    train = EagleTrainHead(target.config)
    with torch.no_grad():
        train.post_attention_layernorm.weight.add_(0.1 * torch.randn_like(train.post_attention_layernorm.weight))
    tensors, fields = train.checkpoint(torch.float32)
    save_eagle_checkpoint(tmp_path / "head", tensors, fields)
    from pdserve.engine.spec_decode.eagle import EagleProposer

    proposer = EagleProposer(str(tmp_path / "head"), 1, runner, kv_cache_bytes=1 << 20, max_model_len=512)
    tokens = torch.randint(3, 500, (1, 20))
    hidden = torch.randn(1, 20, target.config.hidden_size)
    with torch.no_grad():
        dense = train(target.model.embed_tokens(tokens), hidden)[0]
    from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
    from pdserve.engine.worker.input_batch import build_inputs

    proposer._reserve("r", 19)
    inputs = build_inputs(SchedulerOutput([ScheduledChunk("r", tokens[0].tolist(), 0, proposer._tables["r"], True)]),
                          runner.block_size, runner.device)
    with torch.no_grad():
        _, paged = proposer.head(inputs.input_ids, inputs.positions, hidden[0], proposer.kv_cache,
                                 inputs.attn_metadata, True)
    torch.testing.assert_close(paged, dense, atol=1e-4, rtol=1e-4)

    # The second pass the script also trains is the head's second guess: positions 0 .. 18 from the target's
    # features in the cache, then position 19 fed with the head's own output at 18.
    with torch.no_grad():
        first, second = train.forward_two_steps(target.model.embed_tokens(tokens), hidden)
    torch.testing.assert_close(first[0], dense, atol=1e-5, rtol=1e-5)
    inputs = build_inputs(SchedulerOutput([ScheduledChunk("r", tokens[0, :19].tolist(), 0, proposer._tables["r"],
                                                          True)]), runner.block_size, runner.device)
    step = build_inputs(SchedulerOutput([ScheduledChunk("r", [int(tokens[0, 19])], 19, proposer._tables["r"], True)]),
                        runner.block_size, runner.device)
    with torch.no_grad():
        _, out = proposer.head(inputs.input_ids, inputs.positions, hidden[0, :19], proposer.kv_cache,
                               inputs.attn_metadata, True)
        _, guess = proposer.head(step.input_ids, step.positions, out[18:19], proposer.kv_cache,
                                 step.attn_metadata, False)
    torch.testing.assert_close(guess[0], second[0, 19], atol=1e-4, rtol=1e-4)


def test_runner_exposes_the_hidden_states_transformers_computes(llama) -> None:
    """EAGLE-3's features (the residual stream entering the chosen layers) and EAGLE-1's (the final normed hidden
    state) are those of transformers' ``output_hidden_states``, one row per token of the step."""
    from transformers import AutoModelForCausalLM

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
    from pdserve.engine.worker.model_runner import ModelRunner

    tokens = prompts()[2][:20]
    hf = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states  # embeddings, then each layer
    step = SchedulerOutput([ScheduledChunk("r", tokens, 0, [0, 1], True)])
    runner = ModelRunner(EngineConfig.create(llama, device="cpu", attention_backend="torch", num_blocks=4))
    runner.execute_model(step)
    assert runner.last_hidden is None  # nothing kept unless a proposer asks
    runner.capture_hidden_states("last")
    runner.execute_model(step)
    torch.testing.assert_close(runner.last_hidden, ref[-1][0], atol=1e-4, rtol=1e-4)
    runner.capture_hidden_states((1, 0, 1))
    runner.execute_model(step)
    torch.testing.assert_close(runner.last_hidden, torch.cat([ref[1][0], ref[0][0], ref[1][0]], dim=-1),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="outside the target's 2 layers"):
        runner.capture_hidden_states((0, 1, 2))


def test_the_shipped_head_predicts_the_bundled_model() -> None:
    """The EAGLE head shipped for SmolLM2 (``smollm2-135m-eagle``, trained by scripts/train_eagle_head.py on the
    model's own answers) loads by name, keeps greedy answers identical, and gets drafts accepted on questions it
    was not trained on."""
    from pdserve.engine.model_loader.bundled import ensure_bundled
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_bundled("smollm2-135m-instruct"))
    questions = ["What is the boiling point of water at sea level?", "Give two tips for writing clear emails."]
    requests = [(list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    return_dict=False)),
                 SamplingParams(max_tokens=24, temperature=0.0)) for q in questions]
    spec = {"method": "eagle", "model": "smollm2-135m-eagle", "num_speculative_tokens": 3}
    base = run(engine("smollm2-135m-instruct", max_num_batched_tokens=512), requests)
    core = engine("smollm2-135m-instruct", spec, max_num_batched_tokens=512)
    assert run(core, requests) == base
    stats = core.get_stats().spec_decode
    assert stats["num_accepted_tokens"] > 0.05 * stats["num_draft_tokens"] > 0, stats
