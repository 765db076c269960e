"""`imtune export`: the tokenised, weighted set for TRL, HF Trainer, Axolotl or LLaMA-Factory (imtune.hf.export)."""

from __future__ import annotations

import sys

from imtune.cli.common import add_data, add_model, add_objective, data_source


def add_parser(sub):
    p = sub.add_parser("export", help="write the tokenised, weighted data for TRL / HF Trainer / Axolotl / LLaMA-Factory",
                       description="Tokenise --data with --model's tokenizer under --objective, as imtune train does, and "
                                   "write DIR/train.parquet and DIR/dataset (input_ids, attention_mask, labels, "
                                   "loss_weights), labels-only copies, and DIR/README.md on how to train with each "
                                   "tool (docs/INTEGRATIONS.md).")
    add_data(p)
    add_model(p)
    add_objective(p)
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--allow-special-tokens-in-content", dest="allow_special_tokens_in_content", action="store_true",
                   help="encode special-token text typed inside messages as the special token instead of stopping")
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.cli.common import _note_skipped
    from imtune.hf.export import FRACTIONAL_NOTE, check_out, export_dataset
    from imtune.masking.objectives import parse_objective
    from imtune.models import load_tokenizer

    parse_objective(args.objective)
    check_out(args.out, args.overwrite, (args.data, args.model))  # before loading anything
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    out, info = export_dataset(args.data, tok, args.out, args.objective, overwrite=args.overwrite, model=args.model,
                               template=args.template, max_length=args.max_length,
                               truncation_side=args.truncation_side, format=args.data_format,
                               skip_invalid=args.skip_invalid,
                               allow_special_tokens_in_content=args.allow_special_tokens_in_content,
                               **data_source(args))
    _note_skipped(info.skipped, args.data)
    print(f"imtune export: {info.n_examples} examples, {info.n_tokens} tokens ({info.n_weighted} weighted) -> {out}",
          file=sys.stderr)
    if info.report.n_dropped:
        print(f"imtune export: {info.report.n_dropped} example(s) dropped: no token with non-zero weight",
              file=sys.stderr)
    if info.fractional:
        print("imtune export: note: " + FRACTIONAL_NOTE.format(objective=args.objective), file=sys.stderr)
    return 0
