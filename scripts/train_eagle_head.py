"""Train an EAGLE-1 head for a pdserve model (by default the bundled SmolLM2-135M-Instruct) on its own outputs.

1. Prompts: instructions built from templates x topics (written below), split into training and held-out sets.
2. Data: pdserve's engine answers every prompt (greedy, and a sampled answer for a share of them), then the
   target's final hidden states over prompt + answer are computed (transformers, same weights).
3. Training: :class:`~pdserve.engine.spec_decode.eagle_train.EagleTrainHead` -- regression of the next hidden
   state (smooth L1) plus the target's next-token distribution through its lm_head (cross-entropy, weight
   ``--cls-weight``), as EAGLE trains; inputs get a little uniform noise. A second pass trains the condition of
   the second guess too (the head fed its own previous output, ``--second-step-weight``).
4. Saving: the published EAGLE layout (``config.json`` + ``model.safetensors``, bf16, no embedding or lm_head:
   the engine shares the target's).
5. Evaluation: held-out prompts through the engine with ``{"method": "eagle", "model": OUT}``; prints the
   acceptance rate, mean acceptance length, per-position acceptance, and whether the outputs equal plain greedy
   decoding's (same engine settings).

GPU, full configuration (a few minutes on one H100)::

    python -P scripts/train_eagle_head.py --device cuda --out engine/spec_decode/heads/smollm2-135m-eagle

CPU smoke run (a minute or two on an idle 2-core machine; it checks the pipeline, the head learns little)::

    python -P scripts/train_eagle_head.py --device cpu --num-prompts 16 --max-tokens 16 --epochs 1 \\
        --eval-prompts 4 --batch-size 8 --out /tmp/eagle-smoke
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TEMPLATES = [
    "Explain {t} in simple terms.", "Write a short poem about {t}.", "Give me three tips related to {t}.",
    "Summarize the history of {t} in a few sentences.", "What are the main advantages and disadvantages of {t}?",
    "Write a short story that involves {t}.", "How would you teach {t} to a ten-year-old?",
    "List five interesting facts about {t}.", "Write a product description for something inspired by {t}.",
    "What questions should a beginner ask about {t}?", "Describe a typical day of someone who works with {t}.",
    "Write an email to a friend recommending {t}.", "Compare {t} with something similar and explain the difference.",
    "What are common misconceptions about {t}?", "Give step-by-step instructions for getting started with {t}.",
    "Write a haiku about {t}.",
]
TOPICS = [
    "photosynthesis", "the solar system", "machine learning", "coffee", "the French Revolution", "volcanoes",
    "healthy sleep", "budgeting", "the Python programming language", "climate change", "ancient Rome", "jazz music",
    "gardening", "electric cars", "the human heart", "chess", "public speaking", "recycling", "the moon landing",
    "bread baking", "honeybees", "the internet", "meditation", "earthquakes", "learning a language", "dinosaurs",
    "running a marathon", "the stock market", "renewable energy", "origami", "the water cycle", "time management",
    "black holes", "vaccines", "the Renaissance", "cats", "sorting algorithms", "rainforests", "soccer", "tea",
    "writing a resume", "the Great Wall of China", "photography", "friendship", "ocean tides", "video games",
    "democracy", "mountain hiking", "prime numbers", "cooking pasta",
]


def build_prompts(n: int, seed: int) -> list[str]:
    pairs = [tpl.format(t=topic) for tpl, topic in itertools.product(TEMPLATES, TOPICS)]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def generate(llm, tokenizer, prompts: list[str], max_tokens: int, sampled_share: float, seed: int):
    """Token ids of prompt + answer for every prompt (greedy; plus a sampled answer for ``sampled_share``)."""
    from pdserve.engine.frontend.tokenizer import apply_chat_template
    from pdserve.engine.sampling_params import SamplingParams

    ids = [tokenizer(apply_chat_template(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False)
           .input_ids for p in prompts]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, disable_speculation=True)
    outs = llm.generate(ids, greedy)
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(ids, outs)]
    sampled = ids[:int(len(ids) * sampled_share)]
    if sampled:
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=seed + i,
                                 disable_speculation=True) for i in range(len(sampled))]
        seqs += [p + list(o.outputs[0].token_ids) for p, o in zip(sampled, llm.generate(sampled, params))]
    return ids, [list(o.outputs[0].token_ids) for o in outs], seqs


@torch.no_grad()
def target_features(model_dir: str, seqs: list[list[int]], device: str, dtype: torch.dtype, batch: int = 32):
    """The target's final (normed) hidden states ``[n_i, D]`` of each sequence, and its embedding and head."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    feats = []
    for i in range(0, len(seqs), batch):
        part = seqs[i:i + batch]
        width = max(map(len, part))
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for j, s in enumerate(part):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        hidden = hf.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        feats += [hidden[j, :len(s)].float() for j, s in enumerate(part)]
    embed = hf.get_input_embeddings().weight.detach().float()
    head = hf.get_output_embeddings().weight.detach().float()
    return feats, embed, head, hf.config


