"""A parallel engine whose worker dies stops with a clear error, and every other rank exits within 10 s
(issue 15, acceptance 4)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.executor.multiproc import ExecutorFailedError
from pdserve.engine.faults import is_device_fault
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone: it runs nothing and holds no device.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killed_worker_ends_the_engine_cleanly(tmp_path) -> None:
    llm = LLM(make_tiny_model("llama", tmp_path / "m"), device="cpu", num_blocks=32, max_model_len=128,
              tensor_parallel_size=2)
    executor = llm.engine.core.runner
    pids = executor.worker_pids
    params = SamplingParams(max_tokens=3, temperature=0.0)
    assert len(llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids) == 3  # it works before the kill

    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    while any(_alive(pid) for pid in pids) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a rank outlived its dead peer by 10 s"

    with pytest.raises(ExecutorFailedError, match=rf"worker rank 1 \(pid {pids[1]}\) was killed by signal 9; "
                                                  r"the engine cannot continue") as err:
        llm.generate([[5, 6, 7]], params)
    assert is_device_fault(err.value)  # fatal for the engine core, never pinned on one request
    assert time.monotonic() - killed_at < 10
    llm.engine.core.shutdown()  # idempotent after a failure
