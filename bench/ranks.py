"""Host memory across ranks: the peak summed RSS of a training run's whole process tree (launcher and workers,
psutil, sampled every 50 ms) with 1, 2 and 3 processes, for LoRA and full fine-tuning, next to the size of the
weights on disk; plus each process' AdamW state (its shard under FSDP). Writes the "Host memory across ranks"
section of bench/RESULTS.md.

    .venv/bin/python bench/ranks.py                     # FSDP (fsdp_cpu.yaml); 1, 2, 3 processes; lora, full
    .venv/bin/python bench/ranks.py --configs fsdp_cpu,deepspeed_zero3 --ranks 1,3 --modes lora

The model is a config-built Llama of 0.61B parameters with random weights, saved once as fp32 safetensors
(`--model-dir`, built when missing). Each run: 2 optimizer steps of one micro-batch (<= 64 tokens) per process,
the final save included. An accelerate config is taken by name from src/imtune/accelerate_configs/ and skipped with
a note when it is not there. Runs are sequential, and each waits for 10 GB of available memory (the machine may be
shared) or is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402  (a sibling script, not a package)

SECTION = "## Host memory across ranks"
CONFIGS = ROOT / "src" / "imtune" / "accelerate_configs"
SHAPE = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False)
NEED_GB = 10.0
# Runs inside each process: trains through the recipe, then reports that process' optimizer state and parameters.
DRIVER = """
import json, sys, torch
from imtune.config import TrainConfig
from imtune.training.recipe import Recipe

def local(t):
    return getattr(t, "_local_tensor", t)

