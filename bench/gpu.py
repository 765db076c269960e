"""One GPU benchmark, offline: imtune (its defaults; and `kernels: liger` + padding-free) vs TRL at its best, plus an
FSDP smoke run. Driven by `bench/gpu.sh`; see docs/TRAINING.md ("Training on a GPU").

Two steps, on two machines:

    .venv/bin/python bench/gpu.py --fetch-wheels     # here (PyPI reachable): wheels + model shape -> bench/wheels/
    bash bench/gpu.sh [--steps 20] [--sizes 135m,1.7b]   # on the GPU machine, with bench/wheels carried; no network

`--fetch-wheels` downloads, without dependencies, the wheels the GPU image lacks (`PINS`: trl, liger-kernel,
datasets and datasets' pure-python needs; torch, transformers, peft, accelerate, pandas, pyarrow are there) for
CPython 3.12, and copies the smollm2-135m alias's config and tokenizer (converted once from the bundled GGUF) into
`bench/wheels/models/`. The weights do not travel: the GGUF (98 MB) and its conversion (517 MB) exceed the 64 MiB
that goes to the GPU machine, so the models are that architecture (and, with `--sizes ...,1.7b`, SmolLM2-1.7B's
shape on the same tokenizer) initialised from a fixed seed, saved once, and loaded by both tools. Throughput and
memory are properties of the shape; the losses are a random model's, the same start for both tools.

Every run is its own subprocess (its own peak `torch.cuda.max_memory_allocated`), on the same examples (bundled
LIMA, imtune's tokenisation, imtune's length-grouped plan in order for TRL), the same sequence budget, micro-batch,
steps, optimizer and LR. TRL: `bf16=True`, `padding_free=True`, `use_liger_kernel=True` (its layer kernels; its
own fused head does the loss), `completion_only_loss=True` with a `completion_mask` from imtune's weights (> 0),
no gradient checkpointing. Tokens/s counts real tokens over steps 3..N (steps 1-2 pay Triton compilation and
allocation). The RESULTS.md section is written only from runs that finished; failures are listed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "bench" / "wheels"
SHAPES = WHEELS / "models"
LIMA = ROOT / "src" / "imtune" / "data" / "train" / "lima.jsonl"
FSDP_CONFIG = ROOT / "src" / "imtune" / "accelerate_configs" / "fsdp.yaml"
SECTION = "## GPU training throughput vs TRL"
RESULTS_JSON = ROOT / "bench" / "gpu_results.json"
SEED, LR, TEMPLATE = 42, 2e-5, "tulu"
SKIP_STEPS = 2  # not timed: Triton compilation, allocator warm-up
# What the GPU image lacks (docs: .library device KINDS.md); one version each, or pip stops the whole install.
PINS = {"trl": "1.16.0", "liger-kernel": "0.8.5", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")
# SmolLM2-1.7B's published shape (its config.json), on SmolLM2-135M's tokenizer.
LARGE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 32, "tie_word_embeddings": True}
RUNS = {"imtune-defaults": {}, "imtune-liger-padding-free": {"kernels": "liger", "padding_free": True},
        "imtune-no-kernels": {"kernels": "none"}}  # the last only on request: --runs ...,imtune-no-kernels
DEFAULT_RUNS = ("imtune-defaults", "imtune-liger-padding-free", "trl", "fsdp")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch-wheels", action="store_true", help="download the wheels and model shape (run here)")
    ap.add_argument("--check-wheels", action="store_true", help="exit 2 unless bench/wheels holds exactly PINS")
    ap.add_argument("--sizes", default="135m", help="comma-separated: 135m, 1.7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--objective", default="im")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of: {', '.join(RUNS)}, trl, "
                                                                   "fsdp")
    ap.add_argument("--budget-s", type=float, default=420.0, help="runs end by this many seconds (+20 s grace)")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--worker", nargs=2, metavar=("RUN", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in args.sizes.split(","):
        if name not in ("135m", "1.7b"):
            ap.error(f"--sizes: {name!r} is not 135m or 1.7b")
    for name in args.runs.split(","):
        if name not in (*RUNS, "trl", "fsdp"):
            ap.error(f"--runs: {name!r} is not one of {', '.join([*RUNS, 'trl', 'fsdp'])}")
    if args.steps <= SKIP_STEPS:
        ap.error(f"--steps must be > {SKIP_STEPS} (the first {SKIP_STEPS} are not timed)")
    return args


# ------------------------------------------------------------------------------------- wheels and model shape


def download_cmd(dest: Path, pins: dict = PINS) -> list[str]:
    plats = [x for p in PLATFORMS for x in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            TARGET_PYTHON, "--implementation", "cp", *plats, "-d", str(dest), *(f"{k}=={v}" for k, v in pins.items())]


def install_cmd(wheel_dir: Path, target: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, sorted(wheel_dir.glob("*.whl")))]


def _dist(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]  # wheel names escape '-' in the project name as '_'
    return name.lower().replace("_", "-"), version


def _fits_this_python(wheel: Path, version: tuple[int, int]) -> bool:
    """Whether a wheel's Python tag (py3, py2.py3, cp312, py312, ...) admits this interpreter."""
    want = {"py3", f"py{version[0]}{version[1]}", f"cp{version[0]}{version[1]}"}
    return any(t in want for t in wheel.name.split("-")[-3].split("."))


