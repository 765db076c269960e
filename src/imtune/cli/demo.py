"""`imtune demo`: the main job on the bundled default — IT vs IM on a LIMA subset with SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

from imtune.config import DEFAULT_MODEL

# Sized toward 3 minutes on 2 quiet CPU cores once installed and converted (measured: bench/RESULTS.md, "Demo"):
# training is most of it, so examples are cut to 128 tokens (29 of the 40 keep weighted tokens under both
# objectives) and trained in bf16 where the CPU has it (precision auto); the held-out set is larger than the
# training set's share because scoring is cheap (forward only) and it decides the verdict.
DEMO = {"n_train": 40, "n_val": 32, "max_length": 128, "epochs": 2, "micro_batch_size": 4, "global_batch_size": 4,
        "lr": 1e-4, "memorisation_n": 8, "max_new_tokens": 48}


def add_parser(sub):
    p = sub.add_parser("demo", help="run the bundled demo: IT vs IM on a LIMA subset with SmolLM2-135M",
                       description="Runs imtune compare on the bundled LIMA data with the default model, sized for "
                                   "a few minutes on 2 CPU cores, and prints where the report is.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo; rerun to resume)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    p.set_defaults(func=run)


def run(args) -> int:
    from imtune.analysis.compare import CompareConfig, run_compare
    from imtune.io_utils import prepare_output

    data = Path(__file__).resolve().parents[1] / "data" / "train" / "lima.jsonl"
    prepare_output(args.out, (data, args.model), kind="dir")
    cfg = CompareConfig(
        data=str(data), out=args.out, model=args.model, objectives=("it", "im"), n_train=DEMO["n_train"],
        n_val=DEMO["n_val"], evals=("loss", "memorisation"), memorisation_n=DEMO["memorisation_n"],
        max_new_tokens=DEMO["max_new_tokens"],
        train_overrides={k: DEMO[k] for k in ("max_length", "epochs", "micro_batch_size", "global_batch_size", "lr")})
    result = run_compare(cfg)
    print()
    print(result["verdict"]["headline"])
    print(f"Report: {Path(args.out).resolve() / 'report.html'}  (also report.md, results.json, plots/)")
    return 0
