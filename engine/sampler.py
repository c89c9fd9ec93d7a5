"""Token sampling for a batch: penalties, min-tokens masking, temperature, top-k / top-p / min-p, seeds, logprobs.

Everything is vectorized over the batch so that on a GPU a step costs one host sync (the final ``tolist``), not
one per request. Greedy rows take the argmax of the penalized logits, like transformers' ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.outputs import Logprob
from pdserve.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: [sampled token's logprob, then the top-k alternatives], or None where not asked for.
    logprobs: list[list[Logprob] | None] | None


class Sampler:
    """Samples one token per row of logits; keeps a seeded generator per request that asked for one."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def add_request(self, request: Request) -> None:
        seed = request.sampling_params.seed
        if seed is not None and not request.sampling_params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request.request_id] = gen

    def remove_request(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """``logits``: [S, V] float32, one row per request in ``requests`` (same order)."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (logits.shape, len(requests))
        raw = logits.float()
        x = raw
        # Penalties and min-tokens masking edit the logits in place; only then is a copy needed (a [S, V] float32
        # copy per step is a few hundred MB of traffic at large batch and vocabulary).
        if any(r.sampling_params.needs_penalties or r.num_output_tokens < r.sampling_params.min_tokens
               for r in requests):
            x = raw.clone()
            self._apply_penalties(x, requests)
            self._mask_stop_tokens_before_min(x, requests)
        token_ids = self._pick(x, requests)
        logprobs = self._logprobs(raw, token_ids, requests)
        return SampleResult(token_ids=token_ids.tolist(), logprobs=logprobs)

    # ------------------------------------------------------------------ logits processing
    def _apply_penalties(self, x: torch.Tensor, requests: list[Request]) -> None:
        rows = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties]
        for i in rows:  # penalties are rare; a per-row loop keeps the common path free of them
            params, req = requests[i].sampling_params, requests[i]
            if params.repetition_penalty != 1.0:
                # transformers' definition: over prompt and output, divide positive logits, multiply negative.
                seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)),
                                    dtype=torch.long, device=x.device)
                vals = x[i, seen]
                x[i, seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                         vals * params.repetition_penalty)
            if req.output_token_ids and (params.frequency_penalty or params.presence_penalty):
                out = torch.tensor(req.output_token_ids, dtype=torch.long, device=x.device)
                counts = torch.zeros(x.shape[1], device=x.device).scatter_add_(0, out, torch.ones_like(out,
                                                                                                   dtype=x.dtype))
                x[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)

    def _mask_stop_tokens_before_min(self, x: torch.Tensor, requests: list[Request]) -> None:
        for i, req in enumerate(requests):
            params = req.sampling_params
            if req.num_output_tokens >= params.min_tokens:
                continue
            stop = list(params.stop_token_ids)
            if req.eos_token_id is not None and not params.ignore_eos:
                stop.append(req.eos_token_id)
            if stop:
                x[i, stop] = float("-inf")

    # ------------------------------------------------------------------ picking
    def _pick(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        greedy_flags = [r.sampling_params.greedy for r in requests]
        picked = x.argmax(dim=-1)
        if all(greedy_flags):  # decided on the host: no device sync
            return picked
        greedy = torch.tensor(greedy_flags, device=x.device)
        temps = torch.tensor([r.sampling_params.temperature or 1.0 for r in requests], device=x.device)
        x = x / temps.unsqueeze(1)
        x = self._top_k_top_p_min_p(x, requests)
        probs = torch.softmax(x, dim=-1)
        # Exponential race: argmax(p / q) with q ~ Exp(1) is a sample from p, and lets each row draw its q from
        # its own seeded generator without a per-row multinomial call.
        q = torch.empty_like(probs).exponential_()
        for i, req in enumerate(requests):
            gen = self._generators.get(req.request_id)
            if gen is not None:
                q[i].exponential_(generator=gen)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy, picked, sampled)

    @staticmethod
    def _top_k_top_p_min_p(x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        vocab = x.shape[1]
        if all((p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1 and p.min_p <= 0 for p in params):
            return x  # nothing to filter (decided on the host: no device sync)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=x.device)
        top_p = torch.tensor([p.top_p for p in params], device=x.device, dtype=x.dtype)
        min_p = torch.tensor([p.min_p for p in params], device=x.device, dtype=x.dtype)
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=x.device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        sorted_probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it already does.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= top_p.unsqueeze(1)
        drop |= sorted_probs < min_p.unsqueeze(1) * sorted_probs[:, :1]
        drop[:, 0] = False  # the most likely token always survives
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    # ------------------------------------------------------------------ logprobs
    @staticmethod
    def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor,
                  requests: list[Request]) -> list[list[Logprob] | None] | None:
        wanted = [r.sampling_params.logprobs for r in requests]
        if all(w is None for w in wanted):
            return None
        k = max(w or 0 for w in wanted)
        lp = torch.log_softmax(raw, dim=-1)
        chosen = lp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        ranks = (lp > chosen.unsqueeze(1)).sum(dim=-1) + 1
        top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], token_ids[:, None][:, :0])
        tok_l, chosen_l, ranks_l = token_ids.tolist(), chosen.tolist(), ranks.tolist()
        tv, ti = top_vals.tolist(), top_ids.tolist()
        result: list[list[Logprob] | None] = []
        for i, w in enumerate(wanted):
            if w is None:
                result.append(None)
                continue
            row = [Logprob(tok_l[i], chosen_l[i], ranks_l[i])]
            row += [Logprob(ti[i][j], tv[i][j], j + 1) for j in range(w)]
            result.append(row)
        return result
