"""Random workloads through the scheduler with one step always in flight, against a simulated device.

The "device" runs steps in launch order: at launch a step writes its KV (placeholders read from the tokens the
previous launch sampled) and samples with a deterministic fake model; the scheduler hears of those tokens one
step later. Checked: every position a chunk attends to holds its own request's prefix (prefix hits, blocks
freed while a step still writes them, preemption), no leaks, and each request's output equals what the fake
model generates on its own.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from pdserve.engine.core.sched_output import PLACEHOLDER_TOKEN_ID
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from tests.engine.core.test_core_properties import check_pool, workloads

EOS = 9
MAX_MODEL_LEN = 24


def fake_next(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 10


def generate_alone(prompt: list[int], max_tokens: int) -> list[int]:
    """What the request outputs when nothing else happens to it."""
    seq, out = list(prompt), []
    while True:
        token = fake_next(seq)
        seq.append(token)
        out.append(token)
        if token == EOS or len(out) >= max_tokens or len(seq) >= MAX_MODEL_LEN:
            return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads_with_a_step_in_flight(w):
    bs = w["block_size"]
    num_blocks = w["pool_tokens"] // bs
    s = Scheduler(block_size=bs, num_blocks=num_blocks, max_num_batched_tokens=w["budget"],
                  max_num_seqs=w["max_num_seqs"], max_model_len=MAX_MODEL_LEN, enable_prefix_caching=w["caching"],
                  enable_chunked_prefill=w["chunked"], enable_kv_events=True, async_scheduling=True)
    arrivals = [(arrive, Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), eos_token_id=EOS))
                for i, (prompt, max_tokens, arrive) in enumerate(w["requests"])]
    everyone = [r for _, r in arrivals]
    truth = {r.request_id: list(r.prompt_token_ids) for r in everyone}  # prompt + every token sampled on device
    aborted: set[str] = set()
    kv: dict[tuple[int, int], tuple[int, ...]] = {}
    progress: dict[str, int] = {}
    in_flight = None
    for step in range(600):
        for _arrive, r in [a for a in arrivals if a[0] == step]:
            s.add_request(r)
        arrivals = [a for a in arrivals if a[0] > step]
        for at, idx in w["aborts"]:
            if at == step and idx < len(everyone) and s.get_request(everyone[idx].request_id) is not None:
                s.finish_requests(everyone[idx].request_id, RequestStatus.FINISHED_ABORTED)
                aborted.add(everyone[idx].request_id)
        if not arrivals and not s.has_unfinished_requests() and in_flight is None:
            break
        out = s.schedule()
        assert out.total_num_tokens <= w["budget"] and len(out.chunks) <= w["max_num_seqs"]
        for rid in out.finished_request_ids | out.preempted_request_ids:
            del progress[rid]
        for c in out.chunks:
            r = s.get_request(c.request_id)
            assert c.start_pos == progress.get(c.request_id, r.num_cached_tokens)
            progress[c.request_id] = c.context_len
            seq = truth[c.request_id]
            assert len(seq) >= c.context_len
            for i, token in enumerate(c.token_ids):
                known = c.start_pos + i < r.num_tokens
                assert (token == seq[c.start_pos + i]) if known else (token == PLACEHOLDER_TOKEN_ID)
        # Launch: write the step's KV, then every chunk reads its context, then sample.
        for c in out.chunks:
            seq = truth[c.request_id]
            for p in range(c.start_pos, c.context_len):
                kv[(c.block_ids[p // bs], p % bs)] = tuple(seq[:p + 1])
        for c in out.chunks:
            seq = truth[c.request_id]
            for p in range(c.context_len):
                assert kv.get((c.block_ids[p // bs], p % bs)) == tuple(seq[:p + 1])
        sampled = {}
        for c in out.chunks:
            if c.sample:
                seq = truth[c.request_id]
                assert len(seq) == c.context_len
                sampled[c.request_id] = fake_next(seq)
                seq.append(sampled[c.request_id])
        if in_flight is not None:
            s.update_from_output(*in_flight)
        in_flight = (out, sampled) if out.chunks else None
        s.take_finished_without_output()
        s.take_kv_events()
        check_pool(s.kv_cache_manager.pool)
    else:
        raise AssertionError("the scheduler did not drain its queue in 600 steps")

    assert s.get_stats().num_free_blocks == num_blocks
    for r in everyone:
        assert r.is_finished and r.num_pending_tokens == 0
        if r.request_id not in aborted and r.abort_reason is None:
            assert r.output_token_ids == generate_alone(r.prompt_token_ids, r.sampling_params.max_tokens)
