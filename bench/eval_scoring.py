"""Multiple-choice scoring speed: prompt reuse (packed rows) vs naive per-choice rows vs a shared KV cache.

    .venv/bin/python bench/eval_scoring.py                       # 40 MMLU questions, 0- and 5-shot, SmolLM2-135M
    .venv/bin/python bench/eval_scoring.py --task hellaswag --questions 40

For each setting it scores the same requests three ways and prints questions/s, the speed-up over naive, and the
largest log-likelihood difference from naive (which is the reference: one plain causal row per request, as lm-eval
does for multi-token choices):
  naive   scoring.loglikelihood(..., reuse=False)
  packed  scoring.loglikelihood(..., reuse=True): one row per question, choices packed after the context
  kvcache this script only: run the context once with use_cache, repeat the cache per choice, run the choices
          (one question per step; the alternative to packing that scoring.py does not use)
"""

from __future__ import annotations

import argparse
import os
import time


def kv_cache_scores(model, tokenizer, requests, add_bos=False):
    """(logprob, greedy) per request, contexts run once and their KV cache reused for each continuation."""
    import inspect

    import torch

    from imtune.evaluation.scoring import encode_pair

    # transformers 5.x renamed past_key_values to cache; accept both.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    groups: dict[tuple, list[int]] = {}
    enc = []
    for i, (c, k) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, c, k, add_bos=add_bos)
        enc.append((ctx, cont))
        groups.setdefault(tuple(ctx), []).append(i)
    out = [None] * len(requests)
    with torch.inference_mode():
        for ctx, idx in groups.items():
            res = model(input_ids=torch.tensor([list(ctx)]), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(res.logits[0, -1].float(), -1)
            conts = [enc[i][1] for i in idx]
            width = max(len(c) for c in conts) - 1
            if width <= 0:
                for i, c in zip(idx, conts, strict=True):
                    out[i] = (first[c[0]].item(), bool(first.argmax() == c[0]))
                continue
            cache = getattr(res, "cache", None) or res.past_key_values
            cache.batch_repeat_interleave(len(idx))
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), len(ctx) + width), dtype=torch.long)
            mask[:, :len(ctx)] = 1
            for j, c in enumerate(conts):
                ids[j, :len(c) - 1] = torch.tensor(c[:-1])
                mask[j, len(ctx):len(ctx) + len(c) - 1] = 1
            pos = torch.arange(len(ctx), len(ctx) + width)[None].expand(len(idx), -1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                           **{cache_arg: cache}).logits
            for j, (i, c) in enumerate(zip(idx, conts, strict=True)):
                lp = torch.log_softmax(logits[j, :len(c) - 1].float(), -1)
                toks = torch.tensor(c[1:])
                total = first[c[0]].item() + lp.gather(-1, toks[:, None]).sum().item()
                greedy = bool(first.argmax() == c[0]) and bool((lp.argmax(-1) == toks).all())
                out[i] = (total, greedy)
    return out


def requests_for(task: str, questions: int, shots: int):
    from imtune.evaluation import tasks as T

    spec = T.parse_tasks(f"{task}@{shots}" if shots else task)[0]
    docs = T.build_mc_docs(spec, questions, shots)
    reqs = [r for d in docs for r in zip(d.contexts, d.continuations, strict=True)]
    return docs, reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mmlu", help="a multiple-choice task (default: mmlu)")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--shots", default="0,5", help="comma-separated few-shot counts (default: 0,5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method; the best is reported")
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-cache variant")
    ap.add_argument("--batch-sizes", default=None,
                    help="also time packed scoring at these batch sizes, e.g. 1,4 (default: only --batch-size)")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # On a shared machine, busy-waiting OpenMP threads stall whenever another process holds a core (2 threads ran
    # 4x slower than 1 here); passive waiting keeps the timings about the scoring method, not the scheduler.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from imtune.evaluation.scoring import default_add_bos, loglikelihood
    from imtune.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    add_bos = default_add_bos(model)
    print(f"model={args.model} task={args.task} questions={args.questions} threads={args.threads} "
          f"batch_size={args.batch_size} torch={torch.__version__}")

    methods = {
        "naive": lambda r: loglikelihood(model, tok, r, batch_size=args.batch_size, reuse=False),
        "packed": lambda r: loglikelihood(model, tok, r, batch_size=args.batch_size, reuse=True),
    }
    for bs in [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []:
        methods[f"packed{bs}"] = lambda r, bs=bs: loglikelihood(model, tok, r, batch_size=bs, reuse=True)
    if not args.no_kv:
        methods["kvcache"] = lambda r: kv_cache_scores(model, tok, r, add_bos=add_bos)

    for shots in [int(s) for s in args.shots.split(",")]:
        docs, reqs = requests_for(args.task, args.questions, shots)
        n_tokens = sum(len(tok(c + k, add_special_tokens=False)["input_ids"]) for c, k in reqs)
        print(f"\n{args.task} {shots}-shot: {len(docs)} questions, {len(reqs)} requests, "
              f"{n_tokens / len(reqs):.0f} tokens per request")
        methods["packed"](reqs[: min(8, len(reqs))])  # warm-up
        ref, times = None, {}
        for name, fn in methods.items():
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = fn(reqs)
                best = min(best, time.perf_counter() - t0)
            times[name] = best
            if ref is None:
                ref = out
            diff = max(abs(a[0] - b[0]) for a, b in zip(out, ref, strict=True))
            same_greedy = all(a[1] == b[1] for a, b in zip(out, ref, strict=True))
            print(f"  {name:9s} {best:7.2f} s  {len(docs) / best:7.2f} questions/s  "
                  f"x{times['naive'] / best:4.2f} vs naive  max|Δ logprob|={diff:.2e}  greedy same={same_greedy}")


if __name__ == "__main__":
    main()