def step_losses(out, h_out, p_target, mask, head, autocast):
    """Regression to the next hidden state (smooth L1), cross-entropy against the target's next-token
    distribution, and top-1 agreement, each averaged over ``mask``."""
    total = mask.sum()
    reg = (F.smooth_l1_loss(out, h_out, reduction="none").mean(-1) * mask).sum() / total
    with autocast:
        logp = F.log_softmax((out @ head.t()).float(), dim=-1)
    cls = (-(p_target * logp).sum(-1) * mask).sum() / total
    with torch.no_grad():
        hit = ((logp.argmax(-1) == p_target.argmax(-1)).float() * mask).sum() / total
    return reg, cls, hit


PACE_STEPS = 20  # steps timed before --train-seconds decides how many fit


def train(config, feats, seqs, embed, head, args) -> torch.nn.Module:
    from pdserve.engine.spec_decode.eagle_train import EagleTrainHead

    device = args.device
    torch.manual_seed(args.seed)
    model = EagleTrainHead(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    order = list(range(len(seqs)))
    steps_per_epoch = math.ceil(len(order) / args.batch_size)
    total = args.steps or args.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    plan = {"total": total}  # cut by --train-seconds after the first steps; the cosine then ends in time
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / plan["total"]))))
    rng = random.Random(args.seed)
    step, start = 0, time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    while step < plan["total"]:
        rng.shuffle(order)
        for b in range(0, len(order), args.batch_size):
            if step >= plan["total"]:
                break
            idx = order[b:b + args.batch_size]
            width = max(len(seqs[i]) for i in idx) - 1
            D = embed.shape[1]
            h_in = torch.zeros(len(idx), width, D, device=device)
            h_out = torch.zeros_like(h_in)
            nxt = torch.zeros(len(idx), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(idx), width, device=device)
            for j, i in enumerate(idx):
                n = len(seqs[i]) - 1
                f = feats[i]
                h_in[j, :n], h_out[j, :n] = f[:n], f[1:n + 1]
                nxt[j, :n] = torch.tensor(seqs[i][1:], device=device)
                mask[j, :n] = 1
            noisy = h_in + (torch.rand_like(h_in) - 0.5) * args.noise
            with torch.no_grad(), autocast:
                p_target = F.softmax((h_out @ head.t()).float(), dim=-1)
            with autocast:
                if args.second_step_weight > 0:
                    out, out2 = (o.float() for o in model.forward_two_steps(embed[nxt], noisy))
                else:
                    out, out2 = model(embed[nxt], noisy).float(), None
            reg, cls, hit = step_losses(out, h_out, p_target, mask, head, autocast)
            loss = reg + args.cls_weight * cls
            if out2 is not None:  # the second guess's condition (see EagleTrainHead.forward_two_steps)
                mask2 = mask.clone()
                mask2[:, 0] = 0
                reg2, cls2, hit2 = step_losses(out2, h_out, p_target, mask2, head, autocast)
                loss = loss + args.second_step_weight * (reg2 + args.cls_weight * cls2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            step += 1
            if args.train_seconds and step == PACE_STEPS:  # the steps that fit the time budget, at this pace
                fit = int(args.train_seconds * step / max(1e-3, time.time() - start))
                if fit < plan["total"]:
                    print(f"--train-seconds {args.train_seconds:g}: {fit} steps instead of {plan['total']}",
                          flush=True)
                    plan["total"] = max(step, fit)
            total = plan["total"]
            if step % args.log_every == 0 or step == total:
                second = f"  top-1 (2nd guess) {hit2.item():.3f}" if out2 is not None else ""
                print(f"step {step}/{total}  loss {loss.item():.4f}  reg {reg.item():.4f}  cls {cls.item():.4f}  "
                      f"top-1 {hit.item():.3f}{second}  {time.time() - start:.0f}s", flush=True)
    args.steps_trained = step  # for the report
    return model


def engine_kwargs(args) -> dict:
    """Engine settings shared by the generating and the evaluating engine. On a GPU the KV cache has a fixed size
    (8192 blocks of 16 tokens: 256 sequences of up to 512 tokens), not a share of free memory: the first engine's
    memory is not necessarily returned before the second one starts."""
    kwargs = dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=256)
    if args.device.startswith("cuda"):
        kwargs["num_blocks"] = 8192
    return kwargs


