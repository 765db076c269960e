"""`imtune loss`: per-example loss of a model on a dataset under an objective's weights (the paper's Figure 3)."""

from __future__ import annotations

import sys

from imtune import ranges
from imtune.cli.common import add_data, add_model, add_overwrite, load_data
from imtune.cli.generate import add_runtime, add_template
from imtune.config import DEFAULT_MAX_LENGTH


def add_parser(sub):
    p = sub.add_parser("loss", help="per-example loss on a dataset (train vs held-out: does the model overfit?)",
                       description="For each example, the weighted mean token cross-entropy over the tokens the "
                                   "objective weights (default it: the assistant output). Compare a model's train "
                                   "and held-out distributions to see overfitting: the paper finds IM has higher "
                                   "train and lower held-out output loss than IT. Writes one JSONL row per example "
                                   "{id, tokens, loss} and a summary (mean, median, std, bootstrap 95% CI of the "
                                   "mean) to <out without .jsonl>.summary.json.")
    add_model(p)
    add_data(p)
    p.add_argument("--objective", default="it",
                   help="which tokens count: it (output only, the paper's probe), im, im-all, weighted:λ[:ρ], "
                        "optionally @last (default: it)")
    add_template(p)
    p.add_argument("--max-length", dest="max_length", type=ranges.LENGTH, default=DEFAULT_MAX_LENGTH,
                   help="truncate examples to this many tokens; examples left with no weighted token are "
                        f"excluded and reported (default: {DEFAULT_MAX_LENGTH})")
    add_runtime(p)
    p.add_argument("--out", default="losses.jsonl", help="per-example JSONL output (default: losses.jsonl)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.cli.generate import load_model_and_tokenizer
    from imtune.errors import ImtuneError
    from imtune.evaluation.loss_probe import (
        default_template,
        per_example_loss_with_report,
        summarise,
        summary_path,
    )
    from imtune.io_utils import atomic_write_json, atomic_write_jsonl, prepare_output
    from imtune.masking.objectives import parse_objective

    parse_objective(args.objective)  # a typo should fail before the model loads, not after
    for path in (args.out, summary_path(args.out)):
        prepare_output(path, (args.data, args.model), example="losses.jsonl", overwrite=args.overwrite)
    records = load_data(args)
    template = default_template(args.model, args.template)
    model, tok = load_model_and_tokenizer(args)
    rep = per_example_loss_with_report(model, tok, records, objective=args.objective, template=template,
                                       max_length=args.max_length, batch_size=args.batch_size)
    if not rep.rows:
        raise ImtuneError(f"{args.data}: no example has a weighted token under {rep.objective} "
                          f"(after truncation to {args.max_length} tokens)")
    summary = summarise(rep.rows)
    summary.update(model=str(args.model), data=str(args.data), objective=rep.objective, template=rep.template,
                   max_length=args.max_length, n_truncated=rep.n_truncated, n_excluded=len(rep.excluded),
                   excluded=rep.excluded)
    atomic_write_jsonl(args.out, rep.rows)
    spath = atomic_write_json(summary_path(args.out), summary)
    if rep.excluded:
        shown = ", ".join(rep.excluded[:5]) + (f" (+{len(rep.excluded) - 5} more)" if len(rep.excluded) > 5 else "")
        print(f"excluded {len(rep.excluded)} example(s) with no weighted token under {rep.objective} "
              f"(after truncation to {args.max_length}): {shown}", file=sys.stderr)
    print(format_summary(summary))
    print(f"wrote {args.out} and {spath}", file=sys.stderr)
    return 0


def format_summary(s: dict) -> str:
    lo, hi = s["ci95"]
    return (f"{s['objective']} loss over {s['n']} example(s) [template {s['template']}]: mean {s['mean']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}), median {s['median']:.4f}, std {s['std']:.4f}")
