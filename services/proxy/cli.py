"""``pdserve proxy`` (or ``python -m pdserve.services.proxy.cli``): the Generation gRPC API in front of one prefill
pod and one decode pod.

    pdserve proxy --prefill 127.0.0.1:50061 --decode 127.0.0.1:50062 --grpc-port 50051
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("pdserve.proxy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", required=True, help="host:port of the prefill pod's gRPC server")
    parser.add_argument("--decode", required=True, help="host:port of the decode pod's gRPC server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each call to a pod (seconds)")
    parser.add_argument("--api-key", default=None,
                        help="require 'authorization: Bearer KEY' of callers (default: $PDSERVE_API_KEY; a flag "
                             "shows up in `ps`). With a cluster secret the proxy signs its calls to the pods, so "
                             "it must check its own callers")


def run(args: argparse.Namespace) -> int:
    import asyncio

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0


async def serve(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    import grpc

    from pdserve.engine.security import load_cluster_secret
    from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
    from pdserve.services.api.cli import api_key_from
    from pdserve.services.api.grpc_guard import EdgeInterceptor
    from pdserve.services.api.settings import ServerSettings
    from pdserve.services.proxy.proxy import DisaggProxy, ProxyGenerationServicer

    secret = load_cluster_secret()
    api_key = api_key_from(args)
    if secret is not None and not api_key:
        raise SystemExit("pdserve proxy: with a cluster secret the proxy signs calls to the pods; set "
                         "PDSERVE_API_KEY (or --api-key) so that it does not sign them for anyone")
    proxy = DisaggProxy(args.prefill, args.decode, args.timeout, cluster_secret=secret)
    # Callers need the API key (or a call token under the same secret), checked before any method runs.
    edge = EdgeInterceptor(ServerSettings(served_model_names=("proxy",), api_key=api_key, cluster_secret=secret))
    server = grpc.aio.server(interceptors=[edge], maximum_concurrent_rpcs=edge.settings.max_concurrent_rpcs)
    pb_grpc.add_GenerationServicer_to_server(ProxyGenerationServicer(proxy), server)
    port = server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    await server.start()
    logger.info("proxy on %s:%d -> prefill %s, decode %s", args.host, port, args.prefill, args.decode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)
    await proxy.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="pdserve proxy", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
