"""Regenerate the Python code of every ``.proto`` file under ``proto/pdserve/v1``.

    python -m pdserve.proto.regen            # rewrite the generated files
    python -m pdserve.proto.regen --check    # exit 1 if any generated file is stale (CI)

Uses grpcio-tools' bundled protoc. Imports between generated modules are made relative (``from . import x_pb2``)
so the package works wherever it is mounted (``pdserve.proto.pdserve.v1`` when installed or from the source tree).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "pdserve" / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
_ABS_IMPORT = re.compile(r"^from pdserve\.v1 import (\w+_pb2)", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> dict[str, str]:
    """Compile every proto into ``out_dir``; returns {generated file name: text}."""
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    result = {}
    for path in sorted((out_dir / "pdserve" / "v1").iterdir()):
        if path.name.endswith(SUFFIXES):
            result[path.name] = _ABS_IMPORT.sub(r"from . import \1", path.read_text())
    return result


# Lines that name the generating tools' versions: a newer grpcio-tools changes them, not the contract.
_VERSION_LINES = [re.compile(p, re.MULTILINE) for p in (
    r"^# Protobuf Python Version: .*$",
    r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,",
    r"^GRPC_GENERATED_VERSION = .*$",
)]


def _normalized(text: str) -> str:
    for pattern in _VERSION_LINES:
        text = pattern.sub("<version>", text)
    return text


def stale_files() -> list[str]:
    """Generated files that differ from what the protos produce now (or are missing), tool versions aside."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [name for name, text in fresh.items()
            if not (PACKAGE_DIR / name).is_file()
            or _normalized((PACKAGE_DIR / name).read_text()) != _normalized(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: proto/pdserve/v1/{name}")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (PACKAGE_DIR / name).write_text(text)
            print(f"wrote proto/pdserve/v1/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
