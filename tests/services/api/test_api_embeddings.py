"""``/v1/embeddings`` with the official ``openai`` client against ``pdserve serve --runner pooling`` (the bundled
model): deterministic vectors, a batch equal to its inputs one at a time, every input form, base64; a pooling
server refuses generation and a generate server refuses embeddings, both with a clear 400."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import tempfile

import httpx
import numpy as np
import openai
import pytest

from api_servers import MODEL
from pdserve.cli.local_servers import free_port
from tests.helpers.server_process import wait_healthy

pytestmark = pytest.mark.timeout(300)
TEXTS = ["The capital of France is Paris.", "Hello", "def fibonacci(n): return n if n < 2 else fib(n - 1)"]
HIDDEN = 576  # SmolLM2-135M
TOL = 1e-5
KEY = "pooling-key"


@pytest.fixture(scope="module")
def pooling_url():
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="pdserve-pooling-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "pdserve.cli.main", "serve", "--model", MODEL, "--port",
                             str(port), "--runner", "pooling", "--pooling-type", "mean", "--max-model-len", "512",
                             "--num-blocks", "64", "--api-key", KEY, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                            env=os.environ)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log.name, "pdserve serve --runner pooling", timeout_s=600)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def client(pooling_url):
    return openai.OpenAI(base_url=f"{pooling_url}/v1", api_key=KEY, max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float64)


def test_batch_equals_singles_and_repeats(client):
    batch = client.embeddings.create(model=MODEL, input=TEXTS)
    assert batch.model == MODEL and batch.usage.prompt_tokens > len(TEXTS)
    got = vectors(batch)
    assert got.shape == (len(TEXTS), HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # L2-normalized
    singles = np.concatenate([vectors(client.embeddings.create(model=MODEL, input=t)) for t in TEXTS])
    np.testing.assert_allclose(got, singles, atol=TOL, rtol=0)
    assert np.array_equal(vectors(client.embeddings.create(model=MODEL, input=TEXTS)), got)


def test_token_ids_and_base64(client, pooling_url):
    ids = httpx.post(f"{pooling_url}/tokenize", json={"prompt": TEXTS[0], "add_special_tokens": False},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    as_text = vectors(client.embeddings.create(model=MODEL, input=TEXTS[0]))
    np.testing.assert_allclose(vectors(client.embeddings.create(model=MODEL, input=ids)), as_text, atol=TOL)
    two = vectors(client.embeddings.create(model=MODEL, input=[ids, ids[:3]]))
    np.testing.assert_allclose(two[0], as_text[0], atol=TOL)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, as_text[0], atol=1e-7)


def test_refusals(client, real_server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input="x", dimensions=64)
    assert exc.value.body["param"] == "dimensions"
    assert len(client.embeddings.create(model=MODEL, input="x", dimensions=HIDDEN).data[0].embedding) == HIDDEN
    with pytest.raises(openai.BadRequestError, match="pooling runner"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="pooling runner"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input=[])
    generate = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        generate.embeddings.create(model=MODEL, input="x")
