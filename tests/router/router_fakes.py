"""In-process fakes for router tests: a word tokenizer and pods that generate a deterministic continuation.

A fake pod's next token depends only on the whole sequence so far, so a stream resumed on another pod from
"prompt + tokens already sent" continues exactly as the first pod would have: tests can compare streams exactly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdserve.services.router.backend import BackendRequest, PodError, PodRejected, TokenDelta
from pdserve.services.router.types import Endpoint

EOS = 2


class WordTokenizer:
    """Token id ``i`` is the word ``w{i}``; text is words joined by spaces."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [int(w[1:]) for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids if not (skip_special_tokens and i == EOS))

    def __len__(self) -> int:
        return 1000


def next_token(seq: list[int]) -> int:
    """Deterministic "model": never EOS unless the sequence sums to a multiple of 97."""
    s = sum(seq) * 31 + len(seq)
    return EOS if s % 97 == 0 else 10 + s % 900


@dataclass
class PodBehaviour:
    """How one fake pod misbehaves. ``die_after``: tokens it streams before its stream breaks (None: never)."""

    healthy: bool = True
    fail_at_start: bool = False
    die_after: int | None = None
    reject: int | None = None  # HTTP status to refuse every request with
    delay_s: float = 0.0  # between tokens
    prefill_first_token: bool = True


@dataclass
class FakePodBackend:
    """Fake pods by name; records every request each pod got (``calls``)."""

    behaviours: dict[str, PodBehaviour] = field(default_factory=dict)
    calls: list[tuple[str, str, BackendRequest]] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)
    kill_first_stream_after: int | None = None  # whichever pod streams first dies after this many tokens
    refuse_first_stream: bool = False  # whichever pod gets the first stream refuses it (and goes down)
    released: list = field(default_factory=list)  # transfer handles the router gave back

    def of(self, pod: Endpoint) -> PodBehaviour:
        return self.behaviours.setdefault(pod.name, PodBehaviour())

    async def generate(self, pod: Endpoint, req: BackendRequest):
        b = self.of(pod)
        self.calls.append(("generate", pod.name, req))
        if b.reject:
            raise PodRejected(b.reject, "refused")
        if self.refuse_first_stream:
            self.refuse_first_stream, b.healthy = False, False
            raise PodError(pod.name, "connection refused")
        if b.fail_at_start or not b.healthy:
            raise PodError(pod.name, "connection refused")
        self.active[pod.name] = self.active.get(pod.name, 0) + 1
        if self.kill_first_stream_after is not None:
            b.die_after, self.kill_first_stream_after = self.kill_first_stream_after, None
        try:
            seq = list(req.prompt_token_ids)
            for i in range(req.params.max_tokens):
                if b.die_after is not None and i >= b.die_after:
                    b.healthy = False
                    raise PodError(pod.name, "stream reset")
                await asyncio.sleep(b.delay_s)
                tok = next_token(seq)
                seq.append(tok)
                last = i + 1 == req.params.max_tokens
                stop_tok = tok == EOS and not req.params.ignore_eos
                finish = "stop" if stop_tok else ("length" if last else None)
                yield TokenDelta([tok], finish_reason=finish)
                if finish:
                    return
        finally:
            self.active[pod.name] -= 1

    async def prefill(self, pod: Endpoint, req: BackendRequest):
        b = self.of(pod)
        self.calls.append(("prefill", pod.name, req))
        if b.fail_at_start or not b.healthy:
            raise PodError(pod.name, "connection refused")
        tok = next_token(list(req.prompt_token_ids))
        finish = "stop" if tok == EOS else ("length" if req.params.max_tokens == 1 else None)
        return TokenDelta([tok], finish_reason=finish), {"transfer_id": req.request_id, "from": pod.name}

    async def release_transfer(self, handle) -> None:
        self.released.append(handle)

    async def check_health(self, pod: Endpoint, timeout_s: float) -> bool:
        return self.of(pod).healthy

    async def close(self) -> None:
        pass


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        tok = next_token(seq)
        seq.append(tok)
        out.append(tok)
        if tok == EOS:
            break
    return out