def check_wheels(wheel_dir: Path, pins: dict = PINS, python: tuple[int, int] = sys.version_info[:2]) -> list[str]:
    """What is wrong with `wheel_dir` for an offline install of `pins` on `python`: missing, extra versions, wrong
    versions, a wheel built for another Python (they are fetched for TARGET_PYTHON, the GPU image's)."""
    found: dict[str, list[str]] = {}
    problems = []
    for w in sorted(wheel_dir.glob("*.whl")):
        name, version = _dist(w)
        found.setdefault(name, []).append(version)
        if not _fits_this_python(w, python):
            problems.append(f"{w.name}: built for another Python than {python[0]}.{python[1]} (fetched for "
                            f"{TARGET_PYTHON}); run --fetch-wheels for this one")
    for name, version in pins.items():
        have = found.get(name, [])
        if not have:
            problems.append(f"{name}=={version}: no wheel in {wheel_dir}")
        elif len(have) > 1:
            problems.append(f"{name}: {len(have)} versions ({', '.join(have)}); keep one")
        elif have[0] != version:
            problems.append(f"{name}: wheel is {have[0]}, pinned {version}")
    return problems


def write_shape(src: Path, dest: Path) -> Path:
    """Copy a model directory's config and tokenizer (no weights) to `dest`, via a temporary name."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SHAPE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if not (tmp / "config.json").is_file():
        shutil.rmtree(tmp)
        raise FileNotFoundError(f"{src}: no config.json")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def fetch_wheels() -> None:
    from imtune.models import resolve_model

    WHEELS.mkdir(parents=True, exist_ok=True)
    subprocess.run(download_cmd(WHEELS), check=True)
    write_shape(Path(resolve_model("smollm2-135m")), SHAPES / "smollm2-135m")
    problems = check_wheels(WHEELS)
    if problems:
        sys.exit("; ".join(problems))
    size = sum(p.stat().st_size for p in WHEELS.rglob("*") if p.is_file()) / 2**20
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels + model shape, {size:.1f} MiB (must stay < 64)")


def materialise(shape: Path, size: str, dest: Path, seed: int = SEED) -> Path:
    """The benchmark model: `shape`'s architecture (LARGE's for 1.7b), fresh weights from `seed`, as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(shape))
    if size == "1.7b":
        for k, v in LARGE.items():
            setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for name in SHAPE_FILES:
        if name != "config.json" and (shape / name).is_file():
            shutil.copy2(shape / name, tmp / name)
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------------------------ the runs


