"""Speculative decoding: proposers guess the next tokens cheaply, the target model checks them all in one forward
pass, and an acceptance rule keeps exactly the target's outputs (greedy) or its distribution (sampling).

``config`` (the ``--speculative-config`` flag), ``proposers`` (n-gram prompt lookup, the benchmark oracle),
``draft_model`` (a smaller model with its own KV cache),
``rejection`` (greedy and rejection-sampling verification), ``adaptive`` (how many tokens to propose),
``decoder`` (the engine core's one entry point) and ``metrics`` (vLLM's ``spec_decode_*`` counters).
See docs/speculative-decoding.md.
"""
