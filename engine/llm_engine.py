"""An in-process engine: tokenizer + output processor in front of an :class:`EngineCore`.

This is what the offline :class:`~pdserve.engine.llm.LLM` drives. The async engine of the servers splits the same
two halves across processes.
"""

from __future__ import annotations

import itertools
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCore, EngineCoreRequest
from pdserve.engine.frontend.fanout import child_ids, eos_token_id_of, fan_out, with_default_max_tokens
from pdserve.engine.frontend.output_processor import OutputProcessor
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.frontend.tokenizer import load_tokenizer
from pdserve.engine.frontend.validation import tokenize_prompt

PromptType = str | list[int]


class LLMEngine:
    """Adds requests, steps the core, and returns per-sequence :class:`RequestOutput` updates."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.core = EngineCore(config)
        self.processor = OutputProcessor(self.tokenizer)
        self.eos_token_id = eos_token_id_of(self.tokenizer, config.model.hf_config)
        self._counter = itertools.count()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig.create(model, **kwargs))

    def tokenize(self, prompt: PromptType) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                    stream: bool = False, kv_transfer_params: dict | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ``ValueError`` for bad input (nothing queued).

        ``kv_transfer_params``: the handle of KV a prefill engine saved for this prompt (decode role).
        """
        request_id = request_id if request_id is not None else str(next(self._counter))
        token_ids = self.tokenize(prompt)
        text = prompt if isinstance(prompt, str) else None
        params = with_default_max_tokens(params, len(token_ids), self.config.model.max_model_len)
        if params.structured_outputs is not None:
            from pdserve.engine.structured_output.backend import check_spec

            check_spec(params.structured_outputs)  # a bad schema, regex or grammar: ValueError now, as the API's 400
        added: list[str] = []
        try:
            for index, (seq_id, p) in enumerate(fan_out(request_id, params)):
                self.core.add_request(EngineCoreRequest(seq_id, token_ids, p, eos_token_id=self.eos_token_id,
                                                        kv_transfer_params=kv_transfer_params))
                added.append(seq_id)
                self.processor.add_sequence(seq_id, request_id, index, text, token_ids, p, stream=stream)
        except Exception:
            self.abort_request_ids(added)
            raise
        return request_id

    def abort_request_ids(self, seq_ids: list[str]) -> None:
        self.core.abort_requests(seq_ids)
        for sid in seq_ids:
            self.processor.remove(sid)

    def abort_request(self, request_id: str, n: int = 1) -> None:
        self.abort_request_ids(child_ids(request_id, n))

    def step(self) -> list[RequestOutput]:
        processed = self.processor.process(self.core.step())
        if processed.stop_string_finished:
            self.core.finish_requests(processed.stop_string_finished, RequestStatus.FINISHED_STOPPED)
        return processed.request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()
