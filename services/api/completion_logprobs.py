"""OpenAI's legacy completion ``logprobs`` object, echoed prompt included, as lm-evaluation-harness reads it.

Four parallel lists, one entry per token of the returned text::

    tokens          each token's text
    token_logprobs  its logprob; None for the first prompt token (nothing predicts it)
    top_logprobs    {token text: logprob} of the top alternatives; None for the first prompt token
    text_offset     where the token starts in the choice's text (the echoed prompt counts)

and vLLM's ``prompt_logprobs`` (a choice field when the request sets ``prompt_logprobs``): per prompt token None
(the first) or ``{token id: {"logprob", "rank", "decoded_token"}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pdserve.engine.outputs import Logprob

TokenText = Callable[[Logprob], str]


@dataclass
class LegacyLogprobs:
    """Builds the four lists; ``offset`` is where the next token starts in the choice's text."""

    token_text: TokenText
    num_top: int  # alternatives shown per token (the request's logprobs)
    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add_prompt(self, prompt_ids: list[int], rows: list[list[Logprob] | None]) -> None:
        """The echoed prompt's tokens: ``rows`` is ``RequestOutput.prompt_logprobs`` (None first)."""
        for token_id, row in zip(prompt_ids, rows):
            if row is None:
                self._add(self.token_text(Logprob(token_id, 0.0, 0)), None, None)
            else:
                self.add_rows([row])

    def add_rows(self, rows: list[list[Logprob]]) -> None:
        """Tokens with their logprob rows (``[the token's Logprob, then the top-k]``)."""
        for row in rows:
            top = {self.token_text(lp): lp.logprob for lp in row[1:1 + self.num_top]}
            self._add(self.token_text(row[0]), row[0].logprob, top or None)

    def _add(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def vllm_prompt_logprobs(rows: list[list[Logprob] | None], token_text: TokenText
                         ) -> list[dict[str, dict[str, Any]] | None]:
    """``prompt_logprobs`` as vLLM's API returns it: per prompt token None or {id: logprob, rank, text}."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        entry: dict[str, dict[str, Any]] = {}
        for lp in row:
            entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": lp.rank,
                                                "decoded_token": token_text(lp)})
        out.append(entry)
    return out