def imtune_config(run: str, model_dir: str, data: str, out: str, a: argparse.Namespace) -> dict:
    return {"model": model_dir, "data": data, "out": out, "objective": a.objective, "template": TEMPLATE,
            "max_length": a.max_length, "micro_batch_size": a.micro_batch, "gradient_accumulation_steps": 1,
            "max_steps": a.steps, "lr": LR, "warmup_ratio": 0.0, "seed": SEED, "progress": False, "save_steps": 0,
            **RUNS[run]}


def trl_args(out: str, a: argparse.Namespace, use_cpu: bool = False):
    from trl import SFTConfig

    return SFTConfig(output_dir=out, max_length=None, per_device_train_batch_size=a.micro_batch,
                     gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=LR, warmup_steps=0,
                     lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, bf16=True, fp16=False,
                     gradient_checkpointing=False, padding_free=True, use_liger_kernel=True,
                     completion_only_loss=True, train_sampling_strategy="sequential", logging_steps=1,
                     save_strategy="no", report_to="none", dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
                     use_cpu=use_cpu)


def encoded(model_dir: str, a: argparse.Namespace):
    """imtune's examples and its epoch-0 plan (as the recipe builds them), for TRL's rows."""
    from imtune.masking.encoding import encode
    from imtune.models import load_tokenizer
    from imtune.records.loading import load_records
    from imtune.training.batching import plan_batches

    tok = load_tokenizer(model_dir)
    ex = encode(load_records(LIMA)[:a.steps * a.micro_batch], tok, a.objective, TEMPLATE, a.max_length)
    plan = plan_batches([len(e) for e in ex], a.micro_batch, seed=SEED, epoch=0, group_by_length=True, shuffle=True)
    return tok, ex, plan


@contextlib.contextmanager
def step_end_clock():
    """Yields the list of perf_counter readings at the end of each of imtune's optimizer steps (after the GPU has
    finished it) while training runs in the block."""
    import torch

    from imtune.training import recipe

    marks: list[float] = []
    real = recipe.Recipe.step

    def step(self, *args, **kw):
        row = real(self, *args, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return row

    recipe.Recipe.step = step
    try:
        yield marks
    finally:
        recipe.Recipe.step = real


def run_imtune(run: str, model_dir: str, tmp: Path, a: argparse.Namespace) -> dict:
    import imtune
    from imtune.records.loading import load_records

    data = tmp / "lima.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in load_records(LIMA)[:a.steps * a.micro_batch]))
    with step_end_clock() as marks:
        res = imtune.train(imtune_config(run, model_dir, str(data), str(tmp / "out"), a))
    timed = res.history[SKIP_STEPS:]
    c = res.config
    # Wall-clock between step ends, as TRL's is timed: logging and metrics writes between steps count too.
    return {"tokens": sum(r["tokens"] for r in timed), "seconds": marks[-1] - marks[SKIP_STEPS - 1],
            "losses": [r["loss"] for r in res.history], "step_tokens": [r["tokens"] for r in res.history],
            "settings": f"precision {c.precision}, kernels {c.kernels}, padding-free {c.padding_free}"}


def run_trl(model_dir: str, tmp: Path, a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    tok, ex, plan = encoded(model_dir, a)
    order = [i for mb in plan[:a.steps] for i in mb]
    rows = [{"input_ids": list(ex[i].input_ids), "completion_mask": [int(w > 0) for w in ex[i].weights]}
            for i in order]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=trl_args(str(tmp / "trl"), a), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    real: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        real.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    trainer.data_collator = counting  # the DataLoader is built from it at train() time
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kw):
            if torch.cuda.is_available():  # the step's kernels are done before the clock reads
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": sum(real[SKIP_STEPS:a.steps]), "seconds": marks[-1] - marks[SKIP_STEPS - 1],
            "losses": losses, "step_tokens": real[:a.steps],
            "settings": "bf16, padding_free, use_liger_kernel, completion_only_loss"}


