"""One engine's side of an offline side-by-side benchmark, in a process of its own.

    python -P <path>/peer_worker.py SPEC.json RESULT.json

``SPEC.json`` names the engine (``pdserve`` or ``vllm``), its constructor's keyword arguments and the workload
file; the workload file (written once by the parent, read by both engines) holds the token-id prompts and output
lengths. Every request is greedy and ignores EOS, so both engines produce exactly the requested tokens. The timing
code below is the same for both engines; only :class:`PdserveEngine` / :class:`VllmEngine` differ.

The parent (``pdserve.bench.peer``) runs this file by path, not as ``pdserve.bench.peer_worker``: the vLLM process
has a PYTHONPATH of its own (vLLM's pinned dependencies first), so nothing here imports pdserve at module level;
only :class:`PdserveEngine` does, inside pdserve's own process. ``RESULT.json`` gets the timings and a digest of the
requests the engine was given, which the parent compares across engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from typing import Any


def workload_digest(prompts: list[list[int]], output_lens: list[int]) -> str:
    """A short hash of token-id prompts and output lengths: equal digests mean identical requests."""
    h = hashlib.sha256()
    for prompt, out in zip(prompts, output_lens, strict=True):
        h.update(json.dumps([prompt, out]).encode())
    return h.hexdigest()[:16]


def _sync() -> None:
    """Wait for the GPU (both engines return host-side outputs, so this only guards against stray async work)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PdserveEngine:
    """pdserve's offline ``LLM``."""

    name = "pdserve"

    def __init__(self, kwargs: dict[str, Any]) -> None:
        from pdserve.engine.llm import LLM

        self.llm = LLM(**kwargs)

    @classmethod
    def wrap(cls, llm: Any) -> PdserveEngine:
        """An engine already built (the in-process benchmarks time it with the same code)."""
        engine = cls.__new__(cls)
        engine.llm = llm
        return engine

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        """Generate greedily with EOS ignored; returns the number of tokens produced."""
        from pdserve.engine.sampling_params import SamplingParams

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
        return sum(len(o.outputs[0].token_ids) for o in self.llm.generate(prompts, params))

    def describe(self) -> dict[str, Any]:
        """What the engine resolved (the peer is given the same dtype and context length)."""
        runner = self.llm.engine.core.runner
        dtype = getattr(runner, "dtype", None)  # a multi-process executor may not expose it
        return {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else self.llm.config.model.dtype,
                "max_model_len": self.llm.config.model.max_model_len, "device": _device_name(runner.device)}

    def start_recording(self) -> None:
        self.llm.engine.core.record_step_stats()

    def stop_recording(self) -> dict[str, Any]:
        """The timed run's decode roofline (bench/throughput.py), from the engine core's step records."""
        from pdserve.bench.throughput import measure_roofline

        core = self.llm.engine.core
        stats = core.step_stats or []
        core.record_step_stats(False)
        return {"decode_roofline": measure_roofline(self.llm, stats).as_dict()}

    def device_figures(self) -> dict[str, Any]:
        """The device's measured peaks and the model's sizes, for roofline shares and MFU in the parent."""
        from pdserve.bench import roofline

        runner = self.llm.engine.core.runner
        per_token, head = roofline.matmul_params(runner.model)
        return {"bandwidth": roofline.measure_copy_bandwidth(runner.device),
                "matmul_peak": roofline.measure_matmul_flops(runner.device),
                "weights": roofline.decode_weight_bytes(runner.model), "per_token_params": per_token,
                "head_params": head, "kv_elem": runner.kv_spec.dtype.itemsize}


class VllmEngine:
    """vLLM's offline ``LLM`` on token-id prompts (``skip_tokenizer_init``: no detokenization)."""

    name = "vllm"

    def __init__(self, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.kwargs = kwargs
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
                  for n in output_lens]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def describe(self) -> dict[str, Any]:
        import torch

        version = getattr(sys.modules.get("vllm"), "__version__", "?")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        return {"dtype": self.kwargs.get("dtype"), "max_model_len": self.kwargs.get("max_model_len"),
                "device": device, "version": version}

    def start_recording(self) -> None:
        pass

    def stop_recording(self) -> dict[str, Any]:
        return {}

    def device_figures(self) -> dict[str, Any]:
        return {}


ENGINES = {"pdserve": PdserveEngine, "vllm": VllmEngine}


def _device_name(device: Any) -> str:
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def timed(fn: Any) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def time_throughput(engine: Any, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
    """A few untimed requests (allocator, kernels for prefill shapes), then the whole workload at once."""
    engine.generate(prompts[:4], [4] * len(prompts[:4]))
    engine.start_recording()
    produced = 0

    def run() -> None:
        nonlocal produced
        produced = engine.generate(prompts, output_lens)

    elapsed = timed(run)
    return {"elapsed_s": elapsed, "num_requests": len(prompts), "input_tokens": sum(len(p) for p in prompts),
            "output_tokens": produced, **engine.stop_recording()}


def time_latency(engine: Any, prompts: list[list[int]], output_len: int, iters: int) -> tuple[float, float]:
    """Median time to generate 1 token (the prefill) and ``output_len`` tokens for ``prompts`` together."""
    engine.generate(prompts, [2] * len(prompts))  # warm-up

    def median(n: int) -> float:
        return statistics.median(timed(lambda: engine.generate(prompts, [n] * len(prompts))) for _ in range(iters))

    return median(1), median(output_len)


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the engine, run the workload, return the result record."""
    with open(spec["workload"]) as f:
        workload = json.load(f)
    start = time.perf_counter()
    engine = ENGINES[spec["engine"]](spec["engine_kwargs"])
    result: dict[str, Any] = {"engine": spec["engine"], "startup_s": time.perf_counter() - start,
                              **engine.describe()}
    if workload["task"] == "throughput":
        prompts, lens = [r[0] for r in workload["requests"]], [r[1] for r in workload["requests"]]
        result["workload_digest"] = workload_digest(prompts, lens)
        result.update(time_throughput(engine, prompts, lens))
    else:
        cases, digests = [], []
        for case in workload["cases"]:
            prompts, out = case["prompts"], workload["output_len"]
            digests.append(workload_digest(prompts, [out] * len(prompts)))
            prefill, total = time_latency(engine, prompts, out, workload["iters"])
            cases.append({"batch_size": len(prompts), "input_len": len(prompts[0]), "prefill_s": prefill,
                          "total_s": total})
        result.update(cases=cases, workload_digest=",".join(digests),
                      **engine.device_figures())
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: peer_worker.py SPEC.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run_spec(spec)
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, argv[1])
    print(f"peer_worker: {spec['engine']} done", flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the engines' slow teardown (vLLM's engine core is a child process the parent kills with the group).
    os._exit(code)
