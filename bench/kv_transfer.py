"""``pdserve bench kv-transfer``: how fast a connector moves a prompt's KV from a prefill to a decode process.

    pdserve bench kv-transfer --connector all --shape llama-3.1-8b --prompt-lens 512,4096 --device cuda

Two processes, the real connector halves, real KV cache tensors of the chosen model shape (random contents, no
weights): the producer process saves a prompt's blocks layer by layer exactly as a prefill forward pass does;
the consumer (this process) admits the decode request and loads them; both sides checksum the blocks to prove
they arrived intact. Per prompt length it reports:

- ``stage_ms``: time the save adds to the prefill step itself (layer-by-layer copies out of the cache)
- ``save_ms``: first layer staged -> every block durable in the store (0 for grpc: blocks stay in the cache)
- ``load_ms``: decode admission -> KV in the decode cache (grpc: the pull, including reading the peer's cache;
  grpc-ipc: locating the blocks and the device-to-device copy out of the peer's GPU cache, GPU only)
- ``added_ms`` = save + load: what moving the KV adds between the first token and the decode pod's next one;
  ``GB/s`` = payload bytes / added time.

``--model`` also times the monolithic prefill of the same prompt length on that model (the engine's forward pass),
so the added time can be read as a fraction of the prefill it follows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
from typing import Any

CONNECTORS = ("shared-fs", "redis", "grpc", "grpc-ipc")
# Benchmark variants -> (connector, options): grpc is timed on each of its transports.
VARIANTS = {"shared-fs": ("shared-fs", {}), "redis": ("redis", {}), "grpc": ("grpc", {"kv_transport": "stream"}),
            "grpc-ipc": ("grpc", {"kv_transport": "ipc"})}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", default="all",
                        help=f"comma-separated, from {', '.join(CONNECTORS)}; or all (grpc-ipc only on a GPU)")
    parser.add_argument("--shape", default="smollm2-135m",
                        help="model shape preset for the KV cache (e.g. llama-3.1-8b, qwen3-8b, smollm2-135m)")
    parser.add_argument("--prompt-lens", default="512,2048", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="transfers per prompt length (the median is kept)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="KV dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both processes)")
    parser.add_argument("--kv-path", default=None, help="shared-fs directory (default: a temp dir in /dev/shm)")
    parser.add_argument("--redis-url", default=None, help="Redis server (default: start a local redis-server)")
    parser.add_argument("--model", default=None, help="also time the monolithic prefill on this model (e.g. the "
                                                      "shape preset with --load-format dummy)")
    parser.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    parser.add_argument("--output", default=None, help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    lens = [int(x) for x in str(args.prompt_lens).split(",") if x.strip()]
    on_gpu = str(args.device).startswith("cuda")
    if args.connector == "all":
        connectors = [c for c in CONNECTORS if on_gpu or c != "grpc-ipc"]
    else:
        connectors = [c.strip() for c in str(args.connector).split(",") if c.strip()]
        unknown = [c for c in connectors if c not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown connector(s) {', '.join(unknown)}; choose from {', '.join(CONNECTORS)}")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    results: dict[str, Any] = {"shape": args.shape, "dtype": dtype, "device": args.device,
                               "block_size": args.block_size, "connectors": {}}
    redis_server = None
    try:
        for name in connectors:
            connector, extra = VARIANTS[name]
            options: dict[str, Any] = {"kv_load_timeout_s": 60.0, **extra}
            if name == "shared-fs":
                base = "/dev/shm" if os.path.isdir("/dev/shm") else None
                options["kv_path"] = args.kv_path or tempfile.mkdtemp(prefix="pdserve-kvbench-", dir=base)
            if name == "redis":
                url = args.redis_url
                if url is None:
                    from pdserve.cli.local_servers import LocalRedis

                    redis_server = redis_server or LocalRedis().start()
                    url = redis_server.url
                options["redis_url"] = url
            rows = bench_connector(connector, options, args.shape, dtype, args.block_size, args.device, lens,
                                   args.repeats)
            results["connectors"][name] = rows
            for row in rows:
                print(f"{name:9s} {row['prompt_len']:6d} tok {row['mbytes']:9.1f} MB  stage {row['stage_ms']:8.2f} ms"
                      f"  save {row['save_ms']:8.2f} ms  load {row['load_ms']:8.2f} ms  added "
                      f"{row['added_ms']:8.2f} ms  {row['gbps']:6.2f} GB/s", flush=True)
    finally:
        if redis_server is not None:
            redis_server.stop()
    if args.model:
        results["prefill_ms"] = time_prefill(args.model, args.load_format, lens, args.device, args.block_size)
        for n, ms in results["prefill_ms"].items():
            best = min(rows_for(results, int(n)), default=None)
            print(f"monolithic prefill of {n} tokens: {ms:.1f} ms; best connector adds "
                  f"{best / ms * 100 if best else float('nan'):.1f} %", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def rows_for(results: dict[str, Any], prompt_len: int) -> list[float]:
    return [r["added_ms"] for rows in results["connectors"].values() for r in rows if r["prompt_len"] == prompt_len]


def bench_connector(name: str, options: dict[str, Any], shape: str, dtype: str, block_size: int, device: str,
                    lens: list[int], repeats: int) -> list[dict[str, Any]]:
    """Run one connector between a producer child process and this process; one result row per prompt length."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    fingerprint = f"kv-bench-{shape}-{os.getpid()}-{time.time_ns()}"
    # One secret per run, shared by both processes (the connectors sign and check calls and blocks with it).
    from pdserve.engine.security import ClusterSecret

    spec = dict(name=name, options=options, shape=shape, dtype=dtype, block_size=block_size, device=device,
                fingerprint=fingerprint, num_blocks=max(lens) // block_size + 2,
                secret=ClusterSecret.generate().to_text())
    proc = ctx.Process(target=_producer_main, args=(child, spec), daemon=True)
    proc.start()
    try:
        consumer = _Side(spec, "decode")

        def transfer(n: int) -> tuple[float, float, float, int]:
            rid = f"bench-{n}-{random.getrandbits(48):012x}"
            prompt = [random.randrange(1, 30000) for _ in range(n)]
            parent.send(("prefill", rid, prompt))
            reply = parent.recv()
            if isinstance(reply, BaseException):
                raise reply
            load_s, digest = consumer.load(rid, prompt, reply["params"])
            if digest != reply["digest"]:
                raise RuntimeError(f"{name}: the loaded KV differs from the saved KV")
            return reply["stage_s"], reply["save_s"], load_s, reply["bytes"]

        transfer(min(lens))  # connection set-up (channels, CUDA IPC mapping) happens once per peer: not timed
        rows = []
        for n in lens:
            samples = [transfer(n) for _ in range(repeats)]
            samples.sort(key=lambda s: s[1] + s[2])
            stage_s, save_s, load_s, nbytes = samples[len(samples) // 2]
            added = save_s + load_s
            rows.append({"prompt_len": n, "mbytes": nbytes / 1e6, "stage_ms": stage_s * 1e3, "save_ms": save_s * 1e3,
                         "load_ms": load_s * 1e3, "added_ms": added * 1e3, "gbps": nbytes / added / 1e9})
        consumer.close()
        parent.send(("stop",))
        return rows
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()


class _Side:
    """One engine's connector pair on KV cache tensors of the benchmark's shape."""

    def __init__(self, spec: dict[str, Any], role: str) -> None:
        import torch

        from pdserve.engine.kv_transfer.base import KVConnectorContext
        from pdserve.engine.kv_transfer.kv_layout import descriptor_for
        from pdserve.engine.kv_transfer.registry import create_connector
        from pdserve.engine.model_loader.presets import preset_config
        from pdserve.engine.security import ClusterSecret

        cfg = preset_config(spec["shape"])
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (2, spec["num_blocks"], spec["block_size"], heads, head_dim)
        dtype = getattr(torch, spec["dtype"])
        device = torch.device(spec["device"])
        gen = torch.Generator(device=device).manual_seed(1)
        self.caches = [torch.randn(shape, generator=gen, device=device).to(dtype) if role == "prefill"
                       else torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        desc = descriptor_for(self.caches, model_fingerprint=spec["fingerprint"], hash_algo="sha256", hash_seed_id=0)
        self.ctx = KVConnectorContext(role=role, descriptor=desc, engine_id=role, options=spec["options"],
                                      cluster_secret=ClusterSecret.from_text(spec["secret"]))
        self.sched, self.worker = create_connector(spec["name"], self.ctx)
        self.worker.register_kv_caches(self.caches)
        self.block_size = spec["block_size"]

    def pump(self) -> Any:
        out = self.worker.get_finished()
        self.sched.update_connector_output(out)
        self.sched.take_released()
        return out

    def save(self, rid: str, prompt: list[int]) -> dict[str, Any]:
        from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
        from pdserve.engine.kv_transfer.kv_layout import synchronize
        from pdserve.engine.request import Request, RequestStatus
        from pdserve.engine.sampling_params import SamplingParams

        req = Request(request_id=rid, prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=1))
        req.status = RequestStatus.RUNNING
        block_ids = list(range(-(-len(prompt) // self.block_size)))
        self.sched.update_state_after_alloc(req, block_ids, 0)
        meta = self.sched.build_connector_meta(SchedulerOutput(chunks=[ScheduledChunk(rid, prompt, 0, block_ids,
                                                                                      True)]))
        num_saves = len(meta.saves)
        t0 = time.perf_counter()
        self.worker.bind_connector_metadata(meta)
        for i, layer in enumerate(self.caches):
            self.worker.save_kv_layer(i, layer)
        self.worker.wait_for_save()
        synchronize(self.caches)
        t_staged = time.perf_counter()
        saved = 0
        while saved < num_saves:
            saved += sum(self.pump().finished_saving.values())
            time.sleep(0.0002)
        t_saved = time.perf_counter()
        req.status = RequestStatus.FINISHED_LENGTH
        _, params = self.sched.request_finished(req, block_ids)
        # As the engine's next step does: the metadata hands the finished transfer to the worker (the grpc
        # connector registers it with its KV server then; the store connectors have nothing to do).
        self.worker.bind_connector_metadata(self.sched.build_connector_meta(SchedulerOutput()))
        bs, n = self.block_size, len(prompt)
        nbytes = sum(self.ctx.descriptor.payload_bytes(min(bs, n - i * bs)) for i in range(len(block_ids)))
        return {"params": params, "stage_s": t_staged - t0, "save_s": (t_saved - t0) if num_saves else 0.0,
                "bytes": nbytes, "digest": self.digest(block_ids, len(prompt))}

    def load(self, rid: str, prompt: list[int], params: dict[str, Any]) -> tuple[float, str]:
        from pdserve.engine.core.sched_output import SchedulerOutput
        from pdserve.engine.request import Request
        from pdserve.engine.sampling_params import SamplingParams

        req = Request(request_id=rid, prompt_token_ids=prompt + [1], sampling_params=SamplingParams(max_tokens=8))
        req.kv_transfer_params = params
        block_ids = list(range(-(-len(prompt) // self.block_size)))
        t0 = time.perf_counter()
        n = self.sched.get_num_new_matched_tokens(req, 0)
        while n is None:
            time.sleep(0.0005)
            n = self.sched.get_num_new_matched_tokens(req, 0)
        if n != len(prompt):
            raise RuntimeError(f"only {n} of {len(prompt)} tokens are loadable; failures: "
                               f"{self.sched.stats.snapshot().failures}")
        self.sched.update_state_after_alloc(req, block_ids, n)
        self.worker.bind_connector_metadata(self.sched.build_connector_meta(SchedulerOutput()))
        self.worker.start_load_kv()
        while True:
            out = self.pump()
            if out.failed_loading:
                raise RuntimeError(f"load failed: {out.failed_loading}")
            if rid in out.finished_loading:
                break
            time.sleep(0.0002)
        return time.perf_counter() - t0, self.digest(block_ids, len(prompt))

    def digest(self, block_ids: list[int], num_tokens: int) -> str:
        import torch

        h = hashlib.sha256()
        for i, bid in enumerate(block_ids):
            n = min(self.block_size, num_tokens - i * self.block_size)
            for layer in self.caches:
                h.update(layer[:, bid, :n].contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def close(self) -> None:
        self.worker.shutdown()


def _producer_main(conn: Any, spec: dict[str, Any]) -> None:
    """The prefill process: saves a prompt's blocks on request, keeps serving (grpc) until told to stop."""
    side = _Side(spec, "prefill")
    try:
        while True:
            if not conn.poll(0.001):
                side.pump()  # grpc: acknowledgements free held blocks
                continue
            msg = conn.recv()
            if msg[0] == "stop":
                return
            try:
                conn.send(side.save(msg[1], msg[2]))
            except Exception as exc:
                conn.send(RuntimeError(f"producer failed: {type(exc).__name__}: {exc}"))
    finally:
        side.close()


def time_prefill(model: str, load_format: str, lens: list[int], device: str, block_size: int) -> dict[str, float]:
    """Median time of one monolithic prefill step per prompt length on ``model`` (ms)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
    from pdserve.engine.kv_transfer.kv_layout import synchronize
    from pdserve.engine.worker.model_runner import ModelRunner

    longest = max(lens)
    config = EngineConfig.create(model, load_format=load_format, device=device, block_size=block_size,
                                 max_num_batched_tokens=max(longest, 2048), max_model_len=None,
                                 num_blocks=longest // block_size + 2)
    runner = ModelRunner(config)
    out: dict[str, float] = {}
    for n in lens:
        chunk = ScheduledChunk("p", [random.randrange(1, 1000) for _ in range(n)], 0,
                               list(range(-(-n // block_size))), True)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            runner.execute_model(SchedulerOutput(chunks=[chunk]))
            synchronize(runner.kv_caches)
            times.append(time.perf_counter() - t0)
        out[str(n)] = sorted(times)[1] * 1e3
    return out


if __name__ == "__main__":
    import sys

    _parser = argparse.ArgumentParser(prog="pdserve bench kv-transfer", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
