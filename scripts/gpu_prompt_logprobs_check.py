"""GPU check of prompt logprobs (issue 13): on CUDA, with the Triton attention backend, CUDA graphs and
asynchronous scheduling as served, the engine's prompt logprobs equal transformers' float32 log-softmax.

    .venv/bin/python -P scripts/gpu_prompt_logprobs_check.py [device]   # default cuda; "cpu" for a dry run

A batch mixes requests that ask for prompt logprobs (chunked: the token budget is small) with plain decodes that
run beside them; the plain requests' tokens must equal those of a run without the scoring requests. Exits 1 on a
mismatch. float32 model weights, so the comparison can be tight (1e-3).
"""

from __future__ import annotations

import sys

import torch


def main(device: str) -> int:
    from transformers import AutoModelForCausalLM

    from pdserve import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", device=device, dtype="float32", max_model_len=1024,
              max_num_batched_tokens=96)
    tok = llm.get_tokenizer()
    text = " ".join(f"Line {i}: the value of item {i} is {i * i}." for i in range(25))
    ids = tok(text).input_ids
    plain_prompts = [tok(p).input_ids for p in ("The capital of France is", "def fibonacci(n):")]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain_prompts, greedy)]
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5)
    outs = llm.generate([ids, *plain_prompts, ids], [scoring, greedy, greedy, scoring])

    model = AutoModelForCausalLM.from_pretrained(llm.config.model.path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), dim=-1).cpu()
    worst = 0.0
    for out in (outs[0], outs[3]):
        rows = out.prompt_logprobs
        assert rows is not None and rows[0] is None and len(rows) == len(ids)
        for i, row in enumerate(rows[1:]):
            worst = max(worst, abs(row[0].logprob - ref[i, ids[i + 1]].item()))
            top_ids = [lp.token_id for lp in row[1:]]
            assert top_ids[0] == int(ref[i].argmax()), (i, top_ids)
    beside = [o.outputs[0].token_ids for o in outs[1:3]]
    print(f"prompt tokens {len(ids)}, max |engine - transformers| = {worst:.2e}; plain requests unchanged: "
          f"{beside == alone}")
    return 0 if worst <= 1e-3 and beside == alone else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
