"""The scheduler's timeline marks of a request (engine/request.py): the KV load's start and end (with bytes) and
the first compute scheduling, and how they reach the first token's output (``Request.timing_marks``)."""

from __future__ import annotations

from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.kv_transfer.base import KVConnectorMetadata, KVConnectorOutput
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams


class SlowStore:
    """A connector scheduler half whose blocks appear on the second lookup: "ask again later", then 8 tokens."""

    def __init__(self) -> None:
        self.lookups = 0

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.lookups += 1
        return None if self.lookups == 1 else 8

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        pass

    def build_connector_meta(self, sched_out):
        return KVConnectorMetadata()

    def request_finished(self, request, block_ids):
        return False, None

    def update_connector_output(self, output):
        pass

    def take_released(self):
        return []


def scheduler(connector=None) -> Scheduler:
    return Scheduler(block_size=4, num_blocks=16, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64,
                     kv_connector=connector)


def request(rid: str = "r") -> Request:
    return Request(rid, list(range(1, 11)), SamplingParams(max_tokens=2))


def test_plain_request_marks_its_first_scheduling_only():
    sched, req = scheduler(), request()
    sched.add_request(req)
    sched.schedule()
    assert req.first_scheduled_at is not None and req.kv_load_started_at is None
    marks = req.timing_marks(req.first_scheduled_at + 0.5)
    assert marks == {"first_token": req.first_scheduled_at + 0.5, "scheduled": req.first_scheduled_at}


def test_kv_load_marks_span_the_wait_and_the_load():
    store = SlowStore()
    sched, req = scheduler(store), request()
    sched.add_request(req)
    sched.schedule()  # the blocks are not there yet: the transfer phase starts, nothing is computed
    started = req.kv_load_started_at
    assert started is not None and req.first_scheduled_at is None
    sched.schedule()  # found: the load is queued (the request waits for it)
    assert req.kv_load_started_at == started and sched.num_loading == 1 and req.kv_load_ended_at is None
    sched.update_from_kv_transfer(KVConnectorOutput(finished_loading={"r"}, loaded_bytes={"r": 4096}))
    assert req.kv_load_ended_at is not None and req.kv_load_ended_at >= started and req.kv_load_bytes == 4096
    sched.schedule()  # the rest of the prompt is computed
    assert req.first_scheduled_at is not None and req.first_scheduled_at >= req.kv_load_ended_at
    marks = req.timing_marks(req.first_scheduled_at)
    assert marks["kv_load_start"] == started and marks["kv_load_bytes"] == 4096.0
    assert marks["kv_load_start"] <= marks["kv_load_end"] <= marks["scheduled"] <= marks["first_token"]
