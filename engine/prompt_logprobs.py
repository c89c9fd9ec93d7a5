"""Prompt logprobs: the log-probability of every prompt token given the tokens before it (vLLM's
``prompt_logprobs``), what scoring clients such as lm-evaluation-harness read.

The engine core plans, before a step runs, which positions of which chunks need them (:func:`plan`); the model
runner then turns those positions' hidden states into logits and logprobs (:func:`compute`), only for the requests
that asked, so ordinary requests never pay for logits over their prompt. A chunk at positions ``s .. s+n-1``
predicts the prompt tokens at ``s+1 .. s+n`` (the last prompt position predicts the first output token, which is
the sampler's business), so chunked prefill simply concatenates: the rows of a chunk starting at ``s`` are rows
``s ..`` of the request's list (:func:`store`), and a recomputation after a preemption overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pdserve.engine.core.sched_output import SchedulerOutput
from pdserve.engine.outputs import Logprob

# Rows turned into logits at once: bounds the float32 [rows, vocab] scratch (25 MB at a 49k vocabulary, 78 MB at
# 152k) below the sampled rows' logits that the model runner's profiling run already made room for.
_ROWS_PER_SLICE = 128


@dataclass(frozen=True)
class PromptLogprobsTask:
    """One chunk's share: its first ``len(target_ids)`` positions predict ``target_ids`` (prompt tokens)."""

    num_top: int  # top alternatives per token (0: only the prompt token's own logprob)
    start_pos: int  # the chunk's first position: row ``start_pos`` of the request's list is its first
    target_ids: list[int]


def plan(sched_out: SchedulerOutput, get_request: Callable[[str], Any]) -> dict[str, PromptLogprobsTask]:
    """The chunks of this step whose positions must yield prompt logprobs, by request id (empty for a step
    without such requests). A request that already produced output (preempted and recomputing) sent its prompt
    logprobs already and is skipped."""
    tasks: dict[str, PromptLogprobsTask] = {}
    for chunk in sched_out.chunks:
        req = get_request(chunk.request_id)
        if req is None or req.sampling_params.prompt_logprobs is None or req.num_output_tokens:
            continue
        end = min(chunk.start_pos + chunk.num_tokens, req.num_prompt_tokens - 1)  # last predicted position
        if end <= chunk.start_pos:
            continue
        tasks[chunk.request_id] = PromptLogprobsTask(req.sampling_params.prompt_logprobs, chunk.start_pos,
                                                     req.prompt_token_ids[chunk.start_pos + 1:end + 1])
    return tasks


@torch.inference_mode()
def compute(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
            sched_out: SchedulerOutput, query_start_loc: list[int],
            tasks: dict[str, PromptLogprobsTask]) -> dict[str, tuple[int, list[list[Logprob]]]]:
    """Per planned request: ``(start_pos, rows)``, one row per target token: ``[its Logprob (rank 1 = most
    likely), then the top-k]``. ``hidden``: the step's ``[T, D]`` hidden states; ``query_start_loc``: each chunk's
    first row in it. Logprobs are a float32 log-softmax of the logits whatever the model's dtype."""
    out: dict[str, tuple[int, list[list[Logprob]]]] = {}
    for i, chunk in enumerate(sched_out.chunks):
        task = tasks.get(chunk.request_id)
        if task is None:
            continue
        first = query_start_loc[i]
        rows: list[list[Logprob]] = []
        for lo in range(0, len(task.target_ids), _ROWS_PER_SLICE):
            targets = task.target_ids[lo:lo + _ROWS_PER_SLICE]
            h = hidden[first + lo:first + lo + len(targets)]
            rows += _rows(compute_logits(h).float(), targets, task.num_top)
        out[chunk.request_id] = (task.start_pos, rows)
    return out


def _rows(logits: torch.Tensor, targets: list[int], k: int) -> list[list[Logprob]]:
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(targets, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (lp > chosen.unsqueeze(1)).sum(dim=-1) + 1
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    if k > 0:
        top_vals, top_ids = (t.tolist() for t in lp.topk(k, dim=-1))
    rows = []
    for j, token in enumerate(targets):
        row = [Logprob(token, chosen_l[j], ranks_l[j])]
        if k > 0:
            row += [Logprob(top_ids[j][r], top_vals[j][r], r + 1) for r in range(k)]
        rows.append(row)
    return rows


def store(request: Any, start_pos: int, rows: list[list[Logprob]]) -> None:
    """Put a chunk's rows at their place in ``request.prompt_logprobs`` (row ``j`` is prompt token ``j + 1``'s)."""
    have = request.prompt_logprobs or []
    request.prompt_logprobs = have[:start_pos] + rows
