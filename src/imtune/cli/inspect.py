"""`imtune inspect`: every token of an example, coloured by segment and loss weight."""

from __future__ import annotations

import sys

from imtune import ranges
from imtune.cli.common import add_data, add_model, add_objective, add_overwrite, load_data
from imtune.errors import ImtuneError


def add_parser(sub):
    p = sub.add_parser("inspect", help="show which tokens carry loss under an objective",
                       description="Render examples exactly as they will be trained: each token with its segment "
                                   "(system, user, assistant, template, eos) and loss weight.")
    add_data(p)
    add_model(p)
    add_objective(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index", type=ranges.INDEX, default=None, help="show only the example at this 0-based index")
    g.add_argument("--n", type=ranges.COUNT, default=1, help="show the first N examples (default: 1)")
    p.add_argument("--format", dest="out_format", choices=["text", "json", "html"], default="text",
                   help="text (coloured terminal view), json (per-token rows), html (self-contained page)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout (json/html)")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.io_utils import atomic_write_text, prepare_output
    from imtune.masking.encoding import encode_with_report
    from imtune.masking.objectives import parse_objective
    from imtune.masking.token_view import print_rich, to_html, to_json
    from imtune.models import load_tokenizer

    obj = parse_objective(args.objective)
    if args.out:
        prepare_output(args.out, (args.data, args.model), example=f"tokens.{args.out_format}",
                       overwrite=args.overwrite)
    records = load_data(args)
    if args.index is not None:
        if not 0 <= args.index < len(records):
            raise ImtuneError(f"--index {args.index} out of range: {args.data} has {len(records)} valid records")
        records = [records[args.index]]
    else:
        records = records[: args.n]
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    enc, rep = encode_with_report(records, tok, obj, args.template, args.max_length, args.truncation_side,
                                  keep_empty=True)
    if args.out_format == "text":
        print_rich(enc, tok, obj.spec)
        return 0
    text = to_json(enc, tok, obj.spec) if args.out_format == "json" else to_html(enc, tok, obj.spec)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0
