"""`imtune demo`: the main job on the bundled default — IT vs IM on a LIMA subset with SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

from imtune.config import DEFAULT_MODEL

# Sized for about 10 minutes on 2 CPU cores (see README); every value can be overridden with imtune compare.
# SmolLM2-135M trains at ~130 tokens/s in fp32 on 2 quiet cores (no fast bf16 here), hence the small sizes;
# with set-up and the one-time GGUF conversion a fresh `make demo` takes about 10 minutes.
DEMO = {"n_train": 40, "n_val": 24, "max_length": 192, "epochs": 2, "micro_batch_size": 4, "global_batch_size": 4,
        "lr": 1e-4, "memorisation_n": 8, "max_new_tokens": 48}


def add_parser(sub):
    p = sub.add_parser("demo", help="run the bundled demo: IT vs IM on a LIMA subset with SmolLM2-135M",
                       description="Runs imtune compare on the bundled LIMA data with the default model, sized to "
                                   "finish in about 10 minutes on 2 CPU cores, and prints where the report is.")
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
