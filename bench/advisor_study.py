"""The advisor's evidence: `imtune compare` (it vs im) over a grid of training sets × sizes × seeds.

    python bench/advisor_study.py                      # 5 sources × sizes 8,16,32 × 2 seeds (~40 min, bf16)
    python bench/advisor_study.py --model smollm2-135m --table-only     # rebuild the table from finished cells

Sources: the bundled LIMA, Alpagasus-Dolly-3k and Code-Alpaca-2k, plus the instruction-heavy and output-heavy
halves of Dolly (split at the median per-example instruction/output token ratio), so the ratio also varies within
one source. Each source keeps only the examples that fit --max-length whole (short sequences keep the study cheap,
and truncation never decides what an objective sees), so a source's ratio here is that of its short examples. Every cell is one `imtune compare` directory under --out (default runs/advisor_study/<source>/n<N>);
the held-out examples of a source are the same for every size (the split is nested). The grid runs seed by seed
(first every cell with one seed, then every cell again with two, reusing the first), so an interrupted study still
leaves a balanced table; rerunning resumes where it stopped.

After every cell the outcome table is rewritten (atomically) to --table (default: the package data file
src/imtune/data/advisor/study.json that `imtune advise` fits its rule to): one row per cell with its inputs
(source, instruction/output ratio, n, template, model) and outputs (held-out output loss IM − IT with its 95%
interval over seeds and held-out examples), plus the machine, library versions, date and settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "imtune" / "data" / "train"
TABLE = ROOT / "src" / "imtune" / "data" / "advisor" / "study.json"
SOURCES = {"lima": "lima.jsonl", "dolly": "alpagasus_dolly_3k.jsonl", "code-alpaca": "code_alpaca_2k.json"}
HALVES = ("dolly-instruction-heavy", "dolly-output-heavy")
TEMPLATE_MARGIN = 24  # tokens of chat-template markup allowed for when choosing examples that fit whole


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def _lengths(tokenizer, r) -> tuple[int, int]:
    instr = sum(len(tokenizer(m.content)["input_ids"]) for m in r.messages if m.role != "assistant")
    outp = sum(len(tokenizer(m.content)["input_ids"]) for m in r.messages if m.role == "assistant")
    return instr, outp


def prepare_sources(tokenizer, out: Path, max_length: int, names: list[str]) -> dict[str, Path]:
    """Each source restricted to the examples that fit `max_length` whole (content tokens plus a template margin),
    so truncation never decides what an objective sees; Dolly's fitting examples are also split at their median
    per-example instruction/output token ratio into an output-heavy and an instruction-heavy half."""
    from imtune.io_utils import atomic_write_jsonl
    from imtune.records.loading import load_dataset

    paths = {n: out / f"{n}.jsonl" for n in names}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    budget = max_length - TEMPLATE_MARGIN
    for name in {n.split("-")[0] if n in HALVES else n for n in names}:
        recs = load_dataset(DATA / SOURCES[name], skip_invalid=True).records
        lens = [_lengths(tokenizer, r) for r in recs]
        fit = [(r, a / max(b, 1)) for r, (a, b) in zip(recs, lens, strict=True) if b > 0 and a + b <= budget]
        if name in paths:
            atomic_write_jsonl(paths[name], (r.to_dict() for r, _ in fit), own=False)
        if name == "dolly" and any(h in paths for h in HALVES):
            ranked = [r for r, _ in sorted(fit, key=lambda t: t[1])]
            half = len(ranked) // 2
            atomic_write_jsonl(out / "dolly-output-heavy.jsonl", (r.to_dict() for r in ranked[:half]), own=False)
            atomic_write_jsonl(out / "dolly-instruction-heavy.jsonl", (r.to_dict() for r in ranked[half:]), own=False)
    return paths


def compare_args(args, data: Path, out: Path, n: int, seeds: int) -> list[str]:
    argv = ["compare", "--data", str(data), "--objectives", "it,im", "--out", str(out), "--model", args.model,
            "--n-train", str(n), "--n-val", str(args.n_val), "--seeds", str(seeds), "--eval", "loss",
            "--max-length", str(args.max_length), "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--micro-batch-size", str(args.batch), "--global-batch-size", str(args.batch),
            "--eval-batch-size", "8", "--precision", args.precision, "--skip-invalid", "--no-progress"]
    if args.template:
        argv += ["--template", args.template]
    return argv


def cell_row(source: str, n: int, out: Path) -> dict | None:
    p = out / "results.json"
    if not p.exists():
        return None
    r = json.loads(p.read_text())
    v = r["verdict"]
    d = v.get("im_minus_it")
    if not d or d.get("mean") is None:
        return None
    timing = json.loads((out / "study_time.json").read_text()) if (out / "study_time.json").exists() else {}
    return {"source": source, "n": r["split"].get("n_train_common", r["split"]["n_train"]),
            "n_requested": n, "ratio": r["stats"]["instruction_output_ratio"],
            "template": r["train_config"]["template"], "model": r["config"]["model"],
            "n_heldout": d["n"], "seeds": d["n_seeds"], "im_minus_it": d["mean"], "ci95": d["ci95"],
            "per_seed": d["per_seed"], "resolved": d["resolved"], "measured": v["measured_im_vs_it"],
            "heldout_it": v["heldout_loss_mean"]["it"], "heldout_im": v["heldout_loss_mean"]["im"],
            "seconds": timing.get("seconds")}


def write_table(args, cells: list[tuple[str, int, Path]], started: str) -> dict:
    import torch
    import transformers

    from imtune import __version__
    from imtune.io_utils import atomic_write_json

    rows = [row for c in cells if (row := cell_row(*c)) is not None] + _kept_rows(Path(args.table))
    started = _first_start(Path(args.table), Path(args.out), started)
    table = {
        "meta": {"date": datetime.date.today().isoformat(), "started": started,
                 "machine": f"{cpu_name()}, {_cores()} cores, niceness {_niceness()}",
                 "python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "imtune": __version__, "model": args.model,
                 "grid": {"sources": [c for c in args.sources.split(",")], "sizes": args.sizes,
                          "seeds": args.seeds, "objectives": "it,im"},
                 "settings": {"examples": f"only those whose content fits {args.max_length} - {TEMPLATE_MARGIN} tokens",
                              "max_length": args.max_length, "epochs": args.epochs, "lr": args.lr,
                              "batch": args.batch, "n_heldout": args.n_val, "template": args.template or "default",
                              "precision": _precision(args.precision)},
                 "outcome": "held-out output loss of IM minus IT (negative: IM better); 95% interval from a two-way "
                            "bootstrap over training seeds and held-out examples",
                 "cells_planned": len(cells), "cells_done": sum(not r.get("provenance") for r in rows),
                 "command": "python bench/advisor_study.py " + " ".join(sys.argv[1:]), "out": str(args.out)},
        "rows": rows,
    }
    atomic_write_json(Path(args.table), table, own=False)
    return table


def _kept_rows(table: Path) -> list[dict]:
    """Rows another script added with their provenance (bench/advisor_check.py's pilot rows): not this study's
    cells, so a rewrite keeps them."""
    try:
        return [r for r in json.loads(table.read_text())["rows"] if r.get("provenance")]
    except (OSError, ValueError, KeyError):
        return []


def _first_start(table: Path, out: Path, started: str) -> str:
    """A resumed study keeps the start of its first sitting (the table says when its earliest cell began)."""
    try:
        meta = json.loads(table.read_text())["meta"]
    except (OSError, ValueError, KeyError):
        return started
    same = meta.get("out", str(out)) == str(out) and meta.get("cells_done", 0) > 0
    return min(meta.get("started", started), started) if same else started


def _precision(requested: str) -> str:
    """What the runs trained in, as compare resolves it on this machine."""
    from imtune.analysis.compare import eval_precision

    used = eval_precision(requested)
    return used if used == requested else f"{used} ({requested})"


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _niceness() -> int:
    import os

    return os.nice(0)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sources", default=",".join([*SOURCES, *HALVES]))
    ap.add_argument("--sizes", default="8,16,32", help="training-set sizes (comma-separated)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n-val", type=int, default=32, help="held-out examples per source (the same for every size)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--template", default=None, help="chat template (default: imtune's default)")
    ap.add_argument("--precision", default="auto", help="training precision (auto: bf16 where the CPU has it)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "advisor_study"))
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from finished cells")
    ap.add_argument("--keep-weights", action="store_true", help="keep each run's weights and checkpoints")
    ap.add_argument("--deadline", default=None, help="UTC time HH:MM after which no new cell is started")
    return ap.parse_args(argv)


def _past(deadline: str | None) -> bool:
    if not deadline:
        return False
    now = datetime.datetime.now(datetime.UTC)
    h, m = (int(x) for x in deadline.split(":"))
    return (now.hour, now.minute) >= (h, m)


def main(argv=None) -> int:
    args = parse(argv)
    from imtune.cli.main import main as cli
    from imtune.models import load_tokenizer

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes")
    root = Path(args.out)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    sizes = [int(x) for x in str(args.sizes).split(",")]
    files = prepare_sources(load_tokenizer(args.model), root / "sources", args.max_length, sources)
    cells = [(s, n, root / s / f"n{n}") for n in sizes for s in sources]
    if args.table_only:
        write_table(args, cells, started)
        return 0
    # Size by size, and within a size seed by seed, so an interrupted study leaves whole sizes with both seeds.
    order = [(k, c) for n in sizes for k in range(1, args.seeds + 1) for c in cells if c[1] == n]
    for k, (source, n, out) in order:
        if _past(args.deadline):
            print(f"[advisor study] deadline {args.deadline} UTC reached; table has the finished cells",
                  file=sys.stderr)
            write_table(args, cells, started)
            return 0
        t0 = time.time()
        rc = cli(compare_args(args, files[source], out, n, k))
        if rc:
            print(f"[advisor study] {source} n={n}: compare failed (exit {rc}); cell left out", file=sys.stderr)
            continue
        _add_time(out, k, time.time() - t0)
        if not args.keep_weights:
            prune(out)
        write_table(args, cells, started)
    return 0


def prune(cell: Path) -> None:
    """Free the disk a finished, evaluated run no longer needs (its checkpoints and weights; a rerun reuses the
    cached evaluations and never loads them). Only files imtune wrote inside the study's own directory."""
    import shutil

    for run in (cell / "runs").glob("*"):
        if (run / "compare_done.json").exists() and (run / "eval" / "loss_heldout.json").exists():
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            for w in run.glob("*.safetensors"):
                w.unlink()


def _add_time(out: Path, seeds: int, seconds: float) -> None:
    """Wall time of the cell so far (a resumed pass that reused everything adds almost nothing)."""
    from imtune.io_utils import atomic_write_json

    p = out / "study_time.json"
    old = json.loads(p.read_text()) if p.exists() else {}
    atomic_write_json(p, {"seconds": round(old.get("seconds", 0.0) + seconds, 1), "seeds": seeds}, own=False)


if __name__ == "__main__":
    raise SystemExit(main())
