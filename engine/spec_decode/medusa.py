"""The Medusa proposer: ``n`` independent heads over the target's last hidden state, head ``i`` guessing the token
``i + 2`` places ahead (the target's own head guesses the next one).

A head is ``L`` residual blocks ``x + SiLU(W x + b)`` then a linear head to the vocabulary. Checkpoints, as
published:

* Medusa's own layout -- ``medusa_head.{i}.{j}.linear.weight/bias`` for block ``j`` of head ``i`` and
  ``medusa_head.{i}.{L}.weight`` for its vocabulary head; ``config.json`` has ``medusa_num_heads`` and
  ``medusa_num_layers`` (files ``*.safetensors``, or PyTorch's ``medusa_lm_head.pt`` / ``*.bin``);
* vLLM's layout -- ``blocks.{i}.layers.{j}.weight/bias`` and ``lm_heads.{i}.weight``, with ``num_heads`` and
  ``num_hidden_layers`` in ``config.json``.

A checkpoint without vocabulary heads shares the target's ``lm_head`` (all heads then differ only by their
blocks). The hidden state read is the target's final (normed) one at the last position whose next token is
known, so a proposal needs nothing but the step just run: no KV cache of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pdserve.engine.request import Request
from pdserve.engine.spec_decode.proposers import ObservedChunk, Proposer

_ORIGINAL = re.compile(r"^medusa_head\.(\d+)\.(\d+)\.(?:linear\.)?(weight|bias)$")
_VLLM_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_HEAD = re.compile(r"^lm_heads\.(\d+)\.weight$")


class MedusaHeads(nn.Module):
    """The heads; ``forward(hidden [S, D]) -> logits [S, n, V]``."""

    def __init__(self, blocks: list[list[tuple[torch.Tensor, torch.Tensor]]], heads: list[torch.Tensor] | None,
                 target_logits) -> None:
        super().__init__()
        self.blocks = [[(w, b) for w, b in head] for head in blocks]
        self.heads = heads
        object.__setattr__(self, "target_logits", target_logits)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy guesses of the first ``n`` heads, ``[S, n]`` target token ids."""
        guesses = []
        for i in range(n):
            x = hidden
            for w, b in self.blocks[i]:
                x = x + torch.nn.functional.silu(torch.nn.functional.linear(x, w, b))
            logits = self.target_logits(x) if self.heads is None else torch.nn.functional.linear(x, self.heads[i])
            guesses.append(logits.argmax(dim=-1))
        return torch.stack(guesses, dim=1)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from pdserve.engine.spec_decode.eagle_head import iter_head_tensors

    return {name.removeprefix("model."): t for name, t in iter_head_tensors(directory)}


def load_medusa_heads(directory: Path, target: nn.Module, device: torch.device, dtype: torch.dtype) -> MedusaHeads:
    """Read either layout (module docstring); checks every head has all its blocks and the shapes fit."""
    from pdserve.engine.spec_decode.eagle_head import read_head_config

    fields = read_head_config(directory)
    num_heads = fields.get("medusa_num_heads", fields.get("num_heads"))
    num_layers = fields.get("medusa_num_layers", fields.get("num_hidden_layers"))
    if not isinstance(num_heads, int) or not isinstance(num_layers, int) or num_heads < 1 or num_layers < 0:
        raise ValueError(f"{directory}/config.json must give medusa_num_heads and medusa_num_layers (or vLLM's "
                         f"num_heads and num_hidden_layers)")
    d, vocab = target.config.hidden_size, target.config.vocab_size
    weights: dict[tuple[int, int, str], torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}
    for name, t in _read_tensors(directory).items():
        m = _ORIGINAL.match(name) or _VLLM_BLOCK.match(name)
        if m and int(m.group(2)) < num_layers:
            weights[(int(m.group(1)), int(m.group(2)), m.group(3))] = t
        elif m and int(m.group(2)) == num_layers and m.group(3) == "weight":
            heads[int(m.group(1))] = t  # the original layout's vocabulary head follows the blocks
        elif (h := _VLLM_HEAD.match(name)) is not None:
            heads[int(h.group(1))] = t
        else:
            raise ValueError(f"Medusa checkpoint tensor {name!r} fits neither published layout")
    blocks = []
    for i in range(num_heads):
        head = []
        for j in range(num_layers):
            w, b = weights.get((i, j, "weight")), weights.get((i, j, "bias"))
            if w is None or tuple(w.shape) != (d, d) or (b is not None and tuple(b.shape) != (d,)):
                raise ValueError(f"Medusa head {i} block {j} in {directory} is missing or not [{d}, {d}]")
            head.append((w.to(device, dtype), None if b is None else b.to(device, dtype)))
        blocks.append(head)
    if heads and (sorted(heads) != list(range(num_heads))
                  or any(tuple(h.shape) != (vocab, d) for h in heads.values())):
        raise ValueError(f"Medusa vocabulary heads in {directory} must be one [{vocab}, {d}] per head")
    shared = [heads[i].to(device, dtype) for i in range(num_heads)] if heads else None
    return MedusaHeads(blocks, shared, target.compute_logits)


class MedusaProposer(Proposer):
    """Keeps, per request, the target's hidden state at its last position whose next token is known; a proposal
    runs the first ``k`` heads on it (``k`` may not exceed the checkpoint's heads)."""

    hidden_states = "last"

    def __init__(self, model: str, runner, num_speculative_tokens: int, max_model_len: int) -> None:
        from pdserve.engine.spec_decode.eagle_head import resolve_head_dir

        directory = resolve_head_dir(model)
        self.heads = load_medusa_heads(directory, runner.model, runner.device, runner.dtype)
        if num_speculative_tokens > self.heads.num_heads:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} but the Medusa checkpoint in "
                             f"{directory} has {self.heads.num_heads} heads (one guess each)")
        self.max_model_len = max_model_len
        runner.capture_hidden_states("last")
        self._last: dict[str, tuple[int, torch.Tensor]] = {}  # request id -> (position, hidden [D])

    def observe(self, items: list[ObservedChunk], hidden: torch.Tensor) -> None:
        kept, rows = [], []
        for item in items:
            r, c = item.request, item.chunk
            n = min(c.start_pos + c.num_tokens, r.num_tokens - 1) - c.start_pos
            if n > 0:
                kept.append((r.request_id, c.start_pos + n - 1))
                rows.append(item.row + n - 1)
        if kept:  # one gather: the rows kept must not hold the whole step's hidden states alive
            picked = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
            for (rid, pos), h in zip(kept, picked):
                self._last[rid] = (pos, h)

    def propose(self, request: Request, k: int) -> list[int]:
        return self.propose_batch([request], [k])[0]

    @torch.inference_mode()
    def propose_batch(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        ks = [min(k, self.max_model_len - r.num_tokens) for r, k in zip(requests, ks)]
        live = [i for i, (r, k) in enumerate(zip(requests, ks)) if k > 0
                and self._last.get(r.request_id, (-1,))[0] == r.num_tokens - 2]  # read the latest step
        if not live:
            return out
        hidden = torch.stack([self._last[requests[i].request_id][1] for i in live])
        guesses = self.heads(hidden, max(ks[i] for i in live)).tolist()
        for i, g in zip(live, guesses):
            out[i] = g[:ks[i]]
        return out

    def forget(self, request_id: str) -> None:
        self._last.pop(request_id, None)
