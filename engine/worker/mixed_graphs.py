"""CUDA graphs of steps that carry prompt chunks: a ladder of token counts, any mix of prefill chunks and decodes.

A step with a prompt chunk of a few hundred tokens is host-bound when launched eagerly: about ten kernels per layer
launched from Python take longer than they run (a 128-token prefill of Llama-3.1-8B: 15.5 ms of wall time for
6.7 ms of kernels on an H100). So, beside the decode graphs (:mod:`pdserve.engine.worker.cuda_graphs`), the
model's forward is captured once per size ``T`` of a token-count ladder (16, 32, 48, 64, 96, 128, 192, 256, 384,
512, 640, 768, 1024, 1280, 1536, 2048, capped at the step token budget), each graph with ``T`` token rows and
``min(T, max_num_seqs)`` sequences. A step of ``S <= T`` tokens in ``B`` chunks replays the smallest graph that
holds it; its tokens are packed as an eager step packs them and the rest is padding that reads and writes no KV
(:mod:`pdserve.engine.worker.packed_layout`). Larger steps are compute-bound, so launching them eagerly costs
nothing that matters, and they run eagerly.

What is fixed at capture: the attention kernel's grids (``T`` rows, ``N`` sequences; one-token sequences run in a
launch of their own with the decode tile shape, kernels/attention.py), its tile shape (from the
``max_query_len = T`` hint) and split-KV factor (``max_seq_len = max_model_len``), and every matmul's shape. Chunk
lengths, positions, contexts and block tables are data, so any mix of prompt chunks (first or later ones, over a
cached prefix) and decode rows replays the same graph. The graphs return the hidden states of all ``T`` rows and
the model runner computes logits of the wanted rows only (their count varies from step to step).

The graphs share the decode runner's block-table rows (a request keeps its row whether its step is a decode or
a mixed step) and its memory pool. Placeholder ids (asynchronous scheduling) are filled on the device after the
metadata copy, from the previous step's sampled ids, as the decode runner does.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.worker.attention import AttentionMetadata
from pdserve.engine.worker.block_table_rows import BlockTableRows
from pdserve.engine.worker.cuda_graphs import GraphReplayer
from pdserve.engine.worker.input_batch import SampledTokens, placeholder_sources
from pdserve.engine.worker.packed_layout import fill_packed_layout

# Beyond this many tokens a step's kernels run long enough that launching them from Python is hidden behind
# them. Measured on an H100 (Llama-3.1-8B shapes, 1,000 ShareGPT-like requests): a top of 2048 instead of 512
# made the run 4.5 % faster, its steps of 512-2048 tokens (256 decodes with a new prompt or two) were not yet
# hidden (docs/performance.md).
MAX_MIXED_CAPTURE_TOKENS = 2048
# At most 50 % padding up to 64 tokens, 33 % above (``PDSERVE_MIXED_CUDA_GRAPHS=N`` may raise the top further).
_LADDER = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120,
           6144, 8192)


def mixed_capture_sizes(max_num_batched_tokens: int, top: int = MAX_MIXED_CAPTURE_TOKENS) -> list[int]:
    """The token-count ladder: :data:`_LADDER` below the top, and the top itself (the step token budget, at most
    ``top``)."""
    top = max(1, min(max_num_batched_tokens, top))
    return sorted({s for s in _LADDER if s < top} | {top})


def mixed_graph_top(setting: str) -> int:
    """``PDSERVE_MIXED_CUDA_GRAPHS``'s value as the ladder's top: ``0`` none (eager), ``1`` the default
    (:data:`MAX_MIXED_CAPTURE_TOKENS`), ``N`` > 1 that many tokens."""
    try:
        value = int(setting)
    except ValueError:
        raise ValueError(f"PDSERVE_MIXED_CUDA_GRAPHS takes 0 (off), 1 (on, up to {MAX_MIXED_CAPTURE_TOKENS} "
                         f"tokens) or a larger token count, got {setting!r}") from None
    if value < 0:
        raise ValueError(f"PDSERVE_MIXED_CUDA_GRAPHS must not be negative, got {setting!r}")
    return MAX_MIXED_CAPTURE_TOKENS if value == 1 else value


class MixedGraphRunner(GraphReplayer):
    """Captures ``model``'s forward for steps with prompt chunks and replays it; :meth:`run` returns hidden states.

    Args:
        model: the causal LM; ``model(input_ids, positions, kv_caches, metadata) -> [T, D]``.
        kv_caches: the per-layer KV caches (fixed addresses).
        rows: the decode runner's device block-table rows (shared, see the module docstring).
        sizes: the token ladder (:func:`mixed_capture_sizes`).
        max_num_seqs: the most chunks a step holds; a graph of ``T`` rows has ``min(T, max_num_seqs)`` sequences.
        max_model_len, block_size, num_blocks: as for the decode runner.
        pool: a CUDA graph memory pool to share (the decode runner's), or None for a new one.

    On a CPU device nothing is captured and :meth:`run` runs the model eagerly on the same padded static buffers
    (tests use that, with Triton's interpreter, to check the layout against an eager step).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], rows: BlockTableRows, *,
                 sizes: list[int], max_num_seqs: int, max_model_len: int, block_size: int, num_blocks: int,
                 device: torch.device, pool=None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.rows = rows
        self.sizes = sizes
        self.max_size = sizes[-1]
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        t, n, w = self.max_size, self.num_seqs(self.max_size), rows.width
        # int32 regions, sent in one copy: [ids T | positions T | slots T | logits rows T | query_start_loc N+1 |
        # seq_lens N | context_lens N | table rows N | fill rows N | fill sources N | update index N*W |
        # update ids N*W]. "fill": rows whose id is a placeholder, and their rows in the previous step's samples.
        self._allocate_regions([("ids", t), ("pos", t), ("slots", t), ("logits", t), ("qsl", n + 1), ("seq", n),
                                ("ctx", n), ("rows", n), ("fill", n), ("src", n), ("update", 2 * n * w)],
                               n, device, pool)
        self.num_replays = 0  # steps run through :meth:`run` (benchmarks and tests read it)

    def num_seqs(self, size: int) -> int:
        """Sequences a graph of ``size`` rows holds: every row could be a one-token chunk, up to the batch cap."""
        return max(1, min(size, self.max_num_seqs))

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per ladder size, largest first so that the smaller ones reuse its memory."""
        self._capture_padded(self.sizes, self._pool, f"mixed-step ({','.join(map(str, self.sizes))} tokens)")

    def _forward(self, size: int) -> torch.Tensor:
        """What a graph runs: gather the batch's block-table rows, then the model. Returns ``[size, D]``."""
        o, n = self._off, self.num_seqs(size)
        torch.index_select(self.rows.table, 0, self._meta[o["rows"]:o["rows"] + n], out=self._block_tables[:n])
        ids, positions, md = self._views(size)
        return self.model(ids, positions, self.kv_caches, md)

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and metadata of a ``size``-row graph: views of the static buffers. The ``*_cpu``
        lists are bounds, not the live values (the Triton backend never reads them)."""
        m, o, n = self._meta, self._off, self.num_seqs(size)
        md = AttentionMetadata(
            num_tokens=size, query_start_loc=m[o["qsl"]:o["qsl"] + n + 1], seq_lens=m[o["seq"]:o["seq"] + n],
            context_lens=m[o["ctx"]:o["ctx"] + n], block_tables=self._block_tables[:n],
            slot_mapping=m[o["slots"]:o["slots"] + size], max_query_len=size, max_seq_len=self.max_model_len,
            num_decodes=0, logits_indices=m[o["logits"]:o["logits"] + size],
            query_start_loc_cpu=[0] * n + [size], seq_lens_cpu=[self.max_model_len] * n,
            context_lens_cpu=[self.max_model_len - 1] * n, separate_decodes=True)
        return m[:size], m[o["pos"]:o["pos"] + size], md

    # ------------------------------------------------------------------ replay
    def padded_size(self, chunks: list[ScheduledChunk]) -> int | None:
        """The graph size a step replays, or None when no graph holds it (more tokens than the ladder's top, or
        more chunks than a step may have)."""
        if not chunks or len(chunks) > self.max_num_seqs:
            return None
        total = sum(c.num_tokens for c in chunks)
        if total > self.max_size:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, total)]

    def run(self, chunks: list[ScheduledChunk], size: int,
            sampled: SampledTokens | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Replay the ``size`` graph (from :meth:`padded_size`) on these chunks. Returns the hidden states of every
        row, ``[size, D]`` (valid until the next replay), the logits rows' indices into them ``[S]`` (each
        sampled chunk's last ``num_logits_rows`` rows, in chunk order) and the number of live token rows.
        Placeholder ids (negative) take their value from ``sampled``."""
        b, o, h, n = len(chunks), self._off, self._host_np, self.num_seqs(size)
        rows, update_index, update_ids = self._assign_rows(chunks)
        ids = h[:size]
        num_logits = fill_packed_layout(
            chunks, n, size, self.block_size, ids=ids, positions=h[o["pos"]:o["pos"] + size],
            slots=h[o["slots"]:o["slots"] + size], query_start_loc=h[o["qsl"]:o["qsl"] + n + 1],
            seq_lens=h[o["seq"]:o["seq"] + n], context_lens=h[o["ctx"]:o["ctx"] + n],
            logits_rows=h[o["logits"]:o["logits"] + size])
        total = int(h[o["qsl"] + b])
        holes = np.flatnonzero(ids[:total] < 0)
        f = len(holes)
        if f:  # placeholders: at most one per chunk, its newest token
            seq_of_row = np.searchsorted(h[o["qsl"] + 1:o["qsl"] + b + 1], holes, side="right")
            h[o["src"]:o["src"] + f] = placeholder_sources([chunks[i].request_id for i in seq_of_row], sampled)
            h[o["fill"]:o["fill"] + f] = holes
            ids[holes] = 0
        h[o["rows"]:o["rows"] + b] = rows
        h[o["rows"] + b:o["rows"] + n] = self.rows.pad_row
        # One copy of everything up to the last region this step uses (the regions of sizes above it go too:
        # they are small, and contiguous is one copy).
        self._upload(o["update"], update_index, update_ids)
        m = self._meta
        if f:  # the previous step's sampled ids, gathered into the static ids buffer
            fill = sampled.token_ids.index_select(0, m[o["src"]:o["src"] + f]).to(torch.int32)
            m[:size].index_copy_(0, m[o["fill"]:o["fill"] + f].long(), fill)
        self.num_replays += 1
        return self._replay(size), m[o["logits"]:o["logits"] + num_logits], total

    def _write_all_padding(self) -> None:
        """Host values of an all-padding step of the largest size (what the capture's warm-up runs on)."""
        h, o, t, n = self._host_np, self._off, self.max_size, self.num_seqs(self.max_size)
        h[:] = 0
        h[o["slots"]:o["slots"] + t] = -1
        h[o["rows"]:o["rows"] + n] = self.rows.pad_row
