"""Micro-benchmarks of the decode-step kernels outside attention: ``skinny_linear`` against ``F.linear``
(cuBLAS) on the projections of Llama-3.1-8B and Qwen3-0.6B, and ``silu_and_mul`` against torch's two kernels.

Run through ``pdserve bench kernels --mode gemv`` (or ``--mode silu``). Times are GPU time per call
from CUDA-graph replays (see ``pdserve.bench.kernels._graph_ms``); each graph cycles through enough copies of the
weights that they are read from DRAM, not L2, as in a real decode step where every layer has its own. The rate reported
for a projection is weight bytes / time (the weight is nearly all a skinny matmul reads).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.skinny import SkinnyConfig, default_config, prefers_skinny, skinny_linear

# name -> (in_features K, out_features N)
GEMV_SHAPES = {
    "llama8b.qkv": (4096, 6144), "llama8b.o": (4096, 4096), "llama8b.gate_up": (4096, 28672),
    "llama8b.down": (14336, 4096), "llama8b.lm_head": (4096, 128256),
    "qwen06b.qkv": (1024, 4096), "qwen06b.o": (2048, 1024), "qwen06b.gate_up": (1024, 6144),
    "qwen06b.down": (3072, 1024),
}
_ROTATE_BYTES = 1 << 28  # weight bytes read per graph replay, at least: well past the H200's 50 MB of L2
_MAX_COPIES = 64

_SWEEP_FMA = [SkinnyConfig(bn, bk, w, 1, prefetch=pf) for bn, bk, w, pf in
              [(8, 512, 4, False), (8, 512, 4, True), (8, 256, 4, True), (16, 256, 4, False), (16, 256, 4, True),
               (4, 512, 4, False), (4, 512, 4, True), (8, 512, 8, True), (8, 1024, 8, False), (8, 1024, 8, True),
               (4, 1024, 4, True), (16, 512, 8, True), (2, 1024, 4, True), (8, 256, 2, True), (4, 512, 2, True)]]
_SWEEP_DOT = [SkinnyConfig(bn, bk, w, s, use_dot=True) for bn, bk, w, s in [(32, 256, 4, 4), (64, 128, 4, 4)]]


@dataclass
class GemvRow:
    """One (shape, M) point."""

    name: str
    m: int
    k: int
    n: int
    ours_ms: float
    cublas_ms: float
    max_rel_err: float
    chosen: bool  # what prefers_skinny() picks for this point

    @property
    def weight_gb(self) -> float:
        return self.n * self.k * 2 / 1e9

    def tbps(self, ms: float) -> float:
        return self.weight_gb / ms  # GB / ms == TB / s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gemv-shapes", default=",".join(GEMV_SHAPES), help="names from GEMV_SHAPES")
    parser.add_argument("--gemv-m", default="1,2,4,8,16", help="rows of x (decode batch sizes)")
    parser.add_argument("--sweep-m", default="1,2,4", help="with --sweep: the M at which tile configs are timed")


def _copies(k: int, n: int, m: int, dtype, seed: int):
    count = max(1, min(_MAX_COPIES, -(-_ROTATE_BYTES // (n * k * 2))))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * k ** -0.5 for _ in range(count)]
    xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(count)]
    return list(zip(xs, ws))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _sweep_configs(m: int) -> list[SkinnyConfig]:
    block_m = 1 << (m - 1).bit_length()
    # Keep the float32 accumulator of the FMA path within ~128 registers a thread.
    fma = [c for c in _SWEEP_FMA if block_m * c.block_n * c.block_k <= 128 * 32 * c.num_warps]
    return fma + _SWEEP_DOT


def run_gemv(args, graph_ms) -> list[GemvRow]:
    """Time every (shape, M) of ``args``; with ``args.sweep`` also every candidate tile config at ``--sweep-m``."""
    dtype = getattr(torch, args.dtype)
    ms_list = [int(v) for v in args.gemv_m.split(",")]
    sweep_ms = {int(v) for v in args.sweep_m.split(",")} if args.sweep else set()
    rows = []
    print(f"{'shape':<18}{'M':>3}{'K':>7}{'N':>8}{'ours us':>10}{'cublas us':>11}{'ours TB/s':>11}"
          f"{'cublas TB/s':>13}{'speedup':>9}{'rel err':>10}  rule")
    for name in args.gemv_shapes.split(","):
        k, n = GEMV_SHAPES[name]
        for m in ms_list:
            probs = _copies(k, n, m, dtype, seed=m)
            err = _rel_err(skinny_linear(*probs[0]), F.linear(*probs[0]))
            ours = graph_ms([lambda p=p: skinny_linear(*p) for p in probs], args.rep_ms)
            cublas = graph_ms([lambda p=p: F.linear(*p) for p in probs], args.rep_ms)
            row = GemvRow(name, m, k, n, ours, cublas, err, prefers_skinny(m, n, k))
            rows.append(row)
            print(f"{name:<18}{m:>3}{k:>7}{n:>8}{ours * 1e3:>10.2f}{cublas * 1e3:>11.2f}{row.tbps(ours):>11.2f}"
                  f"{row.tbps(cublas):>13.2f}{cublas / ours:>9.3f}{err:>10.1e}  {'skinny' if row.chosen else 'cublas'}",
                  flush=True)
            if m in sweep_ms:
                timed = []
                for cfg in _sweep_configs(m):
                    try:
                        timed.append((graph_ms([lambda p=p, c=cfg: skinny_linear(*p, config=c) for p in probs],
                                               max(20, args.rep_ms // 4)), cfg))
                    except Exception as e:  # out of registers / shared memory: report and go on
                        print(f"    sweep failed {cfg}: {type(e).__name__}")
                timed.sort(key=lambda t: t[0])
                print(f"    default {default_config(m, n, k)}")
                for t, cfg in timed[:6]:
                    print(f"    sweep {t * 1e3:8.2f} us {row.weight_gb / t:6.2f} TB/s  {cfg}")
            del probs
            torch.cuda.empty_cache()
    return rows


def run_silu(args, graph_ms) -> None:
    """``silu_and_mul`` against ``F.silu(gate) * up`` at decode and prefill token counts."""
    dtype = getattr(torch, args.dtype)
    print(f"{'tokens':>7}{'inter':>7}{'ours us':>10}{'torch us':>10}{'ours GB/s':>11}{'torch GB/s':>12}  equal")
    for tokens, inter in itertools.product((1, 8, 16, 256, 4096), (14336, 3072)):
        xs = [torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype) for _ in range(8)]
        equal = torch.equal(silu_and_mul(xs[0]), F.silu(xs[0][:, :inter]) * xs[0][:, inter:])
        ours = graph_ms([lambda x=x: silu_and_mul(x) for x in xs], args.rep_ms)
        ref = graph_ms([lambda x=x, i=inter: F.silu(x[:, :i]) * x[:, i:] for x in xs], args.rep_ms)
        gb = 3 * tokens * inter * xs[0].element_size() / 1e9
        print(f"{tokens:>7}{inter:>7}{ours * 1e3:>10.2f}{ref * 1e3:>10.2f}{gb / ours * 1e3:>11.1f}"
              f"{gb / ref * 1e3:>12.1f}  {equal}", flush=True)
