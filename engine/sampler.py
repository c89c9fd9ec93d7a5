"""Token sampling for a batch: penalties, min-tokens masking, temperature, top-k / top-p / min-p, seeds, logprobs.

Everything is vectorized over the batch so that on a GPU a step costs one host sync (waiting for the sampled
ids), not one per request. Greedy rows take the argmax of the penalized logits, like transformers' ``generate``.

Sampling comes in two halves for asynchronous scheduling: :meth:`Sampler.launch` queues the device work and a
non-blocking copy of the results into pinned host memory, and returns at once with the sampled ids still on the
device (the next step reads them there); :meth:`PendingSample.result` waits for the copy and builds the lists.
:meth:`Sampler.sample` does both. The launch path never makes the host wait for the device: small per-row
parameters travel by pinned non-blocking copies, never by a synchronizing ``torch.tensor(..., device=cuda)``.
Penalties and min-tokens masking read each request's tokens on the host; the engine runs those steps
synchronously (every earlier token known), so they may synchronize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.faults import describe, is_device_fault
from pdserve.engine.logits_processors import apply_logits_processors
from pdserve.engine.outputs import Logprob
from pdserve.engine.request import Request
from pdserve.engine.structured_output.bitmask import apply_token_bitmask, small_bitmask_to
from pdserve.engine.worker.input_batch import small_tensor_to


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: [sampled token's logprob, then the top-k alternatives], or None where not asked for.
    logprobs: list[list[Logprob] | None] | None
    # Rows whose request could not be sampled (row -> error text); their token ids are placeholders.
    errors: dict[int, str] = field(default_factory=dict)


class PendingSample:
    """A launched sampling step. ``token_ids``: ``[S]`` int64 on the device, ready for the next step's inputs;
    :meth:`result` waits for their host copy (and the logprob values') and returns the lists."""

    def __init__(self, token_ids: torch.Tensor, host: list[torch.Tensor], event: torch.cuda.Event | None,
                 wanted_logprobs: list[int | None] | None) -> None:
        self.token_ids = token_ids
        self._host = host  # [ids, then (chosen, ranks, top values, top ids) when logprobs are asked for]
        self._event = event
        self._wanted = wanted_logprobs
        self.errors: dict[int, str] = {}  # rows that failed (see Sampler.launch); known at launch

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        ids = self._host[0].tolist()
        if self._wanted is None:
            return SampleResult(token_ids=ids, logprobs=None)
        chosen, ranks, top_vals, top_ids = (t.tolist() for t in self._host[1:])
        result: list[list[Logprob] | None] = []
        for i, w in enumerate(self._wanted):
            if w is None:
                result.append(None)
                continue
            row = [Logprob(ids[i], chosen[i], ranks[i])]
            row += [Logprob(top_ids[i][j], top_vals[i][j], j + 1) for j in range(w)]
            result.append(row)
        return SampleResult(token_ids=ids, logprobs=result)


class _ReadySample(PendingSample):
    """A sample computed row by row on the host's schedule (after a batch failed): nothing left to wait for."""

    def __init__(self, token_ids: torch.Tensor, result: SampleResult) -> None:
        super().__init__(token_ids, [], None, None)
        self._result = result
        self.errors = result.errors

    def result(self) -> SampleResult:
        return self._result


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

    def sample(self, logits: torch.Tensor, requests: list[Request],
               bitmask: torch.Tensor | None = None) -> SampleResult:
        """``logits``: [S, V] float32, one row per request in ``requests`` (same order)."""
        return self.launch(logits, requests, bitmask).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, requests: list[Request],
               bitmask: torch.Tensor | None = None) -> PendingSample:
        """Queue the sampling of ``logits`` ([S, V], one row per request) and the copy of its results to the
        host; returns without waiting for the device (see the module docstring).

        Fault isolation: if the batch fails with an error that is not a device fault (a parameter no check
        caught), every row is sampled again on its own, so the rows that fail again are the culprits; they come
        back in ``errors`` (row -> text) and the engine aborts only their requests. Rows are independent, so the
        others get the tokens the batch would have given them (a seeded row's generator may have advanced).

        ``bitmask``: structured output's allowed tokens, ``[S, ceil(V / 32)]`` int32 on the CPU (bit ``v % 32`` of
        word ``v // 32`` set: token ``v`` allowed), or None; applied on the device (see
        :mod:`pdserve.engine.structured_output.bitmask`). Logprobs stay those of the unconstrained model.
        """
        if not requests:  # e.g. a step whose rows were all verified drafts: no device work, nothing to wait for
            return PendingSample(torch.empty(0, dtype=torch.int64, device=logits.device),
                                 [torch.empty(0, dtype=torch.int64)], None, None)
        try:
            return self._launch_batch(logits, requests, bitmask)
        except Exception as exc:
            if is_device_fault(exc) or not requests:
                raise
            return self._launch_row_by_row(logits, requests, bitmask)

    def _launch_row_by_row(self, logits: torch.Tensor, requests: list[Request],
                           bitmask: torch.Tensor | None) -> PendingSample:
        ids: list[int] = []
        logprobs: list[list[Logprob] | None] = []
        errors: dict[int, str] = {}
        for i, req in enumerate(requests):
            try:
                row_mask = bitmask[i:i + 1] if bitmask is not None else None
                row = self._launch_batch(logits[i:i + 1], [req], row_mask).result()
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                errors[i] = describe(exc)
                ids.append(0)  # a placeholder: the request is aborted before its token is used
                logprobs.append(None)
                continue
            ids.append(row.token_ids[0])
            logprobs.append(row.logprobs[0] if row.logprobs is not None else None)
        token_ids = torch.tensor(ids, dtype=torch.int64, device=logits.device)
        has_lp = any(lp is not None for lp in logprobs)
        return _ReadySample(token_ids, SampleResult(ids, logprobs if has_lp else None, errors))

    def _launch_batch(self, logits: torch.Tensor, requests: list[Request],
                      bitmask: torch.Tensor | None = None) -> PendingSample:
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (logits.shape, len(requests))
        raw = logits.float()
        x = self.process_logits(raw, requests, bitmask)
        token_ids = self._pick(x, requests)
        wanted = [r.sampling_params.logprobs for r in requests]
        results = [token_ids]
        if all(w is None for w in wanted):
            wanted = None
        else:
            results += self._logprobs(raw, token_ids, max(w or 0 for w in wanted))
        if token_ids.device.type != "cuda":
            return PendingSample(token_ids, results, None, wanted)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in results]
        for dst, src in zip(host, results):
            dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingSample(token_ids, host, event, wanted)

    # ------------------------------------------------------------------ logits processing
    def process_logits(self, raw: torch.Tensor, requests: list[Request],
                       bitmask: torch.Tensor | None = None) -> torch.Tensor:
        """``raw`` ([S, V] float32) with penalties, min-tokens masking and the bitmask applied: what greedy rows
        take the argmax of and what temperature and the filters then shape (speculative decoding's verifier
        reads the same). Returns ``raw`` itself when nothing applies."""
        x = raw
        # Penalties, min-tokens masking and the structured-output bitmask edit the logits in place; only then is a
        # copy needed (a [S, V] float32 copy per step is a few hundred MB of traffic at large batch and vocabulary).
        if any(r.sampling_params.needs_penalties or r.num_output_tokens < r.sampling_params.min_tokens
               for r in requests):
            x = raw.clone()
            self._apply_penalties(x, requests)
            self._mask_stop_tokens_before_min(x, requests)
        if any(r.sampling_params.needs_logits_processing for r in requests):  # logit_bias, allowed/bad tokens
            x = raw.clone() if x is raw else x
            apply_logits_processors(x, requests)
        if bitmask is not None:
            x = raw.clone() if x is raw else x
            apply_token_bitmask(x, small_bitmask_to(bitmask, x.device))
        return x

    def target_probs(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The distribution sampled rows draw from: processed logits ``x`` over temperature, then top-k, top-p
        and min-p, softmaxed ([S, V]; meaningless on greedy rows, which take ``x``'s argmax)."""
        temps = small_tensor_to([r.sampling_params.temperature or 1.0 for r in requests], x.dtype, x.device)
        return torch.softmax(self._top_k_top_p_min_p(x / temps.unsqueeze(1), requests), dim=-1)

    def generator(self, request_id: str) -> torch.Generator | None:
        """The seeded generator of a request that asked for a seed (None otherwise)."""
        return self._generators.get(request_id)

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
            generated = req.generated_token_ids
            if generated and (params.frequency_penalty or params.presence_penalty):
                out = torch.tensor(generated, dtype=torch.long, device=x.device)
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
        greedy = small_tensor_to(greedy_flags, torch.bool, x.device)
        probs = self.target_probs(x, requests)
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
        top_k = small_tensor_to([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, x.device)
        top_p = small_tensor_to([p.top_p for p in params], x.dtype, x.device)
        min_p = small_tensor_to([p.min_p for p in params], x.dtype, x.device)
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
    def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[torch.Tensor]:
        """On the device: each row's sampled-token logprob [S], its rank [S], and the top-``k`` logprobs and ids
        [S, k] (:class:`PendingSample` turns them into :class:`Logprob` rows)."""
        lp = torch.log_softmax(raw, dim=-1)
        chosen = lp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        ranks = (lp > chosen.unsqueeze(1)).sum(dim=-1) + 1
        top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], token_ids[:, None][:, :0])
        return [chosen, ranks, top_vals, top_ids]
