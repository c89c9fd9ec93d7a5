"""The EAGLE / EAGLE-3 proposer: a one-layer head over the target's hidden states, with its own small paged KV.

The head at position ``i`` reads ``(h_i, x_{i+1})`` -- the target's hidden state there and the token that
followed -- and its output predicts ``x_{i+2}``; so it can process a position once the *next* token is known.
After every step (:meth:`EagleProposer.observe`) it runs once over the positions of that step whose hidden
states are valid -- prompt chunks, a decode token, or a verify chunk's accepted prefix -- writing its KV and
keeping, per request, its output at the last of them. A proposal (:meth:`propose_batch`) then reads the first
guess from that output and runs ``k - 1`` one-token steps, feeding the head its own output as the next hidden
state (EAGLE's autoregression over features)::

    known tokens  x_0 .. x_{L-1}    target hidden states valid for positions 0 .. L-2
    observe       positions s .. L-2 with tokens x_{s+1} .. x_{L-1}    -> g_{L-2}; d_1 = argmax head(g_{L-2})
    step j        position L-2+j with token d_j and hidden g_{L-3+j}    -> d_{j+1}

The guesses' positions are scratch (the next observation starts at ``L - 1`` again and overwrites them).

The head's KV lives in its own cache with its own block tables (``draft_kv_cache_gib``). A request's head
sequence starts at the first position the head saw (a prefix-cache hit skips the target's hidden states of the
cached prefix, so the head's context starts after it); positions are shifted by that base, which rotary
embeddings do not notice (attention scores depend only on relative positions). A step the head did not see
(adaptive k turned speculation off for a large batch) restarts its context the same way. Greedy guesses are a
point mass, so sampled requests keep the target's distribution.
"""

from __future__ import annotations

import torch

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.request import Request
from pdserve.engine.spec_decode.proposers import ObservedChunk, Proposer


