"""``pdserve sim-engine``: a pod that speaks the real protocols but computes no model.

    pdserve sim-engine --profile llama-3.1-8b_h100 --role decode --port 8200 --grpc-port 50062 \\
        [--kv-events-endpoint tcp://*:5558] [--kv-fault-fail-rate 0.05] [--kv-fault-latency 0.2]

It is ``pdserve serve`` / ``prefill`` / ``decode`` — the same HTTP app (OpenAI API, ``/metrics`` with the real metric
names), gRPC server (``Generation``, plus ``Prefill`` or ``Decode`` for those roles), KV events and load reports —
with the engine core replaced by :class:`~pdserve.sim.core.SimEngineCore`: the real scheduler and KV cache
manager, steps that take the time the cost profile says, deterministic tokens. ``--model`` only picks the
tokenizer (and the KV shapes handles describe); the timing and the KV pool size come from ``--profile``. Between
simulated pods KV moves through the ``sim`` connector: a decode pod given a prefill pod's handle waits for the
modelled transfer, and the ``--kv-fault-*`` flags inject latency, a bandwidth cap, failed and corrupted loads.
"""

from __future__ import annotations

import argparse
import functools
import logging

from pdserve.sim.cost_model import available_profiles

logger = logging.getLogger("pdserve.sim_engine")

ROLES = ("both", "prefill", "decode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.services.api.cli import add_server_arguments

    from pdserve.cli.engine_args import add_engine_arguments

    add_server_arguments(parser)
    add_engine_arguments(parser)
    g = parser.add_argument_group("simulation")
    g.add_argument("--profile", default="llama-3.1-8b_h100",
                   help=f"cost profile: {', '.join(available_profiles())}, or a JSON file (see sim/profiles/)")
    g.add_argument("--role", default="both", choices=ROLES,
                   help="both: monolithic; prefill: returns a KV handle; decode: loads the KV a handle names")
    add_fault_arguments(g)


def add_fault_arguments(g: argparse._ArgumentGroup) -> None:
    """KV load fault flags (shared with ``pdserve sim``)."""
    g.add_argument("--kv-fault-latency", type=float, default=0.0, help="seconds added to every KV load")
    g.add_argument("--kv-bandwidth-gbps", type=float, default=63.4,
                   help="KV transfer rate in GB/s (default: CUDA IPC as measured in docs/performance.md)")
    g.add_argument("--kv-fault-fail-rate", type=float, default=0.0, help="probability that a KV load fails")
    g.add_argument("--kv-fault-corrupt-rate", type=float, default=0.0,
                   help="probability that a loaded payload fails its checksum")
    g.add_argument("--kv-fault-seed", type=int, default=0, help="seed of the fault draws")
    g.add_argument("--kv-load-failure-policy", default="recompute", choices=["recompute", "fail"],
                   help="after a failed load: compute the prompt locally, or fail the request")


def faults_from_args(args: argparse.Namespace):  # -> KVFaults
    from pdserve.sim.kv import KVFaults

    return KVFaults(latency_s=args.kv_fault_latency, bandwidth_gbps=args.kv_bandwidth_gbps,
                    fail_rate=args.kv_fault_fail_rate, corrupt_rate=args.kv_fault_corrupt_rate,
                    seed=args.kv_fault_seed)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from pdserve.services.api.cli import serve
    from pdserve.sim.core import make_sim_core
    from pdserve.sim.cost_model import load_profile

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        profile = load_profile(args.profile)
        faults = faults_from_args(args)
        if args.role != "decode" and (faults != type(faults)() or args.kv_load_failure_policy != "recompute"):
            raise ValueError("--kv-fault-*, --kv-bandwidth-gbps and --kv-load-failure-policy act on KV loads, "
                             "which only a decode pod does (--role decode)")
        if args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1:
            raise ValueError("a simulated engine models one GPU: profile a multi-GPU setup as its own profile")
    except ValueError as exc:
        logger.error("bad simulation configuration: %s", exc)
        return 2
    factory = functools.partial(make_sim_core, profile=args.profile, faults=faults,
                                load_failure_policy=args.kv_load_failure_policy)
    overrides: dict = {}
    services = []
    if args.role != "both":
        from pdserve.services.prefill.role_server import DEFAULT_GRPC_PORT

        overrides.update(role=args.role, connector="sim")
        if args.grpc_port is None:
            args.grpc_port = DEFAULT_GRPC_PORT
        if args.role == "prefill":
            from pdserve.services.prefill.server import add_prefill_service as add_service
        else:
            from pdserve.services.decode.server import add_decode_service as add_service
        services.append(add_service)
    logger.info("simulating %s on %s (profile %s)", profile.model, profile.gpu, profile.name)
    try:
        return asyncio.run(serve(args, engine_overrides=overrides, grpc_services=services,
                                 core_factory=factory))
    except KeyboardInterrupt:
        return 130
