"""``pdserve bench tune``: the coordinate-descent search and its bounds, the search space's refusals, and a real
two-trial run on CPU (two ``pdserve serve`` processes on the bundled model) whose printed best command is the
setting with the highest measured goodput."""

from __future__ import annotations

import argparse
import json
import re
import shlex

import pytest

from pdserve.bench import tune
from pdserve.bench.tune_search import Trial, best_trial, coordinate_descent, format_table, grid_size


def _synthetic(goodput_of):
    calls = []

    def measure(settings):
        calls.append(dict(settings))
        return Trial(len(calls), dict(settings), tune.candidate_flags(settings),
                     {"goodput": goodput_of(settings), "output_throughput": 1.0, "meets_slos": True,
                      "slo_values_s": {"ttft_p99": 0.1}})
    return measure, calls


def test_coordinate_descent_finds_a_separable_optimum_with_fewer_trials_than_the_grid():
    space = {"max_num_seqs": [32, 64, 128, 256], "max_num_batched_tokens": [1024, 2048, 4096, 8192],
             "kv_cache_dtype": ["auto", "fp8_e4m3"]}
    best = {"max_num_seqs": 128, "max_num_batched_tokens": 4096, "kv_cache_dtype": "fp8_e4m3"}
    measure, calls = _synthetic(lambda s: 10.0 - sum(abs(space[k].index(s[k]) - space[k].index(best[k]))
                                                      for k in space))
    trials = coordinate_descent(space, measure, max_trials=50)
    assert best_trial(trials).settings == best
    assert len(calls) < grid_size(space) == 32
    assert len({tuple(c.values()) for c in calls}) == len(calls)  # never measured twice
    assert calls[0] == {"max_num_seqs": 32, "max_num_batched_tokens": 1024, "kv_cache_dtype": "auto"}


def test_the_trial_budget_bounds_the_search_and_failures_rank_last():
    space = {"max_num_seqs": [1, 2, 3, 4, 5]}
    measure, calls = _synthetic(lambda s: float(s["max_num_seqs"]))
    assert len(coordinate_descent(space, measure, max_trials=3)) == 3 == len(calls)
    ok = Trial(1, {"max_num_seqs": 1}, [], {"goodput": 0.0, "output_throughput": 0.0})
    failed = Trial(2, {"max_num_seqs": 2}, [], error="server exited (1): out of memory")
    assert best_trial([failed, ok]) is ok
    table = format_table([ok, failed], ["max_num_seqs"], ["ttft_p99"])
    assert "*1" in table and "server exited" in table


def _args(argv):
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    return parser.parse_args(argv)


def test_search_space_flags_and_refusals(capsys):
    args = _args(["--max-num-seqs", "8", "16", "8", "--cuda-graph-sizes", "default", "8,1,4"])
    space, notes = tune.search_space(args, ["--device", "cpu"])
    assert space == {"max_num_seqs": [8, 16]} and "CUDA graph sizes not searched" in notes[0]
    space, _ = tune.search_space(args, ["--device", "cuda"])
    assert space["cuda_graph_sizes"] == ["default", "1,4,8"]
    assert tune.candidate_flags({"max_num_seqs": 8, "cuda_graph_sizes": "default"}) == ["--max-num-seqs", "8"]
    assert tune.candidate_flags({"cuda_graph_sizes": "1,4,8"}) == ["--cuda-graph-sizes", "1,4,8"]
    with pytest.raises(ValueError, match="both searched and fixed"):
        tune.search_space(args, ["--max-num-seqs", "4"])
    with pytest.raises(ValueError, match="nothing to search"):
        tune.search_space(_args([]), [])
    assert tune.run(_args(["--max-num-seqs", "4", "8"])) == 2  # no SLO: no goodput
    assert "--slo" in capsys.readouterr().err
    assert tune.run(_args(["--max-num-seqs", "4", "--slo", "ttft_p99=1", "--request-rate", "1,2"])) == 2


@pytest.mark.timeout(900)
def test_two_real_trials_on_cpu_print_the_best_measured_setting(tmp_path, capsys):
    out_dir = tmp_path / "tune"
    code = tune.main(["--serve-args", "--device cpu --max-model-len 128 --cpu-kv-cache-gib 0.02",
                      "--max-num-seqs", "1", "4", "--max-trials", "2", "--num-prompts", "3",
                      "--random-input-len", "8", "--random-output-len", "2", "--ignore-eos", "--warmup", "0",
                      "--slo", "ttft_p99=120", "--slo", "tpot_p99=60", "--result-dir", str(out_dir),
                      "--disable-tqdm"])
    text = capsys.readouterr().out
    assert code == 0, text
    header = next(line for line in text.splitlines() if line.startswith("trial  max_num_seqs"))
    cols = re.split(r"\s{2,}", header)
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if re.match(r"^[ *]\d+\s", line)]
    assert len(rows) == 2
    goodput = {int(r[0].lstrip("*")): float(r[cols.index("goodput req/s")]) for r in rows}
    assert all(g > 0 for g in goodput.values())  # every request met the loose SLOs
    winner = max(goodput, key=lambda i: (goodput[i], -i))
    marked = [r for r in rows if r[0].startswith("*")]
    assert len(marked) == 1 and int(marked[0][0][1:]) == winner
    command = shlex.split(text.strip().splitlines()[-1])
    assert command[:4] == ["pdserve", "serve", "--model", "smollm2-135m-instruct"]
    seqs = int(command[command.index("--max-num-seqs") + 1])
    assert seqs == int(marked[0][cols.index("max_num_seqs")])
    saved = json.loads((out_dir / "tune.json").read_text())
    assert saved["best_trial"] == winner and saved["best_command"] == shlex.join(command)
    assert [t["settings"]["max_num_seqs"] for t in saved["trials"]] == [1, 4]
    assert (out_dir / "trial-1.log").exists() and (out_dir / "trial-2.log").exists()
