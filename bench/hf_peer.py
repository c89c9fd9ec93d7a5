"""The Hugging Face transformers peer for the offline benchmarks, run on the same weights, device and dtype."""

from __future__ import annotations

import time

import torch

from pdserve.bench.throughput import ThroughputResult
from pdserve.bench.workload import BenchRequest


def load_hf_model(cfg, device: torch.device, dtype: torch.dtype):
    """The same weights as the engine (or, for dummy presets, random weights of the same shapes)."""
    from transformers import AutoModelForCausalLM

    if cfg.model.path is not None and cfg.model.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
    else:
        # Built on the device: initialising 8B random weights on the CPU would take minutes.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg.model.hf_config, dtype=dtype)
    return model.to(device).eval()


def engine_device_dtype(cfg) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device.device == "auto" else cfg.device.device))
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = names.get(cfg.model.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def hf_throughput(cfg, requests: list[BenchRequest], batch_size: int = 0) -> ThroughputResult:
    """On CUDA (unless ``batch_size`` asks for static batches): transformers' continuous batching, each request
    with its own ``max_new_tokens`` and EOS disabled. Elsewhere: static batches through ``generate``."""
    device, dtype = engine_device_dtype(cfg)
    model = load_hf_model(cfg, device, dtype)
    if device.type == "cuda" and batch_size == 0 and hasattr(model, "init_continuous_batching"):
        return _continuous_batching(model, requests)
    return _static_batches(model, requests, batch_size, device)


def _continuous_batching(model, requests: list[BenchRequest]) -> ThroughputResult:
    """One continuous-batching manager for the whole workload (one untimed warm-up run first, which also
    captures its CUDA graphs where the installed transformers does that)."""
    from transformers import GenerationConfig

    def gen_config(max_new: int):
        return GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)

    model.generate_batch(inputs=[r.prompt_token_ids[:16] for r in requests[:4]], generation_config=gen_config(4))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = _run_manager(model, gen_config(max(r.output_len for r in requests)), requests)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs)
    return ThroughputResult("hf", len(requests), elapsed, sum(len(r.prompt_token_ids) for r in requests), produced)


def _run_manager(model, gen_config, requests: list[BenchRequest]) -> list:
    """Add every request with its own output length, then wait for all of them to finish."""
    manager = model.init_continuous_batching(generation_config=gen_config)
    manager.start()
    done: dict[str, object] = {}
    try:
        for i, r in enumerate(requests):
            manager.add_request(r.prompt_token_ids, request_id=f"req-{i}", max_new_tokens=r.output_len)
        while len(done) < len(requests):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before finishing the workload")
                continue
            finished = out.is_finished() if hasattr(out, "is_finished") else out.status.name == "FINISHED"
            if finished:
                if getattr(out, "error", None):
                    raise RuntimeError(f"transformers failed request {out.request_id}: {out.error}")
                done[out.request_id] = out
    finally:
        manager.stop(block=True)
    return list(done.values())


@torch.inference_mode()
def _static_batches(model, requests: list[BenchRequest], batch_size: int, device: torch.device) -> ThroughputResult:
    """Static batches through ``generate`` (left padding, EOS ignored via ``min_new_tokens``).

    Requests are grouped by output length so no sequence generates more than it was asked for.
    """
    pad = 0
    by_len: dict[int, list[BenchRequest]] = {}
    for r in requests:
        by_len.setdefault(r.output_len, []).append(r)
    bs = batch_size or len(requests)
    batches = [(n, group[i:i + bs]) for n, group in by_len.items() for i in range(0, len(group), bs)]
    _generate(model, [requests[0].prompt_token_ids[:8]], 2, pad, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    for out_len, batch in batches:
        produced += _generate(model, [r.prompt_token_ids for r in batch], out_len, pad, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return ThroughputResult("hf", len(requests), elapsed, sum(len(r.prompt_token_ids) for r in requests), produced)


def _generate(model, prompts: list[list[int]], max_new: int, pad: int, device: torch.device) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                         min_new_tokens=max_new, do_sample=False, pad_token_id=pad)
    return int((out.shape[1] - width) * len(prompts))
