"""`imtune compare`: one model per objective, identical everything else, evaluated and reported."""

from __future__ import annotations

import argparse

from imtune import ranges
from imtune.cli.common import add_data, data_source
from imtune.config import DEFAULT_MODEL, add_config_arguments

# Fields compare owns itself (or sets per run); every other TrainConfig field is a flag here too.
OWN = ("data", "data_split", "data_config", "data_revision", "data_format", "skip_invalid", "objective", "out",
       "val_data", "val_fraction", "resume", "overwrite", "seed", "model")


# The files compare writes at the top of --out (the split's own files are checked by make_split, the plots when
# written).
OUTPUTS = ("results.json", "advice.json", "report.md", "report.html")

def add_parser(sub):
    p = sub.add_parser(
        "compare", help="train IT vs IM (or any objectives) on the same data and write a report with the verdict",
        description="Splits off a held-out set, trains one model per objective with identical seed, data order and "
                    "hyper-parameters, evaluates each (held-out and train output loss, memorisation BLEU, optional "
                    "benchmarks) and writes report.html, report.md, results.json and plots. A rerun reuses finished "
                    "runs and evaluations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  imtune compare --data lima.jsonl --objectives it,im --n-train 200 --max-length 512 "
               "--epochs 2 --out runs/lima-cmp")
    p.add_argument("config", nargs="?", default=None, help="optional training YAML (see imtune train)")
    add_data(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to fine-tune (default: {DEFAULT_MODEL})")
    p.add_argument("--objectives", default="it,im", help="comma-separated objectives in any order, named as you "
                                                         "write them in the verdict (default: it,im)")
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--val-data", default=None, help="held-out data file (default: split off --val-fraction)")
    p.add_argument("--val-fraction", type=ranges.FRACTION, default=0.1, help="fraction held out when no --val-data "
                                                                   "(default: 0.1)")
    p.add_argument("--n-train", type=ranges.COUNT, default=None, help="use only this many training examples (after the "
                                                             "held-out split)")
    p.add_argument("--n-val", type=ranges.COUNT, default=None, help="use only this many held-out examples")
    p.add_argument("--seed", type=ranges.SEED, default=42, help="seed for the split, initialisation and data order")
    p.add_argument("--seeds", type=ranges.COUNT, default=1,
                   help="train every objective with this many seeds (--seed, --seed+1, ...) on the same split; the "
                        "verdict's interval then covers run-to-run variation too (default: 1)")
    p.add_argument("--eval", dest="evals", default="loss,memorisation",
                   help="comma-separated: loss, memorisation, and benchmark tasks (see imtune evaluate --tasks "
                        "list); default: loss,memorisation")
    p.add_argument("--eval-limit", type=ranges.COUNT, default=50, help="examples per benchmark task (default: 50)")
    p.add_argument("--memorisation-n", type=ranges.COUNT, default=32,
                   help="training examples to generate on for memorisation BLEU (default: 32)")
    p.add_argument("--max-new-tokens", type=ranges.COUNT, default=128, help="generation length for memorisation "
                                                                   "(default: 128)")
    p.add_argument("--eval-batch-size", type=ranges.COUNT, default=8, help="batch size for evaluation (default: 8)")
    train = p.add_argument_group("training options (same as imtune train; applied to every run)")
    add_config_arguments(train, exclude=OWN)
    p.set_defaults(func=run)


def config_from_args(args):
    from dataclasses import fields

    from imtune.analysis.compare import CompareConfig
    from imtune.cli.train import resolve_config_path
    from imtune.config import TrainConfig

    overrides = {}
    if args.config:
        overrides.update(TrainConfig.from_yaml(resolve_config_path(args.config)).to_dict())
        for k in OWN:
            overrides.pop(k, None)
    names = {f.name for f in fields(TrainConfig)} - set(OWN)
    overrides.update({k: v for k, v in vars(args).items() if k in names})
    return CompareConfig(
        data=args.data, out=args.out, model=args.model,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
        val_data=args.val_data, val_fraction=args.val_fraction, n_train=args.n_train, n_val=args.n_val,
        seed=args.seed, seeds=args.seeds, evals=tuple(e.strip() for e in args.evals.split(",") if e.strip()),
        eval_limit=args.eval_limit, memorisation_n=args.memorisation_n, max_new_tokens=args.max_new_tokens,
        eval_batch_size=args.eval_batch_size, train_overrides=overrides, data_format=args.data_format,
        skip_invalid=args.skip_invalid, data_source=data_source(args))


def run(args) -> int:
    from imtune.analysis.compare import run_compare
    from imtune.io_utils import prepare_output

    # Never write over an input: compare writes data/train.jsonl and data/heldout.jsonl under --out. A rerun
    # resumes: the files compare wrote are its state (overwrite), one it did not write is refused.
    out = prepare_output(args.out, (args.data, args.val_data, args.model), kind="dir", names=OUTPUTS,
                         overwrite=True)
    created = not out.exists()
    try:
        result = run_compare(config_from_args(args))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # failed before writing anything (bad data): leave no empty directory behind
        raise
    print(result["verdict"]["headline"])
    print(f"report: {args.out}/report.html")
    return 0