def worker(run: str, model_dir: str, a: argparse.Namespace) -> None:
    import torch

    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="imtune-gpu-") as d:
        res = run_trl(model_dir, Path(d), a) if run == "trl" else run_imtune(run, model_dir, Path(d), a)
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(res), flush=True)


def spawn(run: str, model_dir: Path, a: argparse.Namespace, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", run, str(model_dir), "--steps", str(a.steps), "--max-length",
           str(a.max_length), "--micro-batch", str(a.micro_batch), "--objective", a.objective]
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"run": run, "failed": f"timed out after {timeout:.0f} s"}
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        tail = [x for x in p.stderr.splitlines() if x.strip()][-1:] or [f"exit {p.returncode}"]
        sys.stderr.write(p.stderr[-3000:])
        return {"run": run, "failed": tail[0][:300]}
    r = {"run": run, **json.loads(line[len("RESULT "):]), "wall_s": time.time() - t}
    r["tok_s"] = r["tokens"] / r["seconds"]
    return r


def fsdp_smoke(model_dir: Path, tmp: Path, timeout: float) -> dict:
    """`accelerate launch --config_file fsdp.yaml` on one GPU: 3 steps of `imtune train`."""
    data = tmp / "smoke.jsonl"
    shutil.copy2(LIMA, data)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "1", "-m", "imtune.cli.main",
           "train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp / "fsdp"), "--max-steps", "3",
           "--max-length", "512", "--micro-batch-size", "4", "--template", TEMPLATE, "--no-progress"]
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"run": "fsdp", "failed": f"timed out after {timeout:.0f} s"}
    metrics = tmp / "fsdp" / "final_metrics.json"
    if p.returncode or not metrics.is_file():
        tail = [x for x in p.stderr.splitlines() if x.strip()][-1:] or [f"exit {p.returncode}"]
        sys.stderr.write(p.stderr[-3000:])
        return {"run": "fsdp", "failed": tail[0][:300]}
    return {"run": "fsdp", "final": json.loads(metrics.read_text()), "wall_s": time.time() - t}


# ------------------------------------------------------------------------------------------------ driver


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
           "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "liger-kernel", "datasets", "accelerate", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _row(r: dict, trl: dict | None) -> str:
    if "failed" in r:
        return f"| {r['run']} | failed: {r['failed'].replace('|', '/')} | | | | | |"
    vs = f"{r['tok_s'] / trl['tok_s']:.2f}x" if trl else "n/a"
    diff = "n/a"
    if trl and r is not trl:
        pairs = list(zip(r["losses"], trl["losses"], strict=False))
        diff = f"{max(abs(x - y) / abs(y) for x, y in pairs):.2%}" if pairs else "n/a"
    same = "" if not trl or r is trl else (" (same batches)" if r["step_tokens"] == trl["step_tokens"]
                                           else " (DIFFERENT batches)")
    return (f"| {r['run']} | {r['settings']}{same} | {r['tok_s']:,.0f} | {vs} | {r['peak_gib']:.2f} GiB | "
            f"{r['losses'][-1]:.4f} | {diff} |")


