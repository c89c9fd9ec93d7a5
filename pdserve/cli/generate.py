"""``pdserve generate``: run prompts through the offline engine and print the answers."""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap each prompt as a user message with the chat template (default: on when the "
                             "tokenizer has a chat template)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.sampling_seed)
        llm = LLM(**engine_kwargs(args))
        tok = llm.get_tokenizer()
        use_chat = args.chat if args.chat is not None else bool(tok is not None and tok.chat_template)
        if use_chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outs = llm.generate(args.prompt, params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outs):
        comp = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": out.prompt_token_ids,
                              "token_ids": comp.token_ids, "text": comp.text,
                              "finish_reason": comp.finish_reason}))
        else:
            print(comp.text)
    return 0
