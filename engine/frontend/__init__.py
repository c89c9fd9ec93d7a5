"""The front end: what the offline ``LLM``, the API server's ``AsyncLLM`` and the router share.

* :mod:`.validation` -- the one rule set that refuses a request against the model (context, vocabulary), on
  top of the model-free checks :class:`~pdserve.engine.sampling_params.SamplingParams` makes when built;
* :mod:`.tokenization` -- prompts to token ids, large ones off the event loop;
* :mod:`.fanout` -- one request into its ``n`` sequences (ids, seeds, the default ``max_tokens``);
* :mod:`.output_processor` and :mod:`.detokenizer` -- token deltas into text, stop strings, outputs;
* :mod:`.stats` -- what the front end reports to stat loggers.

Pure Python (no torch): the router imports this package (and ``engine.core.block_hash``), never engine
internals. It may import ``engine.sampling_params``, ``engine.outputs`` and ``engine.core`` data types only.
"""

from pdserve.engine.frontend.fanout import child_ids, child_params, eos_token_id_of, fan_out, with_default_max_tokens
from pdserve.engine.frontend.output_processor import OutputProcessor
from pdserve.engine.frontend.stats import FinishedSequenceStats, IterationStats, SequenceTimes, StatLogger
from pdserve.engine.frontend.validation import tokenize_prompt, validate_prompt

__all__ = ["FinishedSequenceStats", "IterationStats", "OutputProcessor", "SequenceTimes", "StatLogger",
           "child_ids", "child_params", "eos_token_id_of", "fan_out", "tokenize_prompt", "validate_prompt",
           "with_default_max_tokens"]
