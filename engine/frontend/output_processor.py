"""The front end's per-request state: turns the core's token deltas into text and stop-string decisions.

Runs where tokenization runs (the API process in the async engine, the same process offline). A request with
``n > 1`` is sent to the core as ``n`` sequences (``<id>-<index>``); each is tracked here on its own and its
outputs carry the parent id and the index so callers can group them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.frontend.detokenizer import IncrementalDetokenizer
from pdserve.engine.outputs import CompletionOutput, EngineCoreOutput, Logprob, RequestOutput
from pdserve.engine.sampling_params import SamplingParams


@dataclass
class SequenceTiming:
    """Timestamps for latency metrics (seconds, ``time.monotonic``)."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class _SequenceState:
    seq_id: str
    parent_id: str
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    detok: IncrementalDetokenizer
    timing: SequenceTiming
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[Logprob]] | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None
    sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Prompt logprobs (None first, as vLLM) once the engine sent them; a stream carries them once.
    prompt_logprobs: list[list[Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Sequences the front end finished (a stop string matched): the core must stop them too.
    stop_string_finished: list[str]


class OutputProcessor:
    """Detokenizes core outputs, applies stop strings, and builds :class:`RequestOutput` objects."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._seqs: dict[str, _SequenceState] = {}

    def add_sequence(self, seq_id: str, parent_id: str, index: int, prompt: str | None,
                     prompt_token_ids: list[int], params: SamplingParams, stream: bool = False,
                     arrival: float | None = None) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                       params.include_stop_str_in_output, params.skip_special_tokens)
        self._seqs[seq_id] = _SequenceState(seq_id, parent_id, index, prompt, prompt_token_ids, params, stream,
                                            detok, SequenceTiming(arrival or time.monotonic()),
                                            logprobs=[] if params.logprobs is not None else None)

    def remove(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def has_sequence(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def timing(self, seq_id: str) -> SequenceTiming | None:
        s = self._seqs.get(seq_id)
        return s.timing if s else None

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        results, stopped = [], []
        for out in core_outputs:
            s = self._seqs.get(out.request_id)
            if s is None:
                continue  # already finished here (e.g. stop string) or aborted
            if out.new_token_ids:
                s.timing.first_token = s.timing.first_token or now
                s.timing.last_token = now
                s.timing.token_times.append(now)
            s.token_ids.extend(out.new_token_ids)
            s.num_cached_tokens = out.num_cached_tokens
            if out.kv_transfer_params is not None:
                s.kv_transfer_params = out.kv_transfer_params
            if s.logprobs is not None and out.new_logprobs:
                s.logprobs.extend(out.new_logprobs)
            if out.prompt_logprobs is not None and s.prompt_logprobs is None:
                s.prompt_logprobs = [None, *out.prompt_logprobs]
            # A sequence nobody watches token by token (not streamed, no stop strings) is detokenized once, at
            # the end: per-step text for hundreds of running sequences is pure overhead between model steps.
            final_only = not s.stream and not s.params.stop
            seen = len(s.detok.token_ids)
            stop = None if final_only else s.detok.append(out.new_token_ids)
            if stop is not None:
                # Several tokens in one output (speculative decoding): drop those after the stop string's token.
                extra = len(out.new_token_ids) - (len(s.detok.token_ids) - seen)
                if extra > 0:
                    del s.token_ids[-extra:]
                    if s.logprobs is not None and out.new_logprobs:
                        del s.logprobs[-extra:]
            if out.finish_reason is not None:
                s.finish_reason, s.stop_reason = out.finish_reason, out.stop_reason
            elif stop is not None:
                s.finish_reason, s.stop_reason = "stop", stop
                stopped.append(s.seq_id)
            if s.finish_reason is None and not s.stream:
                continue  # non-streamed outputs are only wanted once finished
            if final_only:
                s.detok.append_all(s.token_ids)
            results.append(self._make_output(s))
            if s.finish_reason is not None:
                s.timing.finished = now
                del self._seqs[s.seq_id]
        return ProcessedOutputs(results, stopped)

    def _make_output(self, s: _SequenceState) -> RequestOutput:
        finished = s.finish_reason is not None
        if s.stream:
            text = s.detok.flush() if finished else s.detok.take_delta()
            token_ids = s.token_ids[s.sent_tokens:]
            logprobs = s.logprobs[s.sent_tokens:] if s.logprobs is not None else None
            s.sent_tokens = len(s.token_ids)
        else:
            text, token_ids, logprobs = s.detok.text, list(s.token_ids), s.logprobs
        cum = sum(row[0].logprob for row in s.logprobs) if s.logprobs else None
        prompt_lp = s.prompt_logprobs if not (s.stream and s.prompt_logprobs_sent) else None
        s.prompt_logprobs_sent = s.prompt_logprobs_sent or prompt_lp is not None
        completion = CompletionOutput(index=s.index, text=text, token_ids=token_ids, finish_reason=s.finish_reason,
                                      stop_reason=s.stop_reason, logprobs=logprobs, cumulative_logprob=cum)
        return RequestOutput(request_id=s.parent_id, prompt=s.prompt, prompt_token_ids=s.prompt_token_ids,
                             outputs=[completion], finished=finished, num_cached_tokens=s.num_cached_tokens,
                             kv_transfer_params=s.kv_transfer_params, prompt_logprobs=prompt_lp)
