"""Generation throughput of `imtune.evaluation.generation.generate_texts` (memorisation, judging, chat).

    .venv/bin/python bench/generation.py [--model smollm2-135m] [--prompts 16] [--max-new-tokens 64]
                                         [--batch-sizes 1,8] [--precisions fp32,bf16] [--reps 3]

Prompts are the first user turns of the bundled LIMA set rendered with the tulu template (the memorisation and
judge setting). For each batch size the same prompts are generated greedily (batched, KV-cached, sorted by length,
stopping at EOS or the template's stop strings) and the script prints wall time, completion tokens/s and prompts/s.
Completion tokens are counted by re-tokenising the returned completions (stop strings and EOS excluded). Batch size
1 is the unbatched baseline; greedy outputs are compared with it (identical in fp32; bf16 may flip near-ties).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Generation throughput (memorisation, judging)"
sys.path.insert(0, str(ROOT / "bench"))
from results_md import machine, write_section  # noqa: E402  (a sibling script, not a package)


def prompts_from_lima(tokenizer, n: int) -> list[str]:
    from imtune.masking.templates import render_prompt
    from imtune.records.loading import load_records

    recs = load_records(ROOT / "src/imtune/data/train/lima.jsonl", skip_invalid=True)[:n]
    firsts = [next(m for m in r.messages if m.role == "user") for r in recs]
    return [render_prompt([{"role": "user", "content": m.content}], tokenizer, "tulu") for m in firsts]


def _same(outs: list[str], ref: list[str]) -> str:
    differ = sum(a != b for a, b in zip(outs, ref, strict=True))
    return "identical" if not differ else f"{differ} of {len(ref)} differ"


def timed_generation(model, tok, prompts, stops, bs: int, max_new: int) -> tuple[float, int, list[str]]:
    from imtune.evaluation.generation import generate_texts

    t0 = time.perf_counter()
    outs = generate_texts(model, tok, prompts, max_new_tokens=max_new, stop=stops, batch_size=bs, progress=False)
    wall = time.perf_counter() - t0
    return wall, sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs), outs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--precisions", default="fp32,bf16", help="model dtypes as `imtune evaluate` loads them")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; rates are medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from imtune.evaluation.chat_generation import stop_strings
    from imtune.evaluation.generation import generate_texts
    from imtune.models import load_for_inference

    torch.set_num_threads(args.threads)
    load0, started = os.getloadavg(), datetime.datetime.now(datetime.UTC)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    models = {p: load_for_inference(args.model, dtype=p, device="cpu")[:2] for p in args.precisions.split(",")}
    tok = next(iter(models.values()))[1]
    prompts = prompts_from_lima(tok, args.prompts)
    stops = stop_strings("tulu", tok)
    n_prompt = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)
    walls, tokens, outputs = {}, {}, {}
    for m, _ in models.values():
        generate_texts(m, tok, prompts[:1], max_new_tokens=4, progress=False)  # warm-up
    for _ in range(args.reps):
        for prec, (m, _) in models.items():
            for bs in sizes:
                wall, n_new, outs = timed_generation(m, tok, prompts, stops, bs, args.max_new_tokens)
                walls.setdefault((prec, bs), []).append(wall)
                tokens[(prec, bs)], outputs[(prec, bs)] = n_new, outs
    rows = []
    for (prec, bs), ws in walls.items():
        ref = outputs[(prec, sizes[0])]
        speedup = statistics.median(a / b for a, b in zip(walls[(prec, sizes[0])], ws, strict=True))
        rows.append(f"| {prec} | {bs} | {statistics.median(ws):.2f} | {tokens[(prec, bs)] / statistics.median(ws):.1f} "
                    f"| {len(prompts) / statistics.median(ws):.2f} | {speedup:.2f}x | "
                    f"{_same(outputs[(prec, bs)], ref) if bs != sizes[0] else 'reference'} |")
    text = f"""{SECTION}

`bench/generation.py`, {started:%Y-%m-%d %H:%M} UTC; {machine()}; torch {torch.__version__}, {args.threads} threads;
load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end. Model `{args.model}` loaded as `imtune evaluate`
loads it (`load_for_inference`, each dtype); {len(prompts)} first user turns of LIMA in the tulu template
({n_prompt:.0f} prompt tokens on average), greedy, max_new_tokens {args.max_new_tokens}, stopping at EOS or the
template's stop strings. `generate_texts` sorts prompts by length, batches them and decodes with the KV cache;
batch size {sizes[0]} is the unbatched baseline (what calling `model.generate` per prompt does). Median of
{args.reps} interleaved repetitions; the speed-up is the median of the per-repetition ratios. Completion tokens are
counted by re-tokenising the returned texts. In fp32, batched greedy outputs must equal the unbatched ones; in bf16
a padded batch rounds differently from a single row, so a near-tie between two tokens can flip and the text
diverge from there (the column counts such prompts).

| dtype | batch | wall s | completion tok/s | prompts/s | vs batch {sizes[0]} | greedy outputs |
|---|---:|---:|---:|---:|---:|---|
""" + "\n".join(rows) + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
