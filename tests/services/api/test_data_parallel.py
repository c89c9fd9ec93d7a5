"""``pdserve serve --data-parallel-size 2``: two engine cores behind one server; the official openai client gets
the answers of one engine, and the load is split between the cores (per-core metrics) (issue 15, acceptance 2)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.services.api.api_servers import API_KEY, ENGINE_KWARGS, MODEL, start_real_server, stop_real_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,", "Water boils at",
           "The best way to learn"]
MAX_TOKENS = 6


def test_two_cores_answer_like_one_and_share_the_load() -> None:
    server = start_real_server(("--data-parallel-size", "2"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        def complete(prompt: str) -> str:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
            return out.choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(complete, PROMPTS))
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=MAX_TOKENS, temperature=0.0)
        server.wait_idle()
        finished = [server.metric("engine_requests_finished_total", engine=str(i)) for i in range(2)]
        assert sum(finished) == len(PROMPTS) + 1
        assert min(finished) >= 2, f"the load was not split: {finished}"
        generated = [server.metric("engine_generation_tokens_total", engine=str(i)) for i in range(2)]
        assert sum(generated) == server.metric("generation_tokens_total") > 0
    finally:
        stop_real_server(server)
    llm = LLM(MODEL, **ENGINE_KWARGS)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    assert answers == [o.outputs[0].text for o in llm.generate(PROMPTS, greedy)]
    expected_chat = llm.chat([{"role": "user", "content": "Hi"}], greedy)[0].outputs[0].text
    assert chat.choices[0].message.content == expected_chat


def test_refused_with_a_clear_error_where_it_cannot_run() -> None:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine_core import EngineCore

    config = EngineConfig.create(MODEL, device="cpu", data_parallel_size=2, num_blocks=16)
    with pytest.raises(ValueError, match="data parallelism runs several engine cores behind `pdserve serve`"):
        EngineCore(config)
