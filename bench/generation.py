"""Generation throughput of `imtune.evaluation.generation.generate_texts` (memorisation, judging, chat).

    .venv/bin/python bench/generation.py [--model smollm2-135m] [--prompts 16] [--max-new-tokens 64]
                                         [--batch-sizes 1,8] [--threads 2]

Prompts are the first user turns of the bundled LIMA set rendered with the tulu template (the memorisation and
judge setting). For each batch size the same prompts are generated greedily (batched, KV-cached, sorted by length,
stopping at EOS or the template's stop strings) and the script prints wall time, completion tokens/s and prompts/s.
Completion tokens are counted by re-tokenising the returned completions (stop strings and EOS excluded). Batch size
1 is the unbatched baseline; greedy outputs must be identical at every batch size, which is checked.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts_from_lima(tokenizer, n: int) -> list[str]:
    from imtune.masking.templates import render_prompt
    from imtune.records.loading import load_records

    recs = load_records(ROOT / "src/imtune/data/train/lima.jsonl", skip_invalid=True)[:n]
    firsts = [next(m for m in r.messages if m.role == "user") for r in recs]
    return [render_prompt([{"role": "user", "content": m.content}], tokenizer, "tulu") for m in firsts]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from imtune.evaluation.chat_generation import stop_strings
    from imtune.evaluation.generation import generate_texts
    from imtune.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    prompts = prompts_from_lima(tok, args.prompts)
    stops = stop_strings("tulu", tok)
    n_prompt = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    print(f"{datetime.date.today().isoformat()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, {args.threads} threads; model {args.model}; "
          f"{len(prompts)} prompts ({n_prompt / len(prompts):.0f} tokens each on average), greedy, "
          f"max_new_tokens {args.max_new_tokens}")
    generate_texts(model, tok, prompts[:1], max_new_tokens=4, progress=False)  # warm-up
    ref = None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        outs = generate_texts(model, tok, prompts, max_new_tokens=args.max_new_tokens, stop=stops, batch_size=bs,
                              progress=False)
        wall = time.perf_counter() - t0
        n_new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        same = "reference" if ref is None else ("identical" if outs == ref else "DIFFERENT")
        ref = ref or outs
        print(f"  batch {bs:3d}: {wall:7.2f} s  {n_new / wall:8.1f} completion tokens/s  "
              f"{len(prompts) / wall:6.2f} prompts/s  ({n_new} tokens; outputs {same})")


if __name__ == "__main__":
    main()
