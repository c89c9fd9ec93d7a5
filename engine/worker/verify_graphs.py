"""CUDA graphs of speculative verify steps: ``N`` sequences of up to ``k + 1`` query tokens, over a batch ladder.

A verify step scores each request's ``[last token, d_1 .. d_k]`` in one forward pass. At batch 1 of an 8B model
that pass costs about what a one-token decode step does (both read every weight once), but launched eagerly it
also pays ~10 Python-launched kernels per layer, which at small batch take longer than the kernels run; so it is
captured like the decode step (:mod:`pdserve.engine.worker.cuda_graphs`), once per batch size ``N`` of the decode
ladder up to a bound (:func:`~pdserve.engine.worker.verify_layout.verify_capture_sizes`), each graph with
``N * (k + 1)`` token rows. The step's layout in the static buffers (varlen packing, padding rows that write no KV,
zero-token padding sequences) is :mod:`pdserve.engine.worker.verify_layout`'s.

The graphs share the decode runner's block-table rows (a request keeps its row whether its step is a decode or
a verify step) and its memory pool (the graphs never run at once, and each replay's output is consumed before the
next replay). The attention kernel's grid follows from ``N * (k + 1)`` rows and ``N`` sequences, and its tile shape
and split-KV factor from the ``max_query_len = k + 1`` and ``max_seq_len = max_model_len`` hints, all fixed at
capture; ``query_start_loc`` is data, so any mix of draft counts replays the same graph.

The runner returns the hidden states of all ``N * (k + 1)`` rows and the indices of the logits rows: the model
runner computes logits over every row and then picks, so the LM head's matmul has the same shape at every step of
a graph size (the same rounding whatever the drafts; at the small batches speculation runs at, the extra rows
cost nothing in a weight-bound matmul).
"""

from __future__ import annotations


import torch

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.worker.attention import AttentionMetadata
from pdserve.engine.worker.block_table_rows import BlockTableRows
from pdserve.engine.worker.cuda_graphs import GraphReplayer
from pdserve.engine.worker.verify_layout import fill_verify_layout, verify_graph_size


class VerifyGraphRunner(GraphReplayer):
    """Captures ``model``'s forward for verify steps and replays it; :meth:`run` returns hidden states.

    Args:
        model: the causal LM; ``model(input_ids, positions, kv_caches, metadata) -> [T, D]``.
        kv_caches: the per-layer KV caches (fixed addresses).
        rows: the decode runner's device block-table rows (shared: see the module docstring).
        sizes: the batch ladder (:func:`~pdserve.engine.worker.verify_layout.verify_capture_sizes`).
        num_speculative_tokens: ``k``; every graph has ``k + 1`` token rows per sequence.
        max_model_len, block_size, num_blocks: as for the decode runner.
        pool: a CUDA graph memory pool to share (the decode runner's), or None for a new one.

    On a CPU device nothing is captured and :meth:`run` runs the model eagerly on the same padded static buffers
    (tests use that, with Triton's interpreter, to check the layout against an eager step).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], rows: BlockTableRows, *,
                 sizes: list[int], num_speculative_tokens: int, max_model_len: int, block_size: int,
                 num_blocks: int, device: torch.device, pool=None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.rows = rows
        self.sizes = sizes
        self.max_size = sizes[-1]
        self.q = num_speculative_tokens + 1  # Q: token rows per sequence
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        n, t, w = self.max_size, self.max_size * self.q, rows.width
        # int32 regions, sent in one copy: [ids T | positions T | slots T | logits rows T | query_start_loc N+1 |
        # seq_lens N | context_lens N | table rows N | update index N*W | update ids N*W]
        self._allocate_regions([("ids", t), ("pos", t), ("slots", t), ("logits", t), ("qsl", n + 1), ("seq", n),
                                ("ctx", n), ("rows", n), ("update", 2 * n * w)], n, device, pool)
        self.num_replays = 0  # verify steps run through :meth:`run` (benchmarks and tests read it)

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per ladder size, largest first so that the smaller ones reuse its memory."""
        self._capture_padded(self.sizes, self._pool,
                             f"verify (batch {','.join(map(str, self.sizes))} x {self.q} tokens)")

    def _forward(self, size: int) -> torch.Tensor:
        """What a graph runs: gather the batch's block-table rows, then the model. Returns ``[size * Q, D]``."""
        o = self._off
        torch.index_select(self.rows.table, 0, self._meta[o["rows"]:o["rows"] + size],
                           out=self._block_tables[:size])
        ids, positions, md = self._views(size)
        return self.model(ids, positions, self.kv_caches, md)

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and metadata of a ``size``-sequence graph: views of the static buffers. The
        ``*_cpu`` lists are bounds, not the live values (the Triton backend never reads them)."""
        m, o, t = self._meta, self._off, size * self.q
        md = AttentionMetadata(
            num_tokens=t, query_start_loc=m[o["qsl"]:o["qsl"] + size + 1], seq_lens=m[o["seq"]:o["seq"] + size],
            context_lens=m[o["ctx"]:o["ctx"] + size], block_tables=self._block_tables[:size],
            slot_mapping=m[o["slots"]:o["slots"] + t], max_query_len=self.q, max_seq_len=self.max_model_len,
            num_decodes=0, logits_indices=m[o["logits"]:o["logits"] + t],
            query_start_loc_cpu=list(range(0, t + 1, self.q)), seq_lens_cpu=[self.max_model_len] * size,
            context_lens_cpu=[self.max_model_len - self.q] * size)
        return m[:t], m[o["pos"]:o["pos"] + t], md

    # ------------------------------------------------------------------ replay
    def padded_size(self, chunks: list[ScheduledChunk]) -> int | None:
        """The graph size a step replays, or None when it is not a verify step a graph covers."""
        return verify_graph_size(chunks, self.sizes, self.q)

    def run(self, chunks: list[ScheduledChunk], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the ``size`` graph (from :meth:`padded_size`) on these chunks. Returns the hidden states of every
        row, ``[size * Q, D]`` (valid until the next replay), and the logits rows' indices into them ``[S]``
        (int32; each sampled chunk's last ``num_logits_rows`` rows, in chunk order)."""
        b, o, h = len(chunks), self._off, self._host_np
        rows, update_index, update_ids = self._assign_rows(chunks)
        t = size * self.q
        num_logits = fill_verify_layout(
            chunks, size, self.q, self.block_size, ids=h[:t], positions=h[o["pos"]:o["pos"] + t],
            slots=h[o["slots"]:o["slots"] + t], query_start_loc=h[o["qsl"]:o["qsl"] + size + 1],
            seq_lens=h[o["seq"]:o["seq"] + size], context_lens=h[o["ctx"]:o["ctx"] + size],
            logits_rows=h[o["logits"]:o["logits"] + t])
        h[o["rows"]:o["rows"] + b] = rows
        h[o["rows"] + b:o["rows"] + size] = self.rows.pad_row
        # One copy of everything up to the last region this step uses (the regions of sizes above it go too:
        # they are small, and contiguous is one copy).
        self._upload(o["update"], update_index, update_ids)
        logits_rows = self._meta[o["logits"]:o["logits"] + num_logits]
        self.num_replays += 1
        return self._replay(size), logits_rows

    def _write_all_padding(self) -> None:
        """Host values of an all-padding step of the largest size (what the capture's warm-up runs on)."""
        h, o, n, t = self._host_np, self._off, self.max_size, self.max_size * self.q
        h[:] = 0
        h[o["slots"]:o["slots"] + t] = -1
        h[o["rows"]:o["rows"] + n] = self.rows.pad_row
