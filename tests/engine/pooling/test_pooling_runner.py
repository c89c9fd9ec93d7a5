"""The pooling runner (``--runner pooling``) against transformers: the mean / last / first-token pooling of the
final hidden states (after the final norm) equal transformers' ``last_hidden_state`` pooled the same way, and a
batch gives the vectors its prompts give one at a time."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.pooling.pooler import pool
from pdserve.engine.pooling.runner import PoolingRunner
from tests.helpers.tiny_models import make_tiny_model

TOL = 1e-5
# Float32 everywhere; on a GPU machine the same checks run on CUDA too, with a looser bound: the Triton attention
# kernel's float32 dot products run in TF32 (10-bit mantissa inputs), which moved unit-norm embeddings by up to 8e-4
# on an H100.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLS = {"cpu": TOL, "cuda": 3e-3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")
    g = torch.Generator().manual_seed(3)
    # One-token, short and longer-than-a-block prompts; the small token budget splits the batch into steps.
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 5, 23, 40, 7)]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = [model(torch.tensor([p])).last_hidden_state[0] for p in prompts]  # [n, D] each
    return directory, prompts, hidden


def _runner(directory: str, pooling_type: str, normalize: bool = True, device: str = "cpu") -> PoolingRunner:
    config = EngineConfig.create(directory, max_model_len=128, num_blocks=24, block_size=4,
                                 max_num_batched_tokens=48, device=device, dtype="float32")
    return PoolingRunner(config, pooling_type, normalize)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling_type", ["mean", "last", "cls"])
def test_pooled_states_equal_transformers(tiny, pooling_type, device):
    directory, prompts, hidden = tiny
    runner = _runner(directory, pooling_type, normalize=False, device=device)
    ours = runner.embed(prompts)
    pick = {"mean": lambda h: h.mean(0), "last": lambda h: h[-1], "cls": lambda h: h[0]}[pooling_type]
    ref = torch.stack([pick(h) for h in hidden])
    assert ours.shape == (len(prompts), runner.hidden_size)
    torch.testing.assert_close(ours, ref, atol=TOLS[device], rtol=TOLS[device])


@pytest.mark.parametrize("device", DEVICES)
def test_normalized_batch_equals_singles_and_repeats(tiny, device):
    directory, prompts, hidden = tiny
    runner = _runner(directory, "mean", device=device)
    TOL = TOLS[device]
    batch = runner.embed(prompts)
    singles = torch.stack([runner.embed([p])[0] for p in prompts])
    torch.testing.assert_close(batch, singles, atol=TOL, rtol=TOL)
    assert torch.equal(runner.embed(prompts), batch)  # deterministic: the same call gives the same bits
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(len(prompts)), atol=1e-6, rtol=0)
    ref = torch.nn.functional.normalize(torch.stack([h.mean(0) for h in hidden]), dim=-1)
    torch.testing.assert_close(batch, ref, atol=TOL, rtol=TOL)


def test_refusals(tiny):
    directory, _, _ = tiny
    with pytest.raises(ValueError, match="pooling_type"):
        pool(torch.zeros(2, 3), [2], "max")
    runner = _runner(directory, "last")
    with pytest.raises(ValueError, match="at least one token"):
        runner.embed([[5], []])
    with pytest.raises(ValueError, match="KV blocks"):
        runner.embed([[5] * 100])  # 25 blocks of 4 tokens; the cache has 24