r = Recipe(TrainConfig.coerce(json.loads(sys.argv[1])).validate())
r.set_up()
r.start()
r.train_loop()
opt = getattr(r.optimizer, "optimizer", r.optimizer)
state = sum(local(v).nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
params = sum(local(p).nbytes for p in r.model.parameters())
print("RANK-STATS " + json.dumps({"rank": r.rank, "optimizer_bytes": state, "param_bytes": params}), flush=True)
r.save()
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--configs", default="fsdp_cpu", help="accelerate configs by name (deepspeed_zero3, ...)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache" / "imtune-bench" / "llama-0.61b-fp32"))
    ap.add_argument("--out", default=None, help="RESULTS.md to update (default bench/RESULTS.md)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--reuse", default=None, help="this script's earlier stdout: its measured rows are kept, not rerun")
    return ap.parse_args(argv)


def build_model(d: Path) -> None:
    """The config-built Llama, random weights (N(0, 0.02)), fp32 safetensors; a tiny BPE tokenizer."""
    if (d / "model.safetensors").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tiny_tokenizer

    tmp = d.with_name(d.name + ".tmp")
    tok = make_tiny_tokenizer(tmp)
    cfg = LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb.__init__(cfg)  # to_empty left the rotary table uninitialised
    model.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(d)


def write_data(path: Path, n: int = 12) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Item {i}: summarise the following text. " * 2},
                          {"role": "assistant", "content": "The quick brown fox. " * (1 + i % 3)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tree_peak(cmd: list[str], env: dict, log: Path) -> tuple[int, float, int]:
    """(peak of the summed RSS of `cmd`'s process tree in bytes, wall seconds, exit code)."""
    import psutil

    t0, peak = time.time(), 0
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.05)
    return peak, time.time() - t0, proc.wait()


def wait_for_memory(timeout: float = 300) -> bool:
    import psutil

    t0 = time.time()
    while psutil.virtual_memory().available < NEED_GB * 1e9:
        if time.time() - t0 > timeout:
            return False
        time.sleep(10)
    return True


def run_one(n: int, mode: str, config: str | None, model: Path, data: Path, work: Path, steps: int) -> dict:
    from tests.launching import env as launch_env
    from tests.launching import free_port

    name = f"{mode}-{n}p-{config or 'single'}"
    cfg = dict(model=str(model), data=str(data), template="chatml", max_length=64, micro_batch_size=1,
               global_batch_size=n, max_steps=steps, lora=mode == "lora", lora_dropout=0.0, progress=False,
               checkpoints=False, overwrite=True, precision="fp32", out=str(work / name))
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    target = [str(driver), json.dumps(cfg)]
    if n == 1:
        cmd = [sys.executable, *target]
    else:
        exe = Path(sys.executable).with_name("accelerate")
        cmd = [str(exe), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", str(n),
               "--main_process_port", str(free_port()), *target]
    if not wait_for_memory():
        return {"name": name, "n": n, "mode": mode, "config": config, "skipped": f"less than {NEED_GB:g} GB free"}
    env = {**launch_env(), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    log = work / f"{name}.log"
    peak, wall, rc = tree_peak(cmd, env, log)
    # The processes share one stdout: their lines may interleave, so each report is found by its own braces.
    stats = [json.loads(m) for m in re.findall(r"RANK-STATS (\{[^{}]*\})", log.read_text(errors="replace"))]
    row = {"name": name, "n": n, "mode": mode, "config": config, "peak": peak, "wall": wall, "rc": rc,
           "optimizer_bytes": [s["optimizer_bytes"] for s in sorted(stats, key=lambda s: s["rank"])],
           "param_bytes": [s["param_bytes"] for s in sorted(stats, key=lambda s: s["rank"])]}
    if rc != 0:
        row["error"] = log.read_text(errors="replace")[-800:]
    print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    return row


def render(rows: list[dict], weights: int, extra: dict) -> str:
    gb = 1e9
    lines = [SECTION, "",
             f"`bench/ranks.py`, {extra['date']}; {machine()}; {extra['versions']}; load average "
             f"{extra['load'][0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. A config-built Llama of "
             f"{extra['n_params'] / 1e9:.2f}B parameters with random weights, fp32 safetensors: **{weights / gb:.2f} GB "
             f"on disk**. Each run: {extra['steps']} optimizer steps of one micro-batch (<= 64 tokens) per process, "
             "then the final save (an adapter alone for LoRA). Peak = the largest sampled sum of the RSS of every "
             "process of the run (launcher and workers; psutil every 50 ms). Optimizer state = the AdamW moments "
             "each process holds (its shard under FSDP).", "",
             "| run | processes | peak summed RSS | x weights on disk | x one process | AdamW state per process | "
             "wall |", "|---|---:|---:|---:|---:|---:|---:|"]
    one = {r["mode"]: r["peak"] for r in rows if r["n"] == 1 and "peak" in r}
    for r in rows:
        label = f"{r['mode']}, {'one process' if r['n'] == 1 else r['config']}"
        if "skipped" in r or r.get("rc"):
            why = r.get("skipped") or f"failed (exit {r.get('rc')})"
            lines.append(f"| {label} | {r['n']} | {why} | | | | |")
            continue
        opt = ", ".join(f"{b / gb:.2f}" for b in r["optimizer_bytes"]) + " GB" if any(r["optimizer_bytes"]) else "-"
        rel = f"{r['peak'] / one[r['mode']]:.2f}x" if r["mode"] in one else "-"
        lines.append(f"| {label} | {r['n']} | {r['peak'] / gb:.2f} GB | {r['peak'] / weights:.2f}x | {rel} | {opt} | "
                     f"{r['wall']:.0f} s |")
    lines += ["", *targets(rows, weights), *extra.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def targets(rows: list[dict], weights: int) -> list[str]:
    """The issue's targets, read off the table: one LoRA process <= 1.6x the weights, 3 LoRA processes <= 1.4x
    one process, AdamW state per process ~ 1/N of one process'."""
    ok = {(r["mode"], r["n"], r["config"]): r for r in rows if "peak" in r and not r.get("rc")}
    out = []
    one = ok.get(("lora", 1, None))
    if one:
        out.append(f"- LoRA, one process: {one['peak'] / weights:.2f}x the weights on disk (target <= 1.6x).")
    for (mode, n, config), r in sorted(ok.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        if mode == "lora" and n == 3 and one:
            out.append(f"- LoRA, 3 processes ({config}): {r['peak'] / one['peak']:.2f}x one process (target <= 1.4x).")
        base = ok.get(("full", 1, None))
        if mode == "full" and n > 1 and base and any(r["optimizer_bytes"]):
            share = max(r["optimizer_bytes"]) / max(base["optimizer_bytes"])
            out.append(f"- Full fine-tuning, {n} processes ({config}): the largest AdamW state of a process is "
                       f"{share:.3f} of one process' (1/{n} = {1 / n:.3f}).")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    model = Path(args.model_dir)
    build_model(model)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    from imtune.models import model_info

    extra = {"date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "load": os.getloadavg(),
             "steps": args.steps, "n_params": model_info(str(model))["n_params"], "notes": [],
             "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}
    configs = []
    for c in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if (CONFIGS / f"{c}.yaml").exists():
            configs.append(c)
        else:
            extra["notes"].append(f"- `{c}.yaml` is not among imtune's accelerate configs here: not measured.")
    rows, earlier = [], {}
    if args.reuse:
        earlier = {r["name"]: r for r in (json.loads(x) for x in Path(args.reuse).read_text().splitlines()
                                          if x.startswith('{"name"')) if not r.get("rc")}
        extra["notes"].append(f"- Rows {', '.join(sorted(earlier))} were measured by an earlier run of this script "
                              "on the same machine, the same day; the others by this one.")
    with tempfile.TemporaryDirectory(prefix="imtune-ranks-") as tmp:
        work = Path(tmp)
        write_data(work / "d.jsonl")
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            for n in [int(x) for x in args.ranks.split(",")]:
                for config in ([None] if n == 1 else configs):
                    name = f"{mode}-{n}p-{config or 'single'}"
                    rows.append(earlier.pop(name, None) or run_one(n, mode, config, model, work / "d.jsonl", work,
                                                                    args.steps))
    failed = [r for r in rows if r.get("rc")]
    for r in failed:
        print(f"{r['name']} failed:\n{r['error']}", file=sys.stderr)
    text = render(rows, weights, extra)
    print(text)
    if not args.no_write:
        write_section(SECTION, text, Path(args.out) if args.out else Path(__file__).resolve().parent / "RESULTS.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
