"""Micro-benchmark: the paged attention kernel against PyTorch SDPA (flash backend) on equal shapes.

``python -m pdserve.bench.kernels`` (or ``pdserve bench kernels``) times, for a grid of prefill and decode
shapes, our kernel over a paged cache with randomly scattered blocks and
``torch.nn.functional.scaled_dot_product_attention`` restricted to the flash backend over contiguous K/V of the
same sizes, and prints both times, the achieved TFLOP/s (prefill) or GB/s of K/V read (decode), and the speed
ratio (SDPA time / our time: >= 0.9 is the target, > 1 means faster than SDPA). Prefill rows are fresh causal
prompts (SDPA cannot express a chunk on top of a prefix); decode rows attend one query token per sequence over
its whole context.

Timing: each side's calls are captured in one CUDA graph and timed by device events over its replays (median),
so the figures are GPU time without host launch overhead, as a serving engine's decode step sees it. Small
problems are replicated and the graph cycles through the copies, so that the K/V read are not served from L2.
``--sweep`` also times a list of tile configurations and split factors per shape, for tuning.

``--mode gemv`` and ``--mode silu`` time the other kernels of a decode step instead (skinny matmul against
cuBLAS, fused SiLU-and-multiply against torch); see :mod:`pdserve.bench.gemv`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pdserve.bench import gemv
from pdserve.kernels.attention import AttentionConfig, paged_attention
from pdserve.kernels.reference import quantize_fp8

_PREFILL_SWEEP = [AttentionConfig(128, 64, 8, 3), AttentionConfig(128, 64, 4, 3), AttentionConfig(128, 128, 8, 3),
                  AttentionConfig(128, 32, 4, 3), AttentionConfig(64, 64, 4, 3), AttentionConfig(64, 64, 4, 4),
                  AttentionConfig(128, 64, 8, 4), AttentionConfig(64, 128, 4, 3), AttentionConfig(128, 128, 8, 2),
                  AttentionConfig(128, 128, 8, 4), AttentionConfig(256, 64, 8, 3), AttentionConfig(256, 32, 8, 3)]
_DECODE_SWEEP_N = [(64, 4, 3), (128, 4, 3), (128, 4, 2)]  # (block_n, num_warps, num_stages)
_SWEEP_SPLITS = (None, 1, 4, 8, 16, 32)


@dataclass
class Row:
    """One benchmarked shape."""

    mode: str
    batch: int
    q_len: int
    context: int
    ours_ms: float
    sdpa_ms: float
    ours_rate: float  # TFLOP/s for prefill, GB/s of K/V for decode
    sdpa_rate: float
    max_abs_err: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.sdpa_ms / self.ours_ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the kernel benchmark (shared by ``python -m pdserve.bench.kernels`` and ``pdserve bench``)."""
    parser.add_argument("--mode", choices=["prefill", "decode", "all", "gemv", "silu"], default="all",
                        help="attention shapes (prefill, decode, all) or the gemv / silu kernels")
    parser.add_argument("--num-heads", type=int, default=32, help="query heads (Llama-3.1-8B: 32)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto",
                        help="our cache's dtype; SDPA always reads --dtype")
    parser.add_argument("--prefill-shapes", default="1x1024,1x4096,4x2048,1x16384",
                        help="comma-separated BATCHxPROMPT_LEN")
    parser.add_argument("--decode-shapes", default="1x1024,1x8192,1x32768,16x4096,64x1024,64x8192,256x2048",
                        help="comma-separated BATCHxCONTEXT")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile configs / split factors")
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget of graph replays per measurement")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    gemv.add_arguments(parser)


def _shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in spec.split(",") if item]  # type: ignore[misc]


_ROTATE_BYTES = 1 << 29  # cycle through copies of a problem until this much K/V is read per graph replay
_MAX_COPIES = 16