class EagleProposer(Proposer):
    """Args: ``model`` (a head directory or a shipped head's name), ``version`` (1: EAGLE, 3: EAGLE-3), the
    target ``runner`` (its model, device, dtype, attention backend and block size), ``kv_cache_bytes`` for the
    head's cache and ``max_model_len``."""

    def __init__(self, model: str, version: int, runner, kv_cache_bytes: int, max_model_len: int) -> None:
        from pdserve.engine.spec_decode.eagle_head import (
            aux_layer_ids,
            llama_config,
            load_eagle_head,
            read_head_config,
            resolve_head_dir,
        )
        from pdserve.engine.worker.attention import get_attention_backend
        from pdserve.engine.worker.kv_cache import allocate_kv_caches, kv_cache_spec, num_blocks_for_bytes

        directory = resolve_head_dir(model)
        target = runner.model
        self.device, self.dtype = runner.device, runner.dtype
        self.block_size, self.max_model_len = runner.block_size, max_model_len
        fields = read_head_config(directory)
        self.hidden_states = "last" if version == 1 else aux_layer_ids(fields, target.config.num_hidden_layers)
        spec = kv_cache_spec(llama_config(fields), self.block_size, runner.dtype)
        backend = get_attention_backend(runner.config.device.attention_backend, self.device, spec.head_dim,
                                        self.block_size)
        self.head, _ = load_eagle_head(directory, version, target, backend, self.device, runner.dtype)
        runner.capture_hidden_states(self.hidden_states)
        self.num_blocks = max(1, num_blocks_for_bytes(spec, kv_cache_bytes))
        self.kv_cache = allocate_kv_caches(spec, self.num_blocks, self.device)[0]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._base: dict[str, int] = {}  # the first position of the request the head's sequence holds
        self._done: dict[str, int] = {}  # positions base .. done - 1 are in the head's cache
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # output at done - 1: (for_logits, hidden)

    # ------------------------------------------------------------------ observing the target's steps
    @torch.inference_mode()
    def observe(self, items: list[ObservedChunk], hidden: torch.Tensor) -> None:
        chunks, rows, requests = [], [], []
        for item in items:
            r, c = item.request, item.chunk
            s = c.start_pos
            n = min(c.start_pos + c.num_tokens, r.num_tokens - 1) - s  # positions whose next token is known
            if n <= 0:
                continue
            rid = r.request_id
            if rid not in self._done or s > self._done[rid] or s < self._base[rid]:
                self.forget(rid)  # new, or a gap the head did not see: its sequence starts here
                self._base[rid], self._done[rid] = s, s
            base = self._base[rid]
            if not self._reserve(rid, s + n - base):
                self.forget(rid)
                continue
            chunks.append(ScheduledChunk(rid, r.all_token_ids[s + 1:s + n + 1], s - base, self._tables[rid], True))
            rows.append(torch.arange(item.row, item.row + n))
            requests.append(r)
            self._done[rid] = s + n
        if not chunks:
            return
        index = torch.cat(rows).to(hidden.device)
        out, nxt = self._forward(chunks, hidden.index_select(0, index), from_target=True)
        for r, a, b in zip(requests, out, nxt):
            self._last[r.request_id] = (a, b)

    # ------------------------------------------------------------------ proposing
    def propose(self, request: Request, k: int) -> list[int]:
        return self.propose_batch([request], [k])[0]

    @torch.inference_mode()
    def propose_batch(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        ks = [min(k, self.max_model_len - r.num_tokens) for r, k in zip(requests, ks)]
        live = [i for i, (r, k) in enumerate(zip(requests, ks)) if k > 0 and r.request_id in self._last
                and self._done[r.request_id] == r.num_tokens - 1]  # caught up with the known tokens
        # Scratch positions up to num_tokens + k - 3 (see the module docstring), relative to the head's base.
        live = [i for i in live if self._reserve(
            requests[i].request_id, requests[i].num_tokens + ks[i] - 3 - self._base[requests[i].request_id])]
        if not live:
            return out
        for_logits = torch.stack([self._last[requests[i].request_id][0] for i in live])
        hidden = torch.stack([self._last[requests[i].request_id][1] for i in live])
        guesses = self.head.draft_tokens(for_logits).tolist()
        for i, g in zip(live, guesses):
            out[i].append(g)
        for j in range(1, max(ks[i] for i in live)):
            keep = [n for n, i in enumerate(live) if ks[i] > j]
            live = [live[n] for n in keep]
            hidden = hidden[keep]
            chunks = []
            for i in live:
                r = requests[i]
                rid = r.request_id
                chunks.append(ScheduledChunk(rid, [out[i][-1]], r.num_tokens - 2 + j - self._base[rid],
                                             self._tables[rid], True))
            for_logits, hidden = self._forward(chunks, hidden, from_target=False)
            for i, g in zip(live, self.head.draft_tokens(for_logits).tolist()):
                out[i].append(g)
        return out

    def forget(self, request_id: str) -> None:
        self._free.extend(self._tables.pop(request_id, ()))
        for state in (self._base, self._done, self._last):
            state.pop(request_id, None)

    # ------------------------------------------------------------------ internals
    def _reserve(self, request_id: str, last_position: int) -> bool:
        """Grow the table to hold head positions ``0 .. last_position``; False if the cache is full."""
        table = self._tables.setdefault(request_id, [])
        need = -(-(last_position + 1) // self.block_size) - len(table)
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(max(0, need)))
        return True

    def _forward(self, chunks: list[ScheduledChunk], hidden: torch.Tensor,
                 from_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the head; ``hidden``: the rows of every chunk, in chunk order (target features when
        ``from_target``, else the head's own outputs). Returns each chunk's last row of ``(for_logits,
        next_hidden)``, in chunk order."""
        from pdserve.engine.worker.input_batch import build_inputs

        # The attention metadata's contract: one-token chunks first.
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].num_tokens != 1)
        if order != list(range(len(chunks))):
            starts = [0]
            for c in chunks:
                starts.append(starts[-1] + c.num_tokens)
            perm = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]).to(hidden.device)
            hidden = hidden.index_select(0, perm)
        inputs = build_inputs(SchedulerOutput(chunks=[chunks[i] for i in order]), self.block_size, self.device,
                              num_blocks=self.num_blocks)
        md = inputs.attn_metadata
        for_logits, nxt = self.head(inputs.input_ids, inputs.positions, hidden.to(self.dtype),
                                    self.kv_cache, md, from_target)
        last = md.logits_indices
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(last.device)
        return for_logits[last][inverse], nxt[last][inverse]
