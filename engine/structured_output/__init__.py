"""Structured output: outputs constrained to a JSON Schema, a regex, a choice or a grammar.

* :mod:`.params` -- the request's constraint (pure Python; carried by ``SamplingParams`` over every wire);
* :mod:`.backend` -- the grammar backend (xgrammar): checking a spec, compiling it for a tokenizer, matchers;
* :mod:`.manager` -- per engine: compiles off the model loop with a cache, fills each step's token bitmask;
* :mod:`.bitmask` -- applies a bitmask to the logits on the device.

The matcher state belongs to the request (``Request.grammar``): it follows the request's output tokens, so it
survives preemption (the output tokens are kept while the KV is recomputed) and disaggregation (a decode pod's
matcher first advances over the tokens the prefill pod generated).
"""

from pdserve.engine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
