"""Why imtune trains the Hugging Face body eagerly with sdpa: step time of the alternatives on this machine.

    .venv/bin/python bench/body_options.py [--reps 2] [--steps 5] [--no-write]

One optimizer step = forward + backward of SmolLM2-135M under bf16 autocast (imtune's CPU default) on 4 rows of
224-256 random tokens, lm_head + cross-entropy on the second half of each row, fused AdamW. Variants, each in its own
process (one at a time), interleaved over repetitions:

* eager-sdpa: what `imtune train` runs (and TRL runs);
* sdpa-math: the same, with sdpa restricted to its math backend (bmm + softmax) instead of the CPU flash kernel;
* eager-attention: `attn_implementation="eager"` (matmul + softmax attention);
* compiled-layers: regional `torch.compile(dynamic=True)` of every decoder layer (the recipe that keeps compile
  time lowest; the layers share one compiled graph).

Reported: time of the first two steps (includes compilation) and the mean of the next `--steps` steps, whose row
lengths vary as a length-grouped run's do. Writes its section of bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402  (a sibling script, not a package)

SECTION = "## Transformer body: eager vs compiled (why the default stays eager)"
VARIANTS = ("eager-sdpa", "sdpa-math", "eager-attention", "compiled-layers")
LENGTHS = (256, 240, 256, 224, 248, 232, 256, 240)


def worker(variant: str, steps: int) -> dict:
    import torch

    from imtune.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    m = load_model("smollm2-135m")  # the one loader (fp32 master weights, sdpa), as `imtune train` loads it
    if variant == "eager-attention":
        m.set_attn_implementation("eager")
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
    if variant == "compiled-layers":
        for layer in m.model.layers:
            layer.compile(dynamic=True)

    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def backend():  # a fresh context each step: sdpa_kernel is a one-shot context manager
        return sdpa_kernel(SDPBackend.MATH) if variant == "sdpa-math" else nullcontext()

    def step(length: int) -> float:
        ids = torch.randint(0, m.config.vocab_size - 1, (4, length))
        with torch.autocast("cpu", dtype=torch.bfloat16), backend():
            h = m.model(input_ids=ids).last_hidden_state[:, length // 2:]
            loss = torch.nn.functional.cross_entropy(m.lm_head(h).float().flatten(0, 1),
                                                     ids[:, length // 2:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    t0 = time.perf_counter()
    step(256), step(200)
    first = time.perf_counter() - t0
    times = []
    for length in LENGTHS[:steps]:
        t = time.perf_counter()
        step(length)
        times.append(time.perf_counter() - t)
    return {"first_two_s": first, "step_s": statistics.mean(times)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    import torch

    load0, started = os.getloadavg(), datetime.datetime.now(datetime.UTC)
    res = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--worker", v, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            res[v].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(r["step_s"] for r in res["eager-sdpa"])
    rows = [f"| {v} | {statistics.median(r['first_two_s'] for r in rs):.1f} | "
            f"{statistics.median(r['step_s'] for r in rs):.2f} | "
            f"{base / statistics.median(r['step_s'] for r in rs):.2f}x |" for v, rs in res.items()]
    text = f"""{SECTION}

`bench/body_options.py`, {started:%Y-%m-%d %H:%M} UTC; {machine()}; torch {torch.__version__}, 2 threads; load
average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end. SmolLM2-135M, bf16 autocast, 4 rows of 224-256
tokens, forward + backward + fused AdamW; medians of {args.reps} interleaved repetitions, each variant in its own
process.

| variant | first 2 steps, s (incl. compile) | later step, s | speed vs eager-sdpa |
|---|---:|---:|---:|
""" + "\n".join(rows) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
