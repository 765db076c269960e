"""`imtune stats`: instruction vs output token lengths, their ratio, and what truncation would do."""

from __future__ import annotations

import json

from imtune.cli.common import add_data, add_model, add_token_count_options, load_data_table


def add_parser(sub):
    p = sub.add_parser("stats", help="token statistics of a dataset: instruction vs output lengths and their ratio",
                       description="Token counts of instructions (system + user content) vs outputs (assistant "
                                   "content), mean/median/p95, their ratio (the paper's key factor for IM), and how "
                                   "many examples --max-length would cut or drop.")
    add_data(p)
    add_model(p)
    add_token_count_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.analysis.stats import dataset_stats
    from imtune.models import load_tokenizer

    records = load_data_table(args)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    s = dataset_stats(records, tok, template=args.template, max_length=args.max_length, cache=True)
    s["data"], s["model"] = str(args.data), args.model
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print_stats(s)
    return 0


def print_stats(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{s['data']}[/bold] · {s['examples']} examples · {s['turns']['total']} assistant turns "
            f"({s['turns']['multi_turn_examples']} multi-turn) · tokenizer {s['model']} · template {s['template']}")
    t = Table("tokens per example", "mean", "median", "p95", "max", "total")
    for key, label in (("instruction_tokens", "instruction (system+user)"), ("output_tokens", "output (assistant)"),
                       ("template_tokens", "template markup"), ("total_tokens", "whole example")):
        d = s[key]
        t.add_row(label, f"{d['mean']:.1f}", f"{d['median']:.0f}", f"{d['p95']:.0f}", str(d["max"]), str(d["total"]))
    c.print(t)
    c.print(f"instruction/output ratio (mean/mean): [bold]{s['instruction_output_ratio']:.3f}[/bold]   "
            f"median per-example ratio: {s['median_example_ratio']:.3f}")
    mw = s.get("message_weights")
    if mw:
        c.print(f"message weights from the data: {mw['examples_with_weights']} example(s) carry them; "
                f"{mw['messages_weighted']} message(s) weighted != 1, {mw['messages_weight_zero']} at 0 "
                f"({mw['tokens_weight_zero']} token(s) within --max-length take no loss from them)")
    tr = s.get("truncation")
    if tr:
        c.print(f"--max-length {tr['max_length']}: truncates {tr['truncated']} example(s); drops "
                f"{tr['dropped_it']} under it, {tr['dropped_im']} under im (no weighted token left)")