def evaluate(args, prompts_ids, expected) -> dict:
    from pdserve import LLM
    from pdserve.engine.sampling_params import SamplingParams

    spec = {"method": "eagle", "model": args.out, "num_speculative_tokens": args.k, "adaptive": False,
            "draft_kv_cache_gib": 0.25 if args.device.startswith("cuda") else 0.01}
    llm = LLM(args.model, speculative_config=spec, **engine_kwargs(args))
    start = time.time()
    outs = llm.generate(prompts_ids, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    elapsed = time.time() - start
    stats = llm.engine.core.get_stats().spec_decode
    same = sum(list(o.outputs[0].token_ids) == e for o, e in zip(outs, expected))
    drafts, proposed, accepted = stats["num_drafts"], stats["num_draft_tokens"], stats["num_accepted_tokens"]
    return {"prompts": len(prompts_ids), "k": args.k, "acceptance_rate": accepted / max(1, proposed),
            "mean_acceptance_length": 1 + accepted / max(1, drafts),
            "accepted_per_position": [n / max(1, drafts) for n in stats["accepted_per_pos"]],
            "outputs_equal_plain_greedy": f"{same}/{len(expected)}", "generate_seconds": round(elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="where the head is saved (EAGLE checkpoint layout)")
    ap.add_argument("--num-prompts", type=int, default=736, help="training prompts (templates x topics: 800 in all)")
    ap.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts (never trained on)")
    ap.add_argument("--max-tokens", type=int, default=256, help="answer length generated per prompt")
    ap.add_argument("--sampled-share", type=float, default=1.0, help="share of prompts also answered by sampling")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --epochs")
    ap.add_argument("--train-seconds", type=float, default=0,
                    help="time budget of the training loop: after the first steps, fewer steps if needed (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cls-weight", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--second-step-weight", type=float, default=1.0,
                    help="weight of the second-guess loss (the head fed its own output; 0: first guess only)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens for the evaluation")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto", help="the engines' dtype (auto: bfloat16 on a GPU, float32 on a CPU); "
                    "float32 makes the speculative outputs comparable token for token with plain decoding")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.num_prompts + args.eval_prompts > len(TEMPLATES) * len(TOPICS):
        ap.error(f"at most {len(TEMPLATES) * len(TOPICS)} prompts in all")

    from pdserve import LLM
    from pdserve.engine.model_loader import resolve_model
    from pdserve.engine.spec_decode.eagle_head import save_eagle_checkpoint

    t0 = time.time()
    resolved = resolve_model(args.model)
    prompts = build_prompts(args.num_prompts + args.eval_prompts, args.seed)
    train_prompts, eval_prompts = prompts[:args.num_prompts], prompts[args.num_prompts:]
    llm = LLM(args.model, **engine_kwargs(args))
    tokenizer = llm.get_tokenizer()
    _, _, seqs = generate(llm, tokenizer, train_prompts, args.max_tokens, args.sampled_share, args.seed)
    eval_ids, eval_expected, _ = generate(llm, tokenizer, eval_prompts, args.max_tokens, 0.0, args.seed)
    llm.engine.core.shutdown()
    del llm
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"generated {len(seqs)} training sequences ({sum(map(len, seqs))} tokens) in {time.time() - t0:.0f}s",
          flush=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    feats, embed, head, config = target_features(resolved.path, seqs, args.device, dtype)
    print(f"features in {time.time() - t0:.0f}s", flush=True)
    model = train(config, feats, seqs, embed, head, args)
    tensors, fields = model.checkpoint(torch.bfloat16)
    save_eagle_checkpoint(args.out, tensors, fields)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(f"saved {args.out} ({size / 1e6:.1f} MB) at {time.time() - t0:.0f}s", flush=True)
    del feats
    report = evaluate(args, eval_ids, eval_expected)
    report.update(train_sequences=len(seqs), train_tokens=sum(map(len, seqs)), total_seconds=round(time.time() - t0))
    print(json.dumps(report, indent=2))
    (Path(args.out) / "training_report.json").write_text(json.dumps({**report, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
