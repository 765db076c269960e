"""`imtune memorisation`: how much a model copies its training outputs (BLEU / ROUGE-L against them)."""

from __future__ import annotations

import sys
from pathlib import Path

from imtune import ranges
from imtune.cli.common import add_data, add_model, add_overwrite, load_data
from imtune.cli.generate import add_n, add_runtime, add_template, first_n, generate_rows


def add_parser(sub):
    p = sub.add_parser("memorisation", aliases=["memorization"],
                       help="generate on training instructions and score the copies of the training outputs",
                       description="The paper's memorisation probe: greedy generations on the training "
                                   "instructions, scored against the training outputs with sentence BLEU "
                                   "(sacrebleu, effective order), corpus BLEU and ROUGE-L F (stemmed). Higher = more "
                                   "copying; IM should score lower than IT. With --generations, scores an existing "
                                   "generations JSONL (rows with 'output' and 'reference', as 'imtune generate' "
                                   "writes) without loading a model. Writes generations.jsonl (when generating), "
                                   "memorisation.jsonl (per example) and summary.json to --out.")
    add_model(p)
    add_data(p, required=False)
    p.add_argument("--generations", default=None,
                   help="score this generations JSONL instead of generating (no model needed)")
    add_template(p)
    add_n(p)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=ranges.COUNT, default=256,
                   help="most tokens per generation (default: 256)")
    add_runtime(p)
    p.add_argument("--out", default="memorisation", help="output directory (default: ./memorisation)")
    add_overwrite(p)
    p.set_defaults(func=run, command="memorisation")


def run(args) -> int:
    from imtune.errors import ImtuneError
    from imtune.evaluation.memorisation import memorisation_scores, read_generations, summary_of
    from imtune.io_utils import atomic_write_json, atomic_write_jsonl, prepare_output

    names = ("memorisation.jsonl", "summary.json") + (() if args.generations else ("generations.jsonl",))
    out = prepare_output(Path(args.out), (args.data, args.generations, args.model), kind="dir", names=names,
                         overwrite=args.overwrite)
    if args.generations:
        if args.data:
            raise ImtuneError("give either --data (generate, then score) or --generations (score only), not both")
        rows = first_n(read_generations(args.generations), args.n)
        source = {"generations": str(args.generations)}
    else:
        if not args.data:
            raise ImtuneError("give --data (the training set to generate on) or --generations (a JSONL to score)")
        records = first_n(load_data(args), args.n)
        rows = generate_rows(args, records, do_sample=False)
        atomic_write_jsonl(out / "generations.jsonl", rows)
        source = {"model": str(args.model), "data": str(args.data), "max_new_tokens": args.max_new_tokens}
    scores = memorisation_scores([r["output"] for r in rows], [r["reference"] for r in rows])
    per_example = [{"id": r.get("id"), "sentence_bleu": b, "rougeL": rl, "output": r["output"],
                    "reference": r["reference"]}
                   for r, b, rl in zip(rows, scores["sentence_bleu"], scores["rougeL"], strict=True)]
    summary = {**summary_of(scores), **source}
    atomic_write_jsonl(out / "memorisation.jsonl", per_example)
    atomic_write_json(out / "summary.json", summary)
    lo, hi = summary["sentence_bleu_ci95"]
    print(f"memorisation over {summary['n']} example(s): sentence BLEU {summary['sentence_bleu_mean']:.2f} "
          f"(95% CI {lo:.2f}-{hi:.2f}), corpus BLEU {summary['corpus_bleu']:.2f}, "
          f"ROUGE-L {summary['rougeL_mean']:.4f}")
    print(f"wrote {out}/memorisation.jsonl and {out}/summary.json", file=sys.stderr)
    return 0
