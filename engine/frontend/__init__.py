"""The front end: what the offline ``LLM``, the API server's ``AsyncLLM`` and the router share.

* :mod:`.validation` -- the one rule set that refuses a request against the model (context, vocabulary), on
  top of the model-free checks :class:`~pdserve.engine.sampling_params.SamplingParams` makes when built;
* :mod:`.tokenizer` -- loading, chat templates, and tokenizing large prompts off the event loop;
* :mod:`.fanout` -- one request into its ``n`` sequences (ids, seeds, the default ``max_tokens``);
* :mod:`.output_processor` and :mod:`.detokenizer` -- token deltas into text, stop strings, outputs;
* :mod:`.output_stream` -- one request's stream of outputs, as the API layer iterates it;
* :mod:`.stats` -- what the front end reports to stat loggers;
* :mod:`.errors` -- the front end's errors (engine dead or not ready, queue full, request failed);
* :mod:`.params_wire` -- the one mapping of sampling parameters to and from the wire (HTTP models, protobuf).

The data types a request is made of (``SamplingParams``, ``Logprob``, outputs) are re-exported here, so that
the router and the API layer import the front end alone.

Pure Python (no torch): the router imports this package (and ``engine.core.block_hash``), never engine
internals. It may import ``engine.sampling_params``, ``engine.outputs`` and ``engine.core`` data types only.
"""

from pdserve.engine.frontend.errors import EngineDeadError, EngineNotReadyError, QueueFullError, RequestFailedError
from pdserve.engine.frontend.fanout import (after_tokens, child_ids, child_params, eos_token_id_of, fan_out,
                                            with_default_max_tokens)
from pdserve.engine.frontend.output_processor import OutputProcessor
from pdserve.engine.frontend.output_stream import OutputStream
from pdserve.engine.frontend.stats import FinishedSequenceStats, IterationStats, SequenceTimes, StatLogger, record_all
from pdserve.engine.frontend.validation import tokenize_prompt, validate_prompt
from pdserve.engine.outputs import CompletionOutput, EngineCoreOutput, Logprob, RequestOutput
from pdserve.engine.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "EngineCoreOutput", "EngineDeadError", "EngineNotReadyError", "FinishedSequenceStats",
           "IterationStats", "Logprob", "OutputProcessor", "OutputStream", "QueueFullError", "RequestFailedError",
           "RequestOutput", "SamplingParams", "SequenceTimes", "StatLogger", "after_tokens", "child_ids",
           "child_params", "eos_token_id_of", "fan_out", "record_all", "tokenize_prompt", "validate_prompt",
           "with_default_max_tokens"]
