"""Parallel sizes: tensor and pipeline sizes above 1 are accepted by every engine command, data parallelism by
``pdserve serve`` (issue 15), and a size that is not a positive integer is refused by the config and at parse time
(issue 12, item 5)."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cli.main import build_parser
from pdserve.engine.config import EngineConfig, ParallelConfig

FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
FLAGS = ("--tensor-parallel-size", "--pipeline-parallel-size")


@pytest.mark.parametrize("name", FIELDS)
def test_parallel_config_sizes(name: str) -> None:
    assert getattr(ParallelConfig(**{name: 1}), name) == 1
    assert getattr(ParallelConfig(**{name: 2}), name) == 2
    for bad in (0, -1, 1.0, True, "1"):
        with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got "):
            ParallelConfig(**{name: bad})


def test_engine_config_refuses_before_resolving_the_model() -> None:
    # A model name that does not exist: the parallel size is what fails, before any model is looked up.
    with pytest.raises(ValueError, match="^data_parallel_size must be a positive integer, got 0"):
        EngineConfig.create("no-such-model", data_parallel_size=0)


def test_serve_takes_data_parallel_size(capsys) -> None:
    serve = _parsers_with_flags()["serve"]
    assert serve.parse_args(["--data-parallel-size", "2"]).data_parallel_size == 2
    with pytest.raises(SystemExit):
        serve.parse_args(["--data-parallel-size", "0"])
    assert "data_parallel_size must be a positive integer, got 0" in capsys.readouterr().err
    # Only the server runs several engine cores: the other engine commands have no such flag.
    assert "--data-parallel-size" not in _parsers_with_flags()["generate"]._option_string_actions


def _parsers_with_flags() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command parser of ``pdserve`` that has the parallel flags, by command path."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(path: str, parser: argparse.ArgumentParser) -> None:
        if all(flag in parser._option_string_actions for flag in FLAGS):
            found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{path} {name}".strip(), sub)

    walk("", build_parser())
    return found


def test_every_engine_command_has_the_flags() -> None:
    assert {"generate", "serve", "prefill", "decode", "bench throughput", "bench latency"} <= set(_parsers_with_flags())


@pytest.mark.parametrize("command", sorted(_parsers_with_flags()))
@pytest.mark.parametrize("flag", FLAGS)
def test_every_cli_takes_positive_sizes_at_parse_time(command: str, flag: str, capsys) -> None:
    parser = _parsers_with_flags()[command]
    required = ["--prompt", "hi"] if command == "generate" else []  # the only other required flag
    name = flag[2:].replace("-", "_")
    assert getattr(parser.parse_args([*required, flag, "1"]), name) == 1
    assert getattr(parser.parse_args([*required, flag, "2"]), name) == 2
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*required, flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: {name} must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([*required, flag, "two"])
    assert f"argument {flag}: invalid int value: 'two'" in capsys.readouterr().err
