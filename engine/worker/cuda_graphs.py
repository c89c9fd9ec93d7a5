"""CUDA graphs of the pure-decode step, captured at a ladder of batch sizes and replayed with new metadata.

A decode step launches about ten kernels per layer whatever the batch holds, and at small batch launching
them from Python takes longer than running them. So the model's forward is captured once per batch size of a
ladder (1, 2, 4, 8, then every 16 up to ``max_num_seqs``) and a step of ``B`` decodes replays the smallest
graph of ``N >= B`` rows, the live rows first and padding after::

    row            0 .. B-1 (live decodes)             B .. N-1 (padding)
    input_ids      each request's newest token          0
    positions      seq_len - 1                          0
    slot_mapping   where that token's K/V goes          -1: the fused rotary + KV write skips the row
    seq_lens       context incl. the new token          1: attends to one key of its first block
    table row      the request's row (see below)        the all-zero row

Every graph reads the same static buffers, sliced to its size. A step fills them in one pinned host buffer and
sends it with one non-blocking copy. Block tables do not travel whole: each running request keeps a row of a
device table (:mod:`pdserve.engine.worker.block_table_rows`), a step sends only the block ids a row lacks
(scattered with one device op), and the graph itself starts by gathering its rows into the ``[N, W]`` table
the attention kernel reads.

With asynchronous scheduling a row's input id may be a placeholder for the token the previous step is still
sampling. It is filled outside the graph, after the copy and before the replay: the static ids buffer gets the
previous step's sampled ids by a device gather, so the graph itself never changes.

The attention kernel's launch grid and split-KV factor follow from the batch size, ``max_query_len=1`` and
``max_seq_len=max_model_len`` (see :mod:`pdserve.kernels.attention`), all fixed at capture, so a replay is
valid for any context up to ``max_model_len``. Only the Triton backend is capturable: the torch backend
sizes its work from host-side lengths.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.worker.attention import AttentionMetadata
from pdserve.engine.worker.block_table_rows import BlockTableRows
from pdserve.engine.worker.input_batch import SampledTokens, placeholder_sources

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512  # beyond this a decode step is long enough that launch overhead no longer matters


def capture_sizes(max_num_seqs: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """The batch-size ladder: 1, 2, 4, 8, every multiple of 16 below the top, and the top itself
    (``max_num_seqs``, capped at :data:`MAX_CAPTURE_SIZE`). Padding a batch up costs little: decode reads
    the weights once whatever the row count, and a padding row attends to a single key.

    ``sizes`` (``--cuda-graph-sizes``) replaces the ladder; those above the cap are dropped (no batch gets
    that big), and a decode batch above the largest one left runs eagerly."""
    top = max(1, min(max_num_seqs, MAX_CAPTURE_SIZE))
    if sizes is not None:
        return sorted({s for s in sizes if s <= top}) or [top]
    return sorted({s for s in (1, 2, 4, 8) if s < top} | set(range(16, top, 16)) | {top})


def capture_ladder(sizes: list[int], forward, pool) -> tuple[dict[int, torch.cuda.CUDAGraph],
                                                             dict[int, torch.Tensor]]:
    """One CUDA graph of ``forward(size)`` per size, the largest first (the smaller ones then fit in the memory
    the pool already holds), each after an eager warm-up run of the same size: it compiles the Triton kernels
    for the shape and lets cuBLAS pick its kernels and set up its workspace, none of which may happen during a
    capture. Returns the graphs and their outputs (tensors in ``pool``) by size."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    for size in sorted(sizes, reverse=True):
        forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs


