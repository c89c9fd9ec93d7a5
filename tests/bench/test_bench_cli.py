"""``pdserve bench``: every benchmark kind is registered from the one ``bench/`` package and parses its flags."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cli.bench import KINDS
from pdserve.cli.main import build_parser, main


def test_every_kind_lives_in_the_bench_package() -> None:
    assert {module for module, _ in KINDS.values()} == {f"pdserve.bench.{m}" for m in (
        "throughput", "latency", "decode_profile", "serve", "kv_transfer", "kernels", "structured", "tune")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_a_working_subcommand(kind: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", kind, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: pdserve bench {kind} ")


def test_a_kind_whose_optional_dependency_is_missing_says_so(monkeypatch, capsys) -> None:
    import pdserve.cli.bench as bench_cli

    monkeypatch.setitem(KINDS, "needs-x", ("pdserve_test_missing_dependency_x", "a kind that cannot import"))
    assert main(["bench", "needs-x"]) == 2
    err = capsys.readouterr().err
    assert "pdserve bench needs-x: unavailable, the Python package 'pdserve_test_missing_dependency_x'" in err
    monkeypatch.setitem(KINDS, "broken", ("pdserve.bench.no_such_module", "a module of ours that is missing"))
    with pytest.raises(ModuleNotFoundError):
        bench_cli.add_arguments(argparse.ArgumentParser())
