"""``pdserve decode``: a decode pod, the engine in the ``decode`` role behind the ``Decode`` gRPC stream (and the
OpenAI HTTP API, for requests that need no remote prefill).

    pdserve decode --model smollm2-135m-instruct --kv-connector shared-fs --kv-path /dev/shm/pdserve-kv \\
        --port 8200 --grpc-port 50062 [--kv-load-failure-policy fail]
"""

from __future__ import annotations

import argparse

from pdserve.services.prefill.role_server import add_role_arguments, run_role


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_role_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pdserve.services.decode.server import add_decode_service

    return run_role(args, "decode", add_decode_service)
