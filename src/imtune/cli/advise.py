"""`imtune advise`: will IM help this data? A recommendation from a rule fitted to measured comparisons."""

from __future__ import annotations

import json
from pathlib import Path

from imtune import ranges
from imtune.cli.common import add_data, add_model, add_token_count_options, data_source, load_data_table

PILOT_OUTPUTS = ("plan.json", "pilot.json")  # the files advise --pilot writes at the top of its directory


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
    add_pilot_options(p)
    p.set_defaults(func=run)


def add_pilot_options(p) -> None:
    from imtune.analysis.pilot import PilotConfig
    from imtune.config import DEFAULT_PILOT_BUDGET_MIN

    d = PilotConfig(data="", out="")
    g = p.add_argument_group("measured pilot (--pilot): train IT and IM at a few small sizes on this data and "
                                 "extrapolate to its size; resumable (rerun the same command)")
    g.add_argument("--pilot", action="store_true", help="measure instead of predicting from the study table")
    g.add_argument("--per-source", action="store_true",
                   help="with --data CONFIG.yaml whose data: is a list of sources: a pilot per source, and which "
                        "objective to give each (im, it or cannot tell)")
    g.add_argument("--pilot-model", default=None, help="train this smaller model (same tokenizer) instead of --model")
    g.add_argument("--budget-min", type=ranges.BUDGET_MIN, default=DEFAULT_PILOT_BUDGET_MIN,
                   help="wall minutes on this machine, set-up and evaluation included; the plan is calibrated on the "
                        f"first run to fit them (default: {DEFAULT_PILOT_BUDGET_MIN:g})")
    g.add_argument("--n", dest="n_target", type=ranges.COUNT, default=None,
                   help="training examples you will train on (default: every record in --data)")
    g.add_argument("--out", default=None, help="pilot directory (default: runs/pilot-<data name>)")
    g.add_argument("--pilot-seeds", type=ranges.COUNT, default=d.seeds, help=f"seeds per size (default: {d.seeds})")
    g.add_argument("--pilot-heldout", type=ranges.COUNT, default=d.n_val,
                   help=f"held-out examples, the same at every size (default: {d.n_val})")
    g.add_argument("--pilot-sizes", default=None, help="comma-separated sizes instead of the planned ones")
    g.add_argument("--epochs", type=ranges.COUNT, default=d.epochs, help=f"training epochs (default: {d.epochs})")
    g.add_argument("--lr", type=ranges.LEARNING_RATE, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    g.add_argument("--batch", type=ranges.COUNT, default=d.batch, help=f"batch size (default: {d.batch})")
    g.add_argument("--precision", default=d.precision, help=f"training precision (default: {d.precision})")


def run(args) -> int:
    from imtune.analysis.advise import advise, evidence_rows, load_table, nearest_rows
    from imtune.errors import ImtuneError
    from imtune.models import load_tokenizer

    if args.pilot:
        return run_pilot_cli(args)
    given = [f for f, v in (("--per-source", args.per_source), ("--out", args.out)) if v]
    if given:  # would be ignored without --pilot: the user asked for a pilot (per source) or its directory
        raise ImtuneError(f"{given[0]} applies to the measured pilot; add --pilot")
    records = load_data_table(args)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    table = load_table(args.table)
    adv, stats = advise(records, tok, template=args.template, max_length=args.max_length,
                        evidence=args.evidence, table=table, cache=True)
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


def run_pilot_cli(args) -> int:
    from imtune.analysis.pilot import PilotConfig, run_pilot
    from imtune.errors import ImtuneError
    from imtune.io_utils import prepare_output

    try:
        sizes = tuple(int(x) for x in args.pilot_sizes.split(",")) if args.pilot_sizes else None
    except ValueError:
        raise ImtuneError(f"--pilot-sizes {args.pilot_sizes!r}: expected comma-separated integers") from None
    out = args.out or str(Path("runs") / f"pilot-{Path(args.data).stem}")
    sources = per_source_list(args) if args.per_source else []
    prepare_output(out, (args.data, args.model, args.pilot_model, *(s["path"] for s in sources)), kind="dir",
                   names=PILOT_OUTPUTS, overwrite=True)  # rerun to resume: the pilot's own files are its state
    cfg = PilotConfig(data=args.data, out=out, model=args.model, pilot_model=args.pilot_model,
                      n_target=args.n_target, budget_min=args.budget_min, seeds=args.pilot_seeds,
                      n_val=args.pilot_heldout, sizes=sizes, max_length=args.max_length, template=args.template,
                      epochs=args.epochs, lr=args.lr, batch=args.batch, precision=args.precision,
                      data_format=args.data_format, data_source=data_source(args), skip_invalid=args.skip_invalid)
    if args.per_source:
        from imtune.analysis.pilot import run_pilot_per_source

        r = run_pilot_per_source(cfg, sources)
        print(json.dumps(r, indent=2) if args.json else "\n".join(
            f"data[{k}] {s['path']}: objective {s['objective']} ({s['text']}; {s['pilot']})"
            for k, s in enumerate(r["sources"])))
        return 0
    r = run_pilot(cfg)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print("\n".join(pilot_lines(r)))
    return 0


def pilot_lines(r: dict) -> list[str]:
    """The pilot's call and every figure behind it."""
    e, c, p = r["extrapolation"], r["cost"], r["plan"]
    lines = [f"Pilot: {r['text']}", "  IM − IT held-out output loss (negative: IM better), per measured size:"]
    for s in e["per_size"]:
        lines.append(f"    n {s['n']:>5}  {s['seeds']} seeds × {s['n_heldout']} held-out  {s['mean']:+.4f} "
                     f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]{'  resolved' if s['resolved'] else ''}")
    f = e["fit"]
    lines += [f"  fitted: IM − IT = {f['a']:+.4f} {f['b']:+.4f}·ln n (weights: {f['weights']})",
              f"  at n {e['n_target']:,}: the line gives {e['delta']:+.4f} [{e['fitted_ci95'][0]:+.4f}, "
              f"{e['fitted_ci95'][1]:+.4f}] (extrapolated); the call needs the largest size's interval to exclude 0 "
              "and the line to keep its sign there",
              f"  cost: {c['wall_minutes']:.1f} wall minutes, {c['training_tokens']:,} training tokens "
              f"(planned {c['planned_minutes']:.1f} min / {c['planned_training_tokens']:,} tokens for a "
              f"{p['budget_s'] / 60:g}-minute budget; model trained: {r['trained_model']})",
              *([f"  this machine: ×{p['calibration']['k']:.2f} the cost model (measured on size "
                 f"{p['calibration']['sizes'][0]}); this pass took {c['pilot_wall_minutes']:.1f} wall minutes, "
                 "set-up included"] if p.get("calibration") and "pilot_wall_minutes" in c else []),
              f"  results: {Path(r['sizes'][0]['results']).parents[1] / 'pilot.json'} (add it to the advisor's "
              "evidence with --evidence)"]
    return lines


def per_source_list(args) -> list[dict]:
    """The sources of --data CONFIG.yaml (a training config, or any YAML, whose `data:` is a list)."""
    import yaml

    from imtune.config import data_sources
    from imtune.errors import ImtuneError

    path = Path(args.data)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        raise ImtuneError(f"--per-source: --data {args.data} must be a YAML file whose data: lists the sources")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ImtuneError(f"{path}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("data"), list):
        raise ImtuneError(f"{path}: --per-source needs data: to be a list of sources")
    return data_sources(d["data"], str(path))
