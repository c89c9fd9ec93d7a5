"""The offline benchmarks' ShareGPT workload reads files through the serving benchmark's reader (one format)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pdserve.bench.datasets import sharegpt_dataset
from pdserve.bench.workload import sharegpt_requests


def words(text: str) -> SimpleNamespace:
    """A tokenizer of one token per word (token id = word length)."""
    return SimpleNamespace(input_ids=[len(w) for w in text.split()])


def test_offline_and_online_workloads_read_the_same_conversations(tmp_path) -> None:
    records = [{"conversations": [{"from": "human", "value": f"q{i} " * (4 + i)},
                                  {"from": "gpt", "value": f"a{i} " * (5 + i)}]} for i in range(6)]
    records += [{"conversations": [{"value": "too short"}]}, "not a record", {"conversation": []}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    offline = sharegpt_requests(str(path), num=4, tokenizer=words, max_len=1000, seed=3)
    online = sharegpt_dataset(str(path), num=4, seed=3)
    assert [(len(r.prompt_token_ids), r.output_len) for r in offline] == \
        [(len(r.prompt.split()), int(r.prompt.split()[0][1:]) + 5) for r in online]
    assert [(len(r.prompt_token_ids), r.output_len) for r in offline] == [(5, 6), (9, 10), (4, 5), (8, 9)]  # seed 3