class GraphReplayer:
    """What the decode, verify and mixed-step graph runners share around a replay. A subclass has ``rows``
    (:class:`BlockTableRows`), ``num_blocks``, the static int32 metadata ``_meta`` (device) with its pinned host
    copy ``_host`` / ``_host_np``, the ``_copied`` event (None on CPU), ``use_graphs``, ``_graphs`` and
    ``_outputs`` by size, and ``_forward(size)``. A step: :meth:`_assign_rows`, fill the host buffer,
    :meth:`_upload`, then :meth:`_replay` (the decode runner fills placeholders between the last two)."""

    rows: BlockTableRows
    num_blocks: int
    use_graphs: bool
    _meta: torch.Tensor
    _host: torch.Tensor
    _host_np: np.ndarray
    _copied: torch.cuda.Event | None
    _graphs: dict[int, torch.cuda.CUDAGraph]
    _outputs: dict[int, torch.Tensor]
    _pool: object
    pool_bytes: int

    def _forward(self, size: int) -> torch.Tensor:
        """What a graph of ``size`` runs on the static buffers (every runner defines it)."""
        raise NotImplementedError

    def _allocate_regions(self, regions: list[tuple[str, int]], num_seqs: int, device: torch.device,
                          pool: object) -> None:
        """The verify and mixed-step runners' static buffers: ``regions`` (name, length) laid end to end in one
        int32 metadata buffer (``_off``: name -> start), on ``device`` with a pinned host copy so that one copy
        sends them all; the ``[num_seqs, W]`` block table the graphs gather their rows into; empty graphs and
        outputs by size; ``pool`` (a CUDA graph memory pool to share, or None for a new one at capture)."""
        self._off: dict[str, int] = {}
        start = 0
        for name, length in regions:
            self._off[name] = start
            start += length
        self._meta_len = start
        self._meta = torch.zeros(self._meta_len, dtype=torch.int32, device=device)
        self.use_graphs = device.type == "cuda"
        self._host = torch.zeros(self._meta_len, dtype=torch.int32, pin_memory=self.use_graphs)
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if self.use_graphs else None  # the pinned buffer is free again
        self._block_tables = torch.zeros(num_seqs, self.rows.width, dtype=torch.int32, device=device)  # [N, W]
        self._graphs = {}
        self._outputs = {}  # size -> the graph's hidden states, in the graph pool
        self._pool = pool
        self.pool_bytes = 0  # memory the capture added to the CUDA caching allocator (reserved)

    def _assign_rows(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int], list[int]]:
        """Wait until the pinned buffer is free again (the previous step's copy out of it finished), then give
        each chunk its block-table row. Returns the rows and the (flat index, block id) updates the rows lack."""
        if self._copied is not None:
            self._copied.synchronize()
        rows: list[int] = []
        update_index: list[int] = []
        update_ids: list[int] = []
        self.rows.assign(chunks, rows, update_index, update_ids)
        if update_ids and (max(update_ids) >= self.num_blocks or min(update_ids) < 0):
            raise ValueError(f"a block id is outside the KV cache's {self.num_blocks} blocks")
        return rows, update_index, update_ids

    def _upload(self, update_start: int, update_index: list[int], update_ids: list[int]) -> None:
        """Write the block-table updates at ``update_start`` of the host buffer, send everything up to their end
        in one non-blocking copy, and scatter them into the device rows (before the graph gathers its rows)."""
        h, k = self._host_np, len(update_ids)
        u, end = update_start, update_start + 2 * len(update_ids)
        if k:
            h[u:u + k] = update_index
            h[u + k:end] = update_ids
        self._meta[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if k:
            self.rows.table.view(-1)[self._meta[u:u + k]] = self._meta[u + k:end]

    def _capture_padded(self, sizes: list[int], pool, what: str) -> None:
        """The verify and mixed-step runners' capture: write an all-padding step of the largest size
        (``_write_all_padding``) into the static buffers, then capture one graph per size into ``pool`` (a new
        pool if None; kept in ``_pool``), recording how much memory the capture added in ``pool_bytes``. On CPU
        only the buffers are written. ``what`` names the graphs in the log line."""
        start = time.perf_counter()
        self._write_all_padding()
        self._meta.copy_(self._host)
        if not self.use_graphs:
            return
        reserved = torch.cuda.memory_reserved()
        self._pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        # Every sequence is padding (zero tokens) and every slot -1, so the warm-up runs (which also compile the
        # kernels' variants for these shapes) and the captures read and write nothing of the KV cache.
        self._graphs, self._outputs = capture_ladder(sizes, self._forward, self._pool)
        self.pool_bytes = torch.cuda.memory_reserved() - reserved
        logger.info("captured %d %s CUDA graphs in %.1fs, %.0f MiB more reserved", len(sizes), what,
                    time.perf_counter() - start, self.pool_bytes / 2**20)

    def _write_all_padding(self) -> None:
        """Host values of an all-padding step of the largest size (defined by the runners that capture through
        :meth:`_capture_padded`: verify and mixed-step; the decode runner captures its own way)."""
        raise NotImplementedError

    def _replay(self, size: int) -> torch.Tensor:
        """Replay the ``size`` graph and return its output (valid until the next replay); on CPU run the same
        forward eagerly on the static buffers."""
        if not self.use_graphs:
            return self._forward(size)
        self._graphs[size].replay()
        return self._outputs[size]


class DecodeGraphRunner(GraphReplayer):
    """Captures ``model``'s forward for decode batches and replays it; :meth:`run` returns hidden states.

    Args:
        model: the causal LM; ``model(input_ids, positions, kv_caches, metadata) -> [T, D]``.
        kv_caches: the per-layer KV cache tensors the graphs write into and read from (fixed addresses).
        max_num_seqs: the largest batch the scheduler builds; the ladder tops out there.
        max_model_len: the longest sequence; sizes the block-table width and fixes the split-KV factor.
        block_size: tokens per KV block.
        num_blocks: blocks in the cache (block ids are checked against it).

    On a CPU device nothing is captured and :meth:`run` runs the model eagerly on the same padded static
    buffers; tests use that (with Triton's interpreter) to check the padding and metadata layout.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *, max_num_seqs: int,
                 max_model_len: int, block_size: int, num_blocks: int, device: torch.device,
                 sizes: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs, sizes)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.width = -(-max_model_len // block_size)  # W: block-table columns
        n = self.max_size
        # [ids N | positions N | slots N | seq_lens N | table rows N | fill rows N | fill sources N |
        #  update index K | update ids K], int32 throughout (embedding, rotary and the KV write take int32
        # indices) so one copy moves all of it; a step updates at most every block id of its N tables. "fill":
        # rows whose id is a placeholder, and their rows in the previous step's sampled ids.
        self._meta_len = 7 * n + 2 * n * self.width
        self._meta = torch.zeros(self._meta_len, dtype=torch.int32, device=device)
        self.use_graphs = device.type == "cuda"
        self._host = torch.zeros(self._meta_len, dtype=torch.int32, pin_memory=self.use_graphs)
        self._host_np = self._host.numpy()
        # The pinned buffer may be refilled only once the previous copy out of it has finished.
        self._copied = torch.cuda.Event() if self.use_graphs else None
        # Rows outlive a step: twice the batch leaves room for requests that left without being reported.
        self.rows = BlockTableRows(2 * n, self.width, device)
        self._block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=device)  # [N, W]
        self._query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query per row
        self._logits_rows = torch.arange(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # size -> [size, D] hidden states, in the graph pool
        self._pool = None

    @property
    def pool(self):
        """The graphs' memory pool (after :meth:`capture`; None on CPU): the verify graphs share it."""
        return self._pool

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per ladder size, largest first so that the smaller ones reuse its memory."""
        start = time.perf_counter()
        n = self.max_size
        self._host_np[:] = 0
        self._write_padding(0, n)
        self._meta.copy_(self._host)
        if not self.use_graphs:
            return
        self._pool = torch.cuda.graph_pool_handle()
        # Every row is padding, so the warm-up runs and the captures write nothing to the KV cache.
        self._graphs, self._outputs = capture_ladder(self.sizes, self._forward, self._pool)
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1fs", len(self.sizes),
                    ",".join(map(str, self.sizes)), time.perf_counter() - start)

    def _forward(self, size: int) -> torch.Tensor:
        """What a graph runs: gather the batch's block-table rows, then the model. Returns ``[size, D]``."""
        n = self.max_size
        torch.index_select(self.rows.table, 0, self._meta[4 * n:4 * n + size], out=self._block_tables[:size])
        ids, positions, md = self._views(size)
        return self.model(ids, positions, self.kv_caches, md)

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids ``[size]``, positions ``[size]`` and the metadata of a ``size``-row graph: views of the
        static buffers. The ``*_cpu`` lists are bounds, not the live values (the Triton backend never reads
        them)."""
        n, m = self.max_size, self._meta
        positions = m[n:n + size]
        md = AttentionMetadata(
            num_tokens=size, query_start_loc=self._query_start_loc[:size + 1], seq_lens=m[3 * n:3 * n + size],
            context_lens=positions, block_tables=self._block_tables[:size], slot_mapping=m[2 * n:2 * n + size],
            max_query_len=1, max_seq_len=self.max_model_len, num_decodes=size,
            logits_indices=self._logits_rows[:size], query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[self.max_model_len] * size, context_lens_cpu=[self.max_model_len - 1] * size)
        return m[:size], positions, md

    # ------------------------------------------------------------------ replay
    def padded_size(self, chunks: list[ScheduledChunk]) -> int | None:
        """The graph size a step replays, or None when it is not a pure-decode step that a graph covers."""
        if not chunks or len(chunks) > self.max_size or any(c.num_tokens != 1 for c in chunks):
            return None
        return self.sizes[bisect.bisect_left(self.sizes, len(chunks))]

    def release(self, *request_id_sets) -> None:
        """Recycle the block-table rows of requests that finished or were preempted (see ``SchedulerOutput``)."""
        for ids in request_id_sets:
            if ids:
                self.rows.release(ids)

    def run(self, chunks: list[ScheduledChunk], size: int, sampled: SampledTokens | None = None) -> torch.Tensor:
        """Replay the ``size`` graph (from :meth:`padded_size`) on these one-token chunks; returns the hidden
        states ``[B, D]`` of the live rows, valid until the next replay. Placeholder ids (negative) take their
        value from ``sampled``."""
        b, n, bs = len(chunks), self.max_size, self.block_size
        rows, update_index, update_ids = self._assign_rows(chunks)
        positions = [c.start_pos for c in chunks]
        try:
            slots = [c.block_ids[p // bs] * bs + p % bs for c, p in zip(chunks, positions)]
        except IndexError:
            raise ValueError("a block table is too short for its sequence") from None
        h = self._host_np
        h[:b] = [c.token_ids[0] for c in chunks]
        holes = np.flatnonzero(h[:b] < 0)
        f = len(holes)
        if f:
            h[5 * n:5 * n + f] = holes
            h[6 * n:6 * n + f] = placeholder_sources([chunks[i].request_id for i in holes], sampled)
        h[n:n + b] = positions
        h[2 * n:2 * n + b] = slots
        np.add(h[n:n + b], 1, out=h[3 * n:3 * n + b])
        h[4 * n:4 * n + b] = rows
        self._write_padding(b, size)
        self._upload(7 * n, update_index, update_ids)  # the update region starts at 7 N
        if f:  # placeholders: the previous step's sampled ids, gathered into the static ids buffer
            m = self._meta
            fill = sampled.token_ids.index_select(0, m[6 * n:6 * n + f]).to(torch.int32)
            m[:n].index_copy_(0, m[5 * n:5 * n + f].long(), fill)
        return self._replay(size)[:b]

    def _write_padding(self, start: int, stop: int) -> None:
        """Host-side values of padding rows ``start .. stop - 1`` (see the module docstring)."""
        h, n = self._host_np, self.max_size
        h[start:stop] = 0
        h[n + start:n + stop] = 0
        h[2 * n + start:2 * n + stop] = -1
        h[3 * n + start:3 * n + stop] = 1
        h[4 * n + start:4 * n + stop] = self.rows.pad_row