def _graph_ms(calls: list, rep_ms: int) -> float:
    """Median GPU time of one call, from replays of a CUDA graph that makes every call of ``calls`` once."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(1000):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if i >= 4 and sum(times) > rep_ms:
            break
    del graph
    times.sort()
    return times[len(times) // 2] / len(calls)


def _num_copies(args, batch: int, q_len: int, context: int) -> int:
    elt = 2
    per_problem = (2 * context * args.num_kv_heads + 2 * q_len * args.num_heads) * batch * args.head_dim * elt
    return max(1, min(_MAX_COPIES, -(-_ROTATE_BYTES // per_problem)))


def _problem(args, batch: int, q_len: int, context: int, seed: int = 0):
    """Our paged inputs and SDPA's contiguous ones, holding the same numbers."""
    dtype = getattr(torch, args.dtype)
    hq, hkv, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    per_seq = math.ceil(context / bs)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # SDPA's layout [B, S, H, D] (as projections produce it) viewed as [B, H, S, D].
    k = torch.randn(batch, context, hkv, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, context, hkv, d, device="cuda", dtype=dtype, generator=gen)
    q = torch.randn(batch, q_len, hq, d, device="cuda", dtype=dtype, generator=gen)
    scale = 1.0
    if args.kv_cache_dtype == "fp8_e4m3":
        scale = max(k.abs().max().item(), v.abs().max().item()) / 448.0
    pad = per_seq * bs - context
    kv = torch.stack([F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))])
    kv = kv.view(2, batch * per_seq, bs, hkv, d)
    order = torch.randperm(batch * per_seq, device="cuda", generator=gen)
    cache = torch.empty_like(kv)
    cache[:, order] = kv  # logical block i of the batch lives at physical block order[i]
    del kv
    if args.kv_cache_dtype == "fp8_e4m3":
        cache = quantize_fp8(cache, scale)
    paged = dict(
        q=q.view(batch * q_len, hq, d), kv_cache=cache,
        query_start_loc=torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len,
        seq_lens=torch.full((batch,), context, device="cuda", dtype=torch.int32),
        block_tables=order.view(batch, per_seq).to(torch.int32), k_scale=scale, v_scale=scale,
        max_query_len=q_len, max_seq_len=context,
    )
    return paged, (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def _sdpa(q, k, v, causal: bool):
    """SDPA on the flash backend with native GQA; returns (callable, note)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        gqa()
        return gqa, ""
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # a flash build without GQA: give it K/V expanded to every query head
        group = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def expanded():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=causal)

        return expanded, "sdpa: K/V expanded"


def _measure(args, mode: str, batch: int, q_len: int, context: int) -> tuple[Row, list[tuple[str, float]]]:
    copies = [_problem(args, batch, q_len, context, seed) for seed in range(_num_copies(args, batch, q_len, context))]
    hq, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    sdpa_calls = [_sdpa(*dense, causal=mode == "prefill") for _, dense in copies]
    note = sdpa_calls[0][1]
    paged, (_, k, _) = copies[0]
    ref = sdpa_calls[0][0]().transpose(1, 2).reshape(batch * q_len, hq, d)
    err = (paged_attention(**paged).float() - ref.float()).abs().max().item()
    ours_ms = _graph_ms([lambda p=p: paged_attention(**p) for p, _ in copies], args.rep_ms)
    sdpa_ms = _graph_ms([call for call, _ in sdpa_calls], args.rep_ms)
    if mode == "prefill":
        work = 4.0 * batch * hq * d * (context * (context + 1) / 2) / 1e12  # causal: half the score matrix
        ours_rate, sdpa_rate = work / (ours_ms / 1e3), work / (sdpa_ms / 1e3)
    else:
        elems = 2.0 * batch * context * hkv * d
        ours_rate = elems * paged["kv_cache"].element_size() / 1e9 / (ours_ms / 1e3)
        sdpa_rate = elems * k.element_size() / 1e9 / (sdpa_ms / 1e3)
    sweep = _sweep(args, mode, [p for p, _ in copies]) if args.sweep else []
    del copies, sdpa_calls, paged, k, ref
    torch.cuda.empty_cache()
    row = Row(mode, batch, q_len, context, ours_ms, sdpa_ms, ours_rate, sdpa_rate, err, note)
    return row, sweep


def _sweep(args, mode: str, problems: list[dict]) -> list[tuple[str, float]]:
    def timed(name: str, **kw) -> tuple[str, float]:
        try:
            return name, _graph_ms([lambda p=p: paged_attention(**p, **kw) for p in problems], args.rep_ms)
        except Exception as e:  # out of shared memory etc.: report and go on
            return f"{name} failed: {type(e).__name__}", float("inf")

    if mode == "prefill":
        results = [timed(str(cfg), config=cfg) for cfg in _PREFILL_SWEEP]
    else:
        group = args.num_heads // args.num_kv_heads
        block_m = max(16, 1 << (group - 1).bit_length())
        results = []
        for block_n, warps, stages in _DECODE_SWEEP_N:
            cfg = AttentionConfig(block_m, block_n, warps, stages)
            for splits in _SWEEP_SPLITS:
                results.append(timed(f"{cfg} splits={splits or 'auto'}", config=cfg, num_kv_splits=splits))
    return sorted(results, key=lambda r: r[1])


def format_table(rows: list[Row]) -> str:
    """The results as a fixed-width table, one line per shape."""
    head = (f"{'mode':<8}{'batch':>6}{'q_len':>7}{'context':>9}{'ours ms':>10}{'sdpa ms':>10}"
            f"{'ours':>10}{'sdpa':>10}{'unit':>8}{'sdpa/ours':>11}{'max err':>10}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        unit = "TFLOP/s" if r.mode == "prefill" else "GB/s"
        lines.append(f"{r.mode:<8}{r.batch:>6}{r.q_len:>7}{r.context:>9}{r.ours_ms:>10.4f}{r.sdpa_ms:>10.4f}"
                     f"{r.ours_rate:>10.1f}{r.sdpa_rate:>10.1f}{unit:>8}{r.ratio:>11.3f}{r.max_abs_err:>10.2e}"
                     f"  {r.note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[Row]:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`), print the table, return rows."""
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA GPU")
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.mode == "gemv":
        gemv_rows = gemv.run_gemv(args, _graph_ms)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in gemv_rows], f, indent=1)
        return []
    if args.mode == "silu":
        gemv.run_silu(args, _graph_ms)
        return []
    print(f"heads: {args.num_heads} q / {args.num_kv_heads} kv, head_dim {args.head_dim}, block {args.block_size}, "
          f"{args.dtype}, kv cache {args.kv_cache_dtype}")
    rows: list[Row] = []
    jobs = []
    if args.mode in ("prefill", "all"):
        jobs += [("prefill", b, n, n) for b, n in _shapes(args.prefill_shapes)]
    if args.mode in ("decode", "all"):
        jobs += [("decode", b, 1, n) for b, n in _shapes(args.decode_shapes)]
    for mode, batch, q_len, context in jobs:
        row, sweep = _measure(args, mode, batch, q_len, context)
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        for name, ms in sweep:
            print(f"    sweep {ms:9.4f} ms  {name}", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=1)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
