"""Where a short prefill's time goes on a GPU: the wall time of one prefill of N distinct random tokens (random
weights in a preset's shapes) against the GPU's kernel time in the same step, and torch.profiler's kernel table.

    python3 -P scripts/profile_prefill.py llama-3.1-8b 128

A wall time well above the kernel time means the step is bound by the host launching kernels (docs/performance.md,
"Why the targets are not met").
"""

from __future__ import annotations

import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pdserve import LLM, SamplingParams


def main(model: str, num_tokens: int) -> None:
    llm = LLM(model=model, load_format="dummy", max_model_len=8192, max_num_seqs=256, max_num_batched_tokens=8192)
    vocab = llm.config.model.hf_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def one_prefill() -> float:
        prompt = [rng.randint(100, vocab - 1) for _ in range(num_tokens)]  # distinct: no prefix-cache hit
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        one_prefill()  # warm-up: kernel compiles, allocator
    print(f"prefill of {num_tokens} tokens, wall ms:", [round(one_prefill() * 1e3, 2) for _ in range(5)])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = one_prefill()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"profiled: wall {wall * 1e3:.2f} ms, GPU kernel time {gpu_ms:.2f} ms, "
          f"kernel launches {sum(e.count for e in kernels)}")
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128)
