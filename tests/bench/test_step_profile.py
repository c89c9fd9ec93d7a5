"""``bench throughput --step-breakdown / --profile-steps``: steps by kind and a profiled window of steps."""

from __future__ import annotations

import pytest

from pdserve.bench.step_profile import (KernelWindow, StepWindowProfiler, kernel_category, kernel_window,
                                        parse_window, step_breakdown)
from pdserve.cli.main import main
from pdserve.engine.engine_core import StepStat

pytestmark = pytest.mark.timeout(300)


def test_steps_split_into_decode_graph_held_mixed_and_eager_mixed() -> None:
    stats = [StepStat(0.010, 4, 4, 4, 400),  # pure decode
             StepStat(0.020, 300, 5, 4, 900),  # 4 decodes + a 296-token chunk: a 512-token graph holds it
             StepStat(0.030, 512, 2, 1, 700),  # exactly the top
             StepStat(0.050, 2000, 3, 2, 2500),  # above the top: eager
             StepStat(0.012, 6, 6, 6, 420)]
    decode, graph, eager = step_breakdown(stats, graph_top=512)
    assert (decode.steps, decode.tokens, decode.seqs, round(decode.time_s, 6)) == (2, 10, 10, 0.022)
    assert (graph.steps, graph.tokens, graph.seqs, round(graph.time_s, 6)) == (2, 812, 7, 0.05)
    assert (eager.steps, eager.tokens, eager.seqs, round(eager.time_s, 6)) == (1, 2000, 3, 0.05)
    # No mixed-step graphs (CPU, or switched off): every step with a prompt chunk is eager.
    assert [k.steps for k in step_breakdown(stats, graph_top=0)] == [2, 0, 3]


@pytest.mark.parametrize(("name", "category"), [
    ("_paged_attention_kernel", "attention"), ("_combine_splits_kernel", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"), ("_skinny_kernel", "matmul"),
    ("_rms_norm_kernel", "norm"), ("_rotary_kernel", "rotary+kv write"), ("_write_kv_kernel", "rotary+kv write"),
    ("_silu_and_mul_kernel", "activation"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>", "sampling"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"), ("void at::native::elementwise_kernel<128, 2>", "other")])
def test_kernels_are_categorised_by_name(name: str, category: str) -> None:
    assert kernel_category(name) == category


class _Row:
    def __init__(self, key: str, device_us: float, count: int, device_type: str = "DeviceType.CUDA") -> None:
        self.key, self.self_device_time_total, self.count, self.device_type = key, device_us, count, device_type


def test_a_kernel_window_sums_kernels_by_category_and_skips_cpu_rows() -> None:
    win = kernel_window([_Row("_paged_attention_kernel", 3000.0, 10), _Row("nvjet_tst_x", 5000.0, 40),
                         _Row("nvjet_tst_y", 1000.0, 20), _Row("aten::mm", 6000.0, 60, "DeviceType.CPU")],
                        steps=10, wall_s=0.012, top=2)
    assert win.by_category == pytest.approx({"attention": 0.003, "matmul": 0.006})
    assert win.busy_s == pytest.approx(0.009)
    assert win.top == [("nvjet_tst_x", 0.005, 40), ("_paged_attention_kernel", 0.003, 10)]
    assert "GPU busy 9.0 ms of 12.0 ms wall (75.0%" in win.format()


def test_a_window_is_two_ordered_step_numbers() -> None:
    assert parse_window("3:7") == (3, 7) and parse_window(None) is None
    for bad in ("7:3", "3", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="--profile-steps"):
            parse_window(bad)


def test_the_window_profiler_wraps_exactly_the_window_of_steps() -> None:
    calls: list[int] = []

    class Core:
        def step(self):
            calls.append(len(calls))
            return []

    core = Core()
    prof = StepWindowProfiler(core, (1, 3))
    prof.arm()
    for _ in range(5):
        core.step()
    prof.disarm()
    assert calls == [0, 1, 2, 3, 4] and core.step.__func__ is Core.step
    assert isinstance(prof.result, KernelWindow) and prof.result.steps == 2


def test_throughput_prints_the_breakdown_and_a_profiled_window(capsys) -> None:
    code = main(["bench", "throughput", "--device", "cpu", "--attention-backend", "torch", "--max-model-len", "128",
                 "--num-prompts", "3", "--input-len", "20", "--output-len", "4", "--step-breakdown",
                 "--profile-steps", "1:3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "steps by kind (mixed-step graphs up to 0 tokens" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("decode ", "mixed"))}
    # 3 prompts of 20 tokens prefill in one step; 3 more decode steps produce the rest of the 4 tokens each.
    assert rows["decode"][1] == "3" and int(rows["decode"][4]) == 9
    assert "kernels of 2 steps" in out


def test_profiling_with_a_peer_or_a_bad_window_is_refused_with_a_message() -> None:
    with pytest.raises(SystemExit, match="without --peer"):
        main(["bench", "throughput", "--peer", "pdserve", "--step-breakdown"])
    with pytest.raises(SystemExit, match="--profile-steps A:B needs 0 <= A < B"):
        main(["bench", "throughput", "--profile-steps", "5:2"])
