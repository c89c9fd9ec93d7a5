"""Per-request sampling parameters, validated at construction so bad input fails before it reaches the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.engine.structured_output.params import StructuredOutputsParams

# Bounds that keep a single request from asking for unbounded work.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 256
MAX_CACHE_SALT_LEN = 256
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_ALLOWED_TOKEN_IDS = 1 << 20
MAX_BAD_WORDS = 256
MAX_BAD_WORD_LEN = 256
# Every wire format (protobuf, msgpack, torch generators) carries integers as int64: larger ones are refused here
# rather than overflowing somewhere inside the engine.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_valid_text(text: str) -> bool:
    """False for a string that is no Unicode text (a lone surrogate such as ``"\\ud800"``): tokenizers and
    protobuf cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _token_key(key: object) -> object:
    """A logit_bias key as a token id: OpenAI's JSON keys are strings of digits."""
    if isinstance(key, str) and key.isascii() and key.strip().isdigit():
        return int(key)
    return key


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (the vLLM/OpenAI parameter set).

    ``temperature == 0`` means greedy. ``max_tokens=None`` means "until the context is full". Stop strings are
    matched on the detokenized text and are not included in the output unless ``include_stop_str_in_output``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the sampled token's)
    skip_special_tokens: bool = True
    # Mixed into the first block's hash: requests with different salts never share prefix-cached KV (per tenant).
    cache_salt: str | None = None
    # Constrained decoding (engine/structured_output): the output obeys this JSON Schema, regex, choice or grammar.
    structured_outputs: StructuredOutputsParams | None = None
    # Speculative decoding (engine/spec_decode): True opts this request out on an engine that speculates.
    disable_speculation: bool = False
    # Number of top logprobs per prompt token (0: only the prompt token's own); the first token has none. A
    # request asking for them recomputes its whole prompt (prefix-cache hits are not used for it).
    prompt_logprobs: int | None = None
    # Logits processing (engine/logits_processors.py), applied only to the rows that set them:
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] added to its logit
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # each word's token sequence is never completed in the output
    # The last that many prompt tokens are this sequence's own earlier output (a prefill pod's first token, a
    # resumed stream's tokens; set by the router through ``after_tokens``): bad_words and presence/frequency
    # penalties count them as generated. Not an API field.
    num_generated_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}")

        check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n",
              f"must be an integer in [1, {MAX_N}]")
        check(_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
              "temperature", "must be a finite number >= 0")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and 0 <= self.top_k <= INT64_MAX, "top_k",
              f"must be an integer in [0, {INT64_MAX}] (or -1 to disable)")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.seed is None or (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX), "seed",
              f"must be an integer in [{INT64_MIN}, {INT64_MAX}] or None")
        for name in ("presence_penalty", "frequency_penalty"):
            check(_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "must be in [-2, 2]")
        check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2, "repetition_penalty",
              "must be in (0, 2]")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= INT64_MAX),
              "max_tokens", f"must be an integer in [1, {INT64_MAX}]")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= INT64_MAX, "min_tokens",
              f"must be an integer in [0, {INT64_MAX}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"must hold at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN or not is_valid_text(s):
                raise ValueError(f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_LEN} "
                                 f"characters, got {s!r}")
        check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
              f"must hold at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            # The upper bound against the model's vocabulary is checked with the prompt (validate_prompt).
            if not _is_int(t) or not 0 <= t <= INT64_MAX:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and 0 < len(self.cache_salt)
                                          <= MAX_CACHE_SALT_LEN and is_valid_text(self.cache_salt)),
              "cache_salt", f"must be a non-empty string of at most {MAX_CACHE_SALT_LEN} characters or None")
        check(isinstance(self.disable_speculation, bool), "disable_speculation", "must be true or false")
        check(_is_int(self.num_generated_prompt_tokens) and self.num_generated_prompt_tokens >= 0,
              "num_generated_prompt_tokens", "must be an integer >= 0")

        check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              "prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        self._validate_logits_processing()

        if self.structured_outputs is not None and (self.ignore_eos or self.min_tokens):
            # The constraint decides where the output ends (its end state admits only EOS).
            raise ValueError("structured_outputs cannot be combined with ignore_eos or min_tokens")

    def _validate_logits_processing(self) -> None:
        # Upper bounds against the model's vocabulary are checked with the prompt (validate_prompt).
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases")
            for token, value in bias.items():
                if not _is_int(token) or not 0 <= token <= INT64_MAX:
                    raise ValueError(f"logit_bias: {token!r} is not a token id")
                if not _is_number(value) or not -100 <= value <= 100:
                    raise ValueError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {value!r}")
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not allowed or len(allowed) > MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(f"allowed_token_ids must hold between 1 and {MAX_ALLOWED_TOKEN_IDS} token ids")
            bad = next((t for t in allowed if not _is_int(t) or not 0 <= t <= INT64_MAX), None)
            if bad is not None:
                raise ValueError(f"allowed_token_ids: {bad!r} is not a token id")
        words = self.bad_words
        if words is not None:
            if len(words) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words must hold at most {MAX_BAD_WORDS} words")
            for w in words:
                if not isinstance(w, str) or not w.strip() or len(w) > MAX_BAD_WORD_LEN or not is_valid_text(w):
                    raise ValueError(f"bad_words: each word must be a non-blank string of at most {MAX_BAD_WORD_LEN} "
                                     f"characters, got {w!r}")

    @property
    def needs_logits_processing(self) -> bool:
        """Whether the sampler must edit this request's logits (logit_bias, allowed_token_ids, bad_words)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