def render(results: dict, env: dict, a: argparse.Namespace, when: str) -> str:
    """The RESULTS.md section, from what ran only: a failed or skipped run is named, never given a figure."""
    lines = [SECTION, "",
             f"{when} UTC; {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}, trl {env['trl']}, liger-kernel {env['liger-kernel']}, datasets "
             f"{env['datasets']}, accelerate {env['accelerate']}, peft {env['peft']}.", "",
             f"Objective {a.objective}, tulu template, bundled LIMA ({a.steps * a.micro_batch} examples), max length "
             f"{a.max_length}, micro-batch {a.micro_batch}, no accumulation, {a.steps} steps (tokens/s over steps "
             f"{SKIP_STEPS + 1}..{a.steps}), AdamW lr {LR:g} linear, clip 1.0; one process per run; peak = "
             "`torch.cuda.max_memory_allocated`. Models: SmolLM2-135M's architecture and tokenizer (from the bundled "
             "GGUF's conversion) and, for 1.7b, SmolLM2-1.7B's shape; weights from seed 42, identical for both "
             "tools (the GGUF's weights are too large to carry to the GPU machine). `bash bench/gpu.sh` regenerates "
             "this section.", ""]
    for size, runs in results["sizes"].items():
        trl = next((r for r in runs if r["run"] == "trl" and "failed" not in r), None)
        lines += [f"**{size}**", "", "| run | settings | tokens/s | vs TRL | peak GPU memory | final loss | "
                  "max step-loss diff vs TRL |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [_row(r, trl) for r in runs] + [""]
    for size in results.get("skipped", []):
        lines.append(f"* {size}: skipped (time budget {a.budget_s:.0f} s spent).")
    f = results.get("fsdp")
    if f is not None:
        lines.append("* FSDP smoke (`accelerate launch --config_file fsdp.yaml --num_processes 1`, 3 steps, 135m): "
                     + (f"failed: {f['failed']}" if "failed" in f else
                        f"ran, {f['final'].get('steps')} steps, final loss {f['final'].get('train_loss'):.4f}, "
                        f"{f['wall_s']:.0f} s with start-up."))
    return "\n".join(lines).rstrip("\n") + "\n"


def bench(a: argparse.Namespace) -> dict:
    """Every requested run in order: 135m's runs, the FSDP smoke, then 1.7b's, each started only while
    the time budget lasts and stopped at its end (plus a short grace), so the whole script ends in time."""
    t0 = time.time()
    shape, runs = SHAPES / "smollm2-135m", a.runs.split(",")

    def left() -> float:
        return a.budget_s - (time.time() - t0)

    results: dict = {"sizes": {}, "skipped": [], "fsdp": None}
    with tempfile.TemporaryDirectory(prefix="imtune-gpu-models-") as d:
        for size in a.sizes.split(","):
            if left() <= 0:
                results["skipped"].append(size)
                continue
            model_dir = materialise(shape, size, Path(d) / size)
            done = []
            for run in (r for r in runs if r != "fsdp"):
                done.append(spawn(run, model_dir, a, timeout=left() + 20) if left() > 0 else
                            {"run": run, "failed": "skipped: time budget spent"})
                print(json.dumps(done[-1])[:400], flush=True)
            results["sizes"][size] = done
            if size == "135m" and "fsdp" in runs and left() > 60:
                results["fsdp"] = fsdp_smoke(model_dir, Path(d), timeout=left() + 20)
                print(json.dumps(results["fsdp"])[:400], flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
        if "fsdp" in runs and results["fsdp"] is None and left() > 60:
            small = materialise(shape, "135m", Path(d) / "fsdp-model")
            results["fsdp"] = fsdp_smoke(small, Path(d), timeout=left() + 20)
    return results


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.fetch_wheels:
        fetch_wheels()
        return
    if a.check_wheels:
        problems = check_wheels(WHEELS) + ([] if (SHAPES / "smollm2-135m" / "config.json").is_file() else
                                           [f"{SHAPES / 'smollm2-135m'}: no model shape"])
        if problems:
            print(f"bench/wheels: {'; '.join(problems)} (run `.venv/bin/python bench/gpu.py --fetch-wheels` where "
                  "PyPI is reachable)", file=sys.stderr)
            sys.exit(2)
        return
    if a.worker:
        worker(a.worker[0], a.worker[1], a)
        return
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (it benchmarks GPU training)", file=sys.stderr)
        sys.exit(2)
    when = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    results = bench(a)
    env = versions()
    text = render(results, env, a, when)
    tmp = RESULTS_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"when": when, "env": env, "args": vars(a), **results}, indent=1))
    tmp.replace(RESULTS_JSON)
    print(text)
    if not a.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
