"""`imtune advise`: will IM help this data? A recommendation from a rule fitted to measured comparisons."""

from __future__ import annotations

import json

from imtune.cli.common import add_data, add_model, add_token_count_options, load_data


def add_parser(sub):
    p = sub.add_parser("advise", help="before training: recommend it, im or weighted:λ for a dataset, with reasons",
                       description="Measures the instruction/output token-length ratio and dataset size — the two "
                                   "factors the IM paper found to drive IM's gain — and predicts IM − IT held-out "
                                   "loss from a rule fitted to measured comparisons (bench/advisor_study.py), "
                                   "with its leave-one-source-out accuracy.")
    add_data(p)
    add_model(p)
    add_token_count_options(p)
    p.add_argument("--explain", action="store_true",
                   help="also print the measured comparisons nearest to this data (ratio and size)")
    p.add_argument("--evidence", nargs="+", default=(), metavar="RESULTS_JSON",
                   help="add your own `imtune compare` results.json files to the evidence the rule is fitted to")
    p.add_argument("--table", default=None, help="advisor study table to fit to (default: the bundled one)")
    p.add_argument("--json", action="store_true", help="print JSON (advice + statistics)")
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.analysis.advise import advise, evidence_rows, load_table, nearest_rows
    from imtune.models import load_tokenizer

    records = load_data(args)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    table = load_table(args.table)
    adv, stats = advise(records, tok, template=args.template, max_length=args.max_length,
                        evidence=args.evidence, table=table)
    near = nearest_rows(table.get("rows", []) + evidence_rows(args.evidence), adv.ratio, adv.examples) \
        if args.explain else []
    if args.json:
        print(json.dumps({"advice": adv.to_dict(), "stats": stats, **({"nearest": near} if args.explain else {})},
                         indent=2))
        return 0
    from rich.console import Console

    c = Console(highlight=False, soft_wrap=True)
    c.print(f"[bold]Recommendation: --objective {adv.recommendation}[/bold] "
            f"({adv.confidence}; predicted: {adv.predicted_im_minus_it})")
    c.print(f"  accuracy (leave one source out): {adv.accuracy}")
    c.print(f"  evidence: {adv.evidence}")
    for r in adv.reasons:
        c.print(f"  • {r}")
    if args.explain:
        c.print("\nNearest measured comparisons (IM − IT held-out output loss; negative = IM better):")
        c.print(f"  {'source':<28} {'ratio':>6} {'n':>5} {'seeds':>5}  {'IM − IT':>8}  95% interval          measured")
        for r in near:
            c.print(f"  {r['source'][:28]:<28} {r['ratio']:>6.2f} {r['n']:>5} {r.get('seeds', 1):>5}  "
                    f"{r['im_minus_it']:>+8.4f}  [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  {r['measured']}")
        if not near:
            c.print("  (none: the table is empty)")
    return 0
