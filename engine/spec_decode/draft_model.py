"""The draft-model proposer: a smaller model with the same vocabulary guesses ``k`` tokens greedily.

It keeps its own paged KV cache (its own block tables, sized by ``draft_kv_cache_gib``). For each request it
remembers how many tokens its cache holds; a proposal computes the KV of the tokens since (the target's latest
output, accepted drafts included) in one chunk, whose last logits give the first guess, then runs ``k - 1``
one-token steps, all requests of the step batched together::

    known tokens     t_0 .. t_{L-1}                        (draft cache holds t_0 .. t_{done-1})
    step 0           [t_done .. t_{L-1}] at done .. L-1     -> g_1 = argmax of the last row
    step j (1..k-1)  [g_j] at L + j - 1                     -> g_{j+1}

The guesses' slots are scratch: the next proposal starts at ``L`` again, so guesses the target rejected are simply
overwritten. Greedy guesses are a point mass, which is what the verifier assumes without draft probabilities,
so sampled requests keep the target's distribution too. A request whose table cannot grow (cache full) gets no
guesses that step.
"""

from __future__ import annotations

import torch

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.request import Request
from pdserve.engine.spec_decode.proposers import Proposer


class DraftModelProposer(Proposer):
    """Args: ``model`` (a bundled name, a local HF directory or, with ``load_format="dummy"``, a preset),
    ``target_vocab_size`` (must match), ``max_model_len`` (the target's), and the target runner's ``device``,
    ``dtype``, ``attention_backend`` name and ``block_size``; ``kv_cache_bytes`` sizes the draft's cache."""

    def __init__(self, model: str, *, load_format: str, target_vocab_size: int, max_model_len: int,
                 device: torch.device, dtype: torch.dtype, attention_backend: str, block_size: int,
                 kv_cache_bytes: int, max_k: int) -> None:
        from pdserve.engine.config import ModelConfig
        from pdserve.engine.model_loader import load_model, resolve_model
        from pdserve.engine.worker.attention import get_attention_backend
        from pdserve.engine.worker.kv_cache import allocate_kv_caches, kv_cache_spec, num_blocks_for_bytes

        resolved = resolve_model(model, load_format)
        hf = resolved.hf_config
        if hf.vocab_size != target_vocab_size:
            raise ValueError(f"draft model {model!r} has a vocabulary of {hf.vocab_size} tokens, the target "
                             f"{target_vocab_size}: a draft model must share the target's tokenizer")
        if getattr(hf, "max_position_embeddings", max_model_len) < max_model_len:
            raise ValueError(f"draft model {model!r} has a context of {hf.max_position_embeddings} tokens, less "
                             f"than the target's max_model_len {max_model_len}")
        self.max_model_len = max_model_len
        config = ModelConfig(model=model, load_format=load_format, max_model_len=max_model_len,
                             path=resolved.path, tokenizer_path=resolved.tokenizer_path, hf_config=hf)
        spec = kv_cache_spec(hf, block_size, dtype)
        self.device = device
        self.block_size = block_size
        self.model = load_model(config, device, dtype, get_attention_backend(attention_backend, device,
                                                                             spec.head_dim, block_size))
        self.num_blocks = num_blocks_for_bytes(spec, kv_cache_bytes)
        self.kv_caches = allocate_kv_caches(spec, self.num_blocks, device)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._done: dict[str, int] = {}  # tokens of the request whose KV the draft cache holds

    def propose(self, request: Request, k: int) -> list[int]:
        return self.propose_batch([request], [k])[0]

    @torch.inference_mode()
    def propose_batch(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        # Guesses past the context could never be scheduled (their slots must fit max_model_len).
        ks = [min(k, self.max_model_len - r.num_tokens) for r, k in zip(requests, ks)]
        live = [i for i, (r, k) in enumerate(zip(requests, ks)) if k > 0 and self._reserve(r, k)]
        if not live:
            return out
        chunks = []
        for i in live:
            r = requests[i]
            done = min(self._done.get(r.request_id, 0), r.num_tokens - 1)  # at least one token: its logits
            chunks.append(ScheduledChunk(r.request_id, r.all_token_ids[done:], done,
                                         self._tables[r.request_id], True))
            self._done[r.request_id] = r.num_tokens
        guesses = self._forward(chunks)
        for i, g in zip(live, guesses):
            out[i].append(g)
        for j in range(1, max(ks[i] for i in live)):
            step = [i for i in live if ks[i] > j]
            chunks = [ScheduledChunk(requests[i].request_id, [out[i][-1]], requests[i].num_tokens + j - 1,
                                     self._tables[requests[i].request_id], True) for i in step]
            for i, g in zip(step, self._forward(chunks)):
                out[i].append(g)
        return out

    def forget(self, request_id: str) -> None:
        self._free.extend(self._tables.pop(request_id, ()))
        self._done.pop(request_id, None)

    def _reserve(self, request: Request, k: int) -> bool:
        """Grow the request's table to hold positions up to ``num_tokens + k - 2``; False if the cache is full."""
        table = self._tables.setdefault(request.request_id, [])
        need = -(-(request.num_tokens + k - 1) // self.block_size) - len(table)
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(max(0, need)))
        return True

    def _forward(self, chunks: list[ScheduledChunk]) -> list[int]:
        """One forward pass of the draft model; the greedy next token of each chunk, in the given order."""
        from pdserve.engine.worker.input_batch import build_inputs

        # The runner's contract: one-token chunks first.
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].num_tokens != 1)
        inputs = build_inputs(SchedulerOutput(chunks=[chunks[i] for i in order]), self.block_size, self.device,
                              num_blocks=self.num_blocks)
        md = inputs.attn_metadata
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, md)  # [T, D]
        ids = self.model.compute_logits(hidden[md.logits_indices]).argmax(dim=-1).tolist()
        result = [0] * len(chunks)
        for pos, i in enumerate(order):
            result[i] = ids[pos]
        return result
