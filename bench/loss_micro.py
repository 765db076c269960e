"""Micro-benchmark: forward+backward of HF's full-logits loss vs `imtune.training.loss.weighted_loss_sum`.

    .venv/bin/python bench/loss_micro.py [--batch 8] [--seq 512] [--threads 2] [--repeats 2]
    .venv/bin/python bench/loss_micro.py --heldout 32 [--seq 512] [--batch 4]   # held-out scoring vs training

`--heldout N`: per-example time of held-out scoring (`imtune loss`'s `per_example_loss`, forward only through the
token log-prob engine) against a training step (weighted_loss_sum forward+backward and an AdamW update, micro-batches
of --batch) on the same first N LIMA examples (tulu template, `it` weights, truncated to --seq), same precision.

Model: SmolLM2-135M via `imtune.models.load_model("smollm2-135m")`, or, when that is unavailable, a randomly
initialised Llama of the same shape (timings and memory depend on the shape, not the weights). Weights: "IT"
weights the last 10% of each row (a response), "IM" everything but the first 5%.

Each case runs in its own subprocess so its peak RSS is its own (CPU has no allocator statistics); Δ is the rise
of peak RSS over the loaded model, so it includes the parameter gradients. On CUDA the peak is
`torch.cuda.max_memory_allocated`. A by-hand tool, not a test: it prints a table and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = [("hf", "IT"), ("ours", "IT"), ("hf", "IM"), ("ours", "IM")]


def load(dtype):
    import torch

    try:
        from imtune.models import load_model

        return load_model("smollm2-135m", dtype=dtype), "SmolLM2-135M"
    except Exception as e:  # the models module or the weights may be missing; the shape is what matters
        print(f"[load_model failed: {type(e).__name__}: {e}; using a random Llama of SmolLM2's shape]",
              file=sys.stderr)
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(getattr(torch, dtype)), "random Llama (SmolLM2-135M shape)"


def make_batch(b, t, vocab, kind, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    w = torch.zeros(b, t)
    if kind == "IT":
        w[:, t - max(1, t // 10):] = 1.0
    else:
        w[:, max(1, t // 20):] = 1.0
    w[:, 0] = 0.0
    labels = ids.masked_fill(w == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "weights": w.to(device)}, labels.to(device)


def run_case(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from imtune.training.loss import weighted_loss_sum

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, name = load(args.dtype)
    model = model.to(device).train()
    method, kind = args.case.split(":")
    batch, labels = make_batch(args.batch, args.seq, model.config.vocab_size, kind, device)

    def step():
        if method == "hf":
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                         use_cache=False).loss
        else:
            o = weighted_loss_sum(model, batch, chunk_size=args.chunk)
            loss = o.loss_sum / o.weight_sum
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():  # page in memory-mapped weights so the baseline below includes them
        for p in model.parameters():
            p.sum()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    losses, times = [], []
    for i in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak, extra = torch.cuda.max_memory_allocated() / 2**20, (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak, extra = rss / 1024, (rss - rss0) / 1024
    return {"model": name, "device": device, "method": method, "kind": kind, "time_s": statistics.median(times),
            "peak_mib": peak, "extra_mib": extra, "loss": losses[-1],
            "weighted": int((batch["weights"] > 0).sum())}


def heldout_vs_training(args) -> None:
    import torch

    from imtune.evaluation.loss_probe import per_example_loss
    from imtune.masking.encoding import encode
    from imtune.models import load_tokenizer
    from imtune.records.loading import load_records
    from imtune.training.batching import collate
    from imtune.training.loss import weighted_loss_sum

    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recs = load_records(os.path.join(root, "src/imtune/data/train/lima.jsonl"), skip_invalid=True)[:args.heldout]
    model, name = load(args.dtype)
    tok = load_tokenizer("smollm2-135m")
    enc = encode(recs, tok, "it", "tulu", max_length=args.seq)
    n_tok = sum(map(len, enc))
    per_example_loss(model.eval(), tok, recs[:2], template="tulu", max_length=args.seq, progress=False)  # warm-up
    t0 = time.perf_counter()
    rows = per_example_loss(model, tok, recs, template="tulu", max_length=args.seq, batch_size=args.batch,
                            progress=False)
    score_s = (time.perf_counter() - t0) / len(rows)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))  # the same length-sorted batches as the probe
    t0 = time.perf_counter()
    for s in range(0, len(order), args.batch):
        o = weighted_loss_sum(model, collate([enc[i] for i in order[s:s + args.batch]], tok.pad_token_id))
        (o.loss_sum / o.weight_sum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = (time.perf_counter() - t0) / len(enc)
    print(f"{name}, {args.threads} threads, {args.dtype}, {len(enc)} LIMA examples ({n_tok / len(enc):.0f} tokens "
          f"each on average, max {args.seq}), micro-batch {args.batch}, load {os.getloadavg()[0]:.1f}")
    print(f"  held-out scoring: {score_s * 1000:7.0f} ms per example")
    print(f"  training step:    {train_s * 1000:7.0f} ms per example")
    print(f"  ratio: held-out scoring is x{train_s / score_s:.1f} faster per example")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--heldout", type=int, default=0, help="time held-out scoring vs training on N examples")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.heldout:
        heldout_vs_training(args)
        return
    if args.case:
        print(json.dumps(run_case(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    rows = []
    for method, kind in CASES:
        cmd = [sys.executable, __file__, "--case", f"{method}:{kind}"] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "case"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"case {method}:{kind} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  done {method}:{kind} in {rows[-1]['time_s']:.1f}s/step", file=sys.stderr)
    r0 = rows[0]
    mem = "peak RSS" if r0["device"] == "cpu" else "peak alloc"
    print(f"{r0['model']} on {r0['device']}, {args.threads} threads, batch {args.batch}x{args.seq}, {args.dtype}, "
          f"chunk {args.chunk}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'weights':8} {'method':22} {'weighted':>9} {'fwd+bwd s':>10} {mem + ' MiB':>15} {'Δ MiB':>9} "
          f"{'loss':>8}")
    for r in rows:
        label = "HF model(labels=...)" if r["method"] == "hf" else "weighted_loss_sum"
        print(f"{r['kind']:8} {label:22} {r['weighted']:9d} {r['time_s']:10.2f} {r['peak_mib']:15.0f} "
              f"{r['extra_mib']:9.0f} {r['loss']:8.4f}")
    for kind in ("IT", "IM"):
        hf, ours = (next(r for r in rows if r["method"] == m and r["kind"] == kind) for m in ("hf", "ours"))
        print(f"{kind}: speed-up x{hf['time_s'] / ours['time_s']:.2f}, "
              f"extra memory {ours['extra_mib']:.0f} vs {hf['extra_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
