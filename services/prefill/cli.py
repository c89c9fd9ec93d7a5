"""``pdserve prefill``: a prefill pod, the engine in the ``prefill`` role behind the ``Prefill`` gRPC call.

    pdserve prefill --model smollm2-135m-instruct --kv-connector shared-fs --kv-path /dev/shm/pdserve-kv \\
        --port 8100 --grpc-port 50061
"""

from __future__ import annotations

import argparse

from pdserve.services.prefill.role_server import add_role_arguments, run_role


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_role_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pdserve.services.prefill.server import add_prefill_service

    return run_role(args, "prefill", add_prefill_service)
