"""`imtune advise`: will IM help this data? Figures, placement on the paper's axes, recommendation, reasons."""

from __future__ import annotations

import json

from imtune.cli.common import add_data, add_model, load_data
from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE


def add_parser(sub):
    p = sub.add_parser("advise", help="before training: recommend it, im or weighted:λ for a dataset, with reasons",
                       description="Measures the instruction/output token-length ratio and dataset size — the two "
                                   "factors the IM paper found to drive IM's gain — and recommends an objective, "
                                   "with the figures behind it.")
    add_data(p)
    add_model(p)
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"template used for token counts (default: {DEFAULT_TEMPLATE})")
    p.add_argument("--max-length", dest="max_length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"report examples this length would truncate/drop (default: {DEFAULT_MAX_LENGTH})")
    p.add_argument("--json", action="store_true", help="print JSON (advice + statistics)")
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.analysis.advise import advise
    from imtune.models import load_tokenizer

    records = load_data(args)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    adv, stats = advise(records, tok, template=args.template, max_length=args.max_length)
    if args.json:
        print(json.dumps({"advice": adv.to_dict(), "stats": stats}, indent=2))
        return 0
    from rich.console import Console

    c = Console()
    c.print(f"[bold]Recommendation: --objective {adv.recommendation}[/bold] "
            f"({adv.confidence}; predicted: {adv.predicted_im_minus_it})")
    c.print(f"  ratio axis: {adv.ratio:.2f} → {adv.ratio_level}    size axis: {adv.examples:,} → {adv.size_level}")
    for r in adv.reasons:
        c.print(f"  • {r}")
    return 0
