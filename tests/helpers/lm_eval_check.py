"""lm-evaluation-harness against a pdserve OpenAI endpoint, and transformers' loglikelihoods for the same requests.

:func:`run_lm_eval` runs the real harness (``lm_eval.simple_evaluate``, model ``local-completions``, token-id
requests) on the small tasks shipped in ``tests/lm_eval_tasks``; :class:`HfScorer` recomputes each logged sample's
loglikelihood with transformers (float32), encoding the request exactly as the harness does (its ``_encode_pair``
for a context/continuation, one window after the prefix token for a short rolling document).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
MAX_LENGTH = 512


def run_lm_eval(completions_url: str, model_name: str, model_dir: str, api_key: str, tasks: list[str],
                monkeypatch: Any, cache_dir: Path) -> dict[str, list[dict]]:
    """Per task, the harness's logged samples (``arguments`` and ``resps``). Offline: data from TASKS_DIR."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache_dir),
                       "OPENAI_API_KEY": api_key}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(TASKS_DIR)  # the task configs name their data files relative to their folder
    result = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(model=model_name, base_url=completions_url, tokenizer=model_dir,
                        tokenizer_backend="huggingface", tokenized_requests=True, max_length=MAX_LENGTH,
                        num_concurrent=1, max_retries=1),
        tasks=tasks, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True)
    assert result is not None
    return result["samples"]


class HfScorer:
    """transformers' loglikelihoods on the model directory, as the harness would request them."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]

    def loglikelihood(self, context: str, continuation: str) -> float:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # the harness moves the context's trailing spaces into the continuation
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx_len = len(self.encode(context))
        return sum(self.token_logprobs(whole)[ctx_len - 1:])

    def rolling(self, text: str) -> float:
        ids = self.encode(text)
        assert len(ids) < MAX_LENGTH, "a rolling document longer than one window needs the harness's windows"
        prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        return sum(self.token_logprobs([prefix, *ids]))


def assert_samples_match(samples: dict[str, list[dict]], scorer: HfScorer, tol: float = 1e-3) -> int:
    """Every logged request's loglikelihood equals transformers' within ``tol``; returns how many were checked."""
    checked = 0
    for task, rows in samples.items():
        for sample in rows:
            for args, resps in zip(sample["arguments"], sample["resps"]):
                got = resps[0][0] if isinstance(resps[0], tuple) else resps[0]
                want = scorer.rolling(args[0]) if len(args) == 1 else scorer.loglikelihood(args[0], args[1])
                assert abs(got - want) <= tol, (task, args, got, want)
                checked += 1
    return checked
