"""The offline API, shaped like vLLM's so its users feel at home::

    from pdserve import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0.0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.config import DEFAULT_MODEL, EngineConfig
from pdserve.engine.llm_engine import LLMEngine, PromptType
from pdserve.engine.outputs import CompletionOutput, RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.frontend.tokenizer import apply_chat_template

Messages = list[dict[str, str]]


class LLM:
    """Generate text for a batch of prompts with continuous batching on one engine.

    ``model`` is a bundled short name, a local Hugging Face directory, or a shape preset with
    ``load_format="dummy"``; other keyword arguments are :class:`EngineConfig` fields (``max_model_len``,
    ``block_size``, ``max_num_batched_tokens``, ``enable_prefix_caching``, ``num_blocks``, ``device``, ...).
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig.create(model, **kwargs))

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt (text or token ids)
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        params_list = self._broadcast_params(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for rid, params in zip(ids, params_list):
                self.engine.abort_request(rid, params.n)
            raise
        return self._run(ids, params_list)

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one or several conversations, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok(apply_chat_template(tok, conv, add_generation_prompt), add_special_tokens=False).input_ids
                   for conv in conversations]
        outs = self.generate(prompts, sampling_params)
        for out, conv in zip(outs, conversations):
            out.prompt = apply_chat_template(tok, conv, add_generation_prompt)
        return outs

    @staticmethod
    def _broadcast_params(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)

    def _run(self, ids: list[str], params_list: list[SamplingParams]) -> list[RequestOutput]:
        merged: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if not out.finished:
                    continue
                head = merged.setdefault(out.request_id, RequestOutput(
                    out.request_id, out.prompt, out.prompt_token_ids, [], False, out.num_cached_tokens))
                head.outputs.extend(out.outputs)
                head.prompt_logprobs = head.prompt_logprobs or out.prompt_logprobs
        results = []
        for rid, params in zip(ids, params_list):
            out = merged[rid]
            out.outputs.sort(key=lambda c: c.index)
            out.finished = len(out.outputs) == params.n
            results.append(out)
        return results


__all__ = ["LLM", "SamplingParams", "CompletionOutput", "RequestOutput"]
