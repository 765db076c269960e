"""`imtune plot`: the paper's Figure 3 from `imtune loss` outputs — per-example loss distributions of several models."""

from __future__ import annotations

import sys

from imtune.cli.common import add_overwrite
from imtune.errors import ImtuneError


def add_parser(sub):
    p = sub.add_parser("plot", help="plot per-example loss distributions of several `imtune loss` outputs",
                       description="Overlays the per-example loss distributions written by `imtune loss` (e.g. IT "
                                   "and IM models on train and held-out data) with each mean as a dashed line.",
                       epilog="example: imtune plot it_train.jsonl it_test.jsonl im_train.jsonl im_test.jsonl "
                              "--labels 'IT train,IT held-out,IM train,IM held-out' --out fig3")
    p.add_argument("losses", nargs="+", help="JSONL files written by imtune loss (rows with a 'loss' field)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels (default: file names)")
    p.add_argument("--title", default="Per-example output loss", help="figure title")
    p.add_argument("--out", default="loss_distributions", help="output path without suffix: writes .png and .svg")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from imtune.analysis.plots import figure_paths, plot_loss_distributions
    from imtune.evaluation.loss_probe import summarise
    from imtune.inputs import read_jsonl_rows
    from imtune.io_utils import prepare_output

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [Path(f).stem for f in args.losses]
    if len(labels) != len(args.losses):
        raise ImtuneError(f"--labels has {len(labels)} names for {len(args.losses)} files")
    for path in figure_paths(args.out):
        prepare_output(path, args.losses, example="loss_distributions.png", overwrite=args.overwrite)
    series = {}
    for label, f in zip(labels, args.losses, strict=True):
        rows = read_jsonl_rows(f, {"loss": (int, float)}, what="loss rows")
        series[label] = [float(r["loss"]) for r in rows]
        s = summarise(series[label])
        print(f"{label}: n={s['n']} mean={s['mean']:.4f} 95% CI [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]")
    png, svg = plot_loss_distributions(series, args.out, title=args.title)
    print(f"wrote {png} and {svg}", file=sys.stderr)
    return 0
