"""`imtune advise --pilot`: measure IM vs IT on the user's own data at a few small sizes and extrapolate to theirs.

A pilot is a set of `imtune compare` runs, one per training size, in `<out>/n<size>/` (so it resumes the way compare
does: a rerun reuses finished runs and evaluations, and a compare made with the same settings there is reused as
is). Every size holds out the same examples (compare's split is nested: one seeded permutation, the held-out set
first), so the sizes' IM − IT differences are paired through those examples; `analysis/pilot_fit.py` fits them
against n and makes the call.

The budget is wall minutes on the user's machine, set-up and evaluation included. A token-count cost model (below)
gives the first plan; the smaller size then runs first with one seed and calibrates that model to this machine, and
the seeds and the second size are re-planned to fit the wall-clock budget left (`pilot_budget.py`). The calibrated
plan is kept in `<out>/plan.json`, so a rerun of the same command finds the same plan and reuses every finished run.
`--pilot-sizes` fixes the sizes (no re-planning). Cost is reported both as wall minutes and as training tokens.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_MODEL, DEFAULT_PILOT_BUDGET_MIN, DEFAULT_TEMPLATE
from imtune.errors import ImtuneError
from imtune.inputs import read_json_object, read_jsonl_rows
from imtune.io_utils import atomic_write_json

# Cost model, measured 2026-12-06 on 2 quiet Intel Xeon cores (bf16 with AMX, SmolLM2-135M, max length 160): a
# training step costs ≈ 1.5 s of its own (the AdamW update, clipping and the finiteness check over every weight,
# whatever the batch) plus its tokens at ≈ 320 tokens/s (forward + backward): 2.5 s for 2 × 160 tokens, 3.5 s for
# 4 × 160, so per token a batch-2 pilot trains 30% slower than a batch-4 comparison. Scoring ≈ 1,000 tokens/s
# (forward only); ≈ 6 s a run for loading, encoding, the final save and loading it again to score; 6 s a size for
# the split and statistics. A quiet LIMA pilot (sizes 8 and 16, 2 seeds, 113 held out) took 7.4 minutes against
# 7.5 planned. Steps and tokens scale with the model's parameter count.
STEP_S = 1.5
TRAIN_TOKENS_PER_S = 320.0
SCORE_TOKENS_PER_S = 1000.0
RUN_OVERHEAD_S = 6.0
SIZE_OVERHEAD_S = 6.0
REFERENCE_PARAMS = 135e6
MIN_SIZE = 4
PLAN_VERSION = 2


@dataclass
class PilotConfig:
    data: str
    out: str
    model: str = DEFAULT_MODEL
    pilot_model: str | None = None  # a smaller model with the same tokenizer, trained instead of `model`
    n_target: int | None = None  # the user's training-set size (default: every record in `data`)
    budget_min: float = DEFAULT_PILOT_BUDGET_MIN
    seeds: int = 2
    n_val: int = 128  # held-out examples decide most of the interval (seeds agree closely on the bundled sets)
    sizes: tuple[int, ...] | None = None  # fixed sizes instead of the planned ones
    max_length: int = DEFAULT_MAX_LENGTH
    template: str = DEFAULT_TEMPLATE
    epochs: int = 2
    # Batch 2 at lr 2e-4 (the advisor study's), not compare's 4 at 1e-4: at a pilot's sizes that leaves a handful of
    # optimizer steps and the objectives barely move apart (measured on LIMA, n = 26, batch 4, lr 1e-4: IM − IT
    # -0.0027 [-0.0094, +0.0039], against -0.0129 for the full comparison at n = 183).
    lr: float = 2e-4
    batch: int = 2
    precision: str = "auto"
    seed: int = 42
    data_format: str | None = None
    data_source: dict = field(default_factory=dict)  # split / config / revision of a Hub id or dataset directory
    skip_invalid: bool = False
    progress: bool = False
    train_overrides: dict = field(default_factory=dict)

    @property
    def train_model(self) -> str:
        return self.pilot_model or self.model


def _log(msg: str) -> None:
    print(f"[imtune pilot] {msg}", file=sys.stderr, flush=True)


def check_tokenizers(model: str, pilot_model: str | None) -> None:
    """A pilot model must tokenise exactly as the user's model (same vocabulary and special tokens), or its losses
    are over other tokens."""
    if not pilot_model:
        return
    from imtune.models import load_tokenizer

    a, b = load_tokenizer(model), load_tokenizer(pilot_model)
    why = None
    if a.get_vocab() != b.get_vocab():
        why = f"vocabularies differ ({len(a.get_vocab()):,} vs {len(b.get_vocab()):,} tokens)"
    elif (a.bos_token, a.eos_token) != (b.bos_token, b.eos_token):
        why = f"special tokens differ ({a.bos_token!r}/{a.eos_token!r} vs {b.bos_token!r}/{b.eos_token!r})"
    if why:
        raise ImtuneError(f"--pilot-model {pilot_model}: its tokenizer does not match {model}'s: {why}; a pilot "
                          "model must use the same tokenizer")


# ---- plan --------------------------------------------------------------------------------------------------------

def size_tokens(cfg: PilotConfig, records, tokenizer) -> tuple[dict[str, int], list, list]:
    """Tokens per record as training sees them (template, truncation), and the held-out / training-pool records in
    compare's nested order (the pool's first k are the size-k training set)."""
    from imtune.masking.encoding import encode
    from imtune.records.split import holdout_split

    if len(records) < cfg.n_val + 2 * MIN_SIZE:
        raise ImtuneError(f"{cfg.data}: {len(records)} records are too few for a pilot with {cfg.n_val} held out "
                          f"and sizes of at least {MIN_SIZE}; lower --pilot-heldout or run `imtune compare`")
    enc = encode(records, tokenizer, "im", cfg.template, cfg.max_length, keep_empty=True)
    tokens = {r.id: len(e) for r, e in zip(records, enc, strict=True)}
    order = np.random.default_rng(cfg.seed).permutation(len(records))  # the permutation holdout_split draws
    _, held = holdout_split(records, cfg.n_val, cfg.seed, n_train=1, source=cfg.data)
    pool = [records[i] for i in order[cfg.n_val:]]
    return tokens, held, pool


def estimate(sizes, seeds: int, epochs: int, pool_tokens: list[int], heldout_tokens: int, scale: float,
             objectives: int = 2, batch: int = 2) -> dict:
    """Seconds and training tokens of a pilot (cost model above); with `objectives` and one size, of a compare."""
    cum = np.concatenate([[0], np.cumsum(pool_tokens)])
    runs_per_size = objectives * seeds
    train_tokens = sum(runs_per_size * epochs * int(cum[n]) for n in sizes)
    steps = sum(runs_per_size * epochs * math.ceil(n / batch) for n in sizes)
    score_tokens = runs_per_size * len(sizes) * heldout_tokens
    runs = runs_per_size * len(sizes)
    secs = (steps * STEP_S + train_tokens / TRAIN_TOKENS_PER_S + score_tokens / SCORE_TOKENS_PER_S) * scale \
        + runs * RUN_OVERHEAD_S + len(sizes) * SIZE_OVERHEAD_S
    return {"train_tokens": train_tokens, "score_tokens": score_tokens, "steps": steps, "runs": runs,
            "seconds": secs}


def plan_sizes(budget_s: float, seeds: int, epochs: int, pool_tokens: list[int], heldout_tokens: int, n_max: int,
               scale: float = 1.0, batch: int = 2) -> dict:
    """The largest pair (m/2, m) that fits the budget, m ≤ n_max; one size when two do not fit. Two sizes, not
    three: the call rests on the largest size (`pilot_fit`), and the smaller one only has to give the trend's sign,
    so budget spent on a third, smaller size — where a few optimizer steps barely move either model — is budget
    taken from the measurement that decides. Pure: the same inputs give the same plan."""
    top = min(n_max, len(pool_tokens))
    for k in (2, 1):
        m = top
        while m >= MIN_SIZE * 2 ** (k - 1):
            sizes = sorted({max(MIN_SIZE, round(m / 2 ** j)) for j in range(k)})
            est = estimate(sizes, seeds, epochs, pool_tokens, heldout_tokens, scale, batch=batch)
            if est["seconds"] <= budget_s:
                return {"sizes": sizes, **est, "fits": True}
            m = int(m * 0.95) if m > 20 else m - 1
    sizes = [MIN_SIZE]
    return {"sizes": sizes, **estimate(sizes, seeds, epochs, pool_tokens, heldout_tokens, scale, batch=batch),
            "fits": False}


def call_reach(n_target: int, pool: int) -> int:
    """The smallest largest-size from which the pilot may call a direction at `n_target` (`pilot_fit`)."""
    from imtune.analysis.pilot_fit import MAX_EXTRAPOLATION

    return max(MIN_SIZE * 2, min(pool, math.ceil(n_target / MAX_EXTRAPOLATION)))


def _spec(cfg: PilotConfig, n_target: int) -> dict:
    from imtune.records.sources import source_key

    d = asdict(cfg)
    for k in ("out", "progress"):
        d.pop(k)
    return {**d, "data": source_key(cfg.data), "n_target": n_target, "v": PLAN_VERSION}


def cost_inputs(cfg: PilotConfig, records, tokenizer) -> dict:
    """What the cost model needs: tokens of each training-pool record (in order), of the held-out set, and the
    trained model's size relative to the reference."""
    from imtune.models import model_info

    tokens, held, pool = size_tokens(cfg, records, tokenizer)
    return {"pool_tokens": [tokens[r.id] for r in pool], "held_tokens": sum(tokens[r.id] for r in held),
            "scale": max(model_info(cfg.train_model)["n_params"] / REFERENCE_PARAMS, 1e-3)}


def make_plan(cfg: PilotConfig, records, tokenizer, out: Path, inputs: dict | None = None) -> dict:
    """The plan, kept in plan.json: a rerun with the same settings reuses it (and so every finished run)."""
    n_target = cfg.n_target or len(records)
    spec = _spec(cfg, n_target)
    p = out / "plan.json"
    if p.exists():
        old = read_json_object(p, "pilot plan")
        if old.get("spec") == spec:
            return old
    inputs = inputs or cost_inputs(cfg, records, tokenizer)
    pool_tokens, held_tokens, scale = inputs["pool_tokens"], inputs["held_tokens"], inputs["scale"]
    pool = pool_tokens
    if cfg.sizes:
        sizes = sorted(set(cfg.sizes))
        est = {"sizes": sizes, "fits": True,
               **estimate(sizes, cfg.seeds, cfg.epochs, pool_tokens, held_tokens, scale, batch=cfg.batch)}
    else:
        est = plan_sizes(cfg.budget_min * 60, cfg.seeds, cfg.epochs, pool_tokens, held_tokens, n_target, scale,
                         batch=cfg.batch)
    if est["sizes"][-1] > len(pool):
        raise ImtuneError(f"--pilot-sizes: {est['sizes'][-1]} exceeds the {len(pool)} records left after holding "
                          f"out {cfg.n_val}")
    reach = call_reach(n_target, len(pool))
    call_est = estimate([max(MIN_SIZE, round(reach / 2)), reach], cfg.seeds, cfg.epochs, pool_tokens, held_tokens,
                        scale, batch=cfg.batch)
    plan = {"spec": spec, **est, "seeds": cfg.seeds, "n_heldout": cfg.n_val, "n_target": n_target,
            "budget_s": cfg.budget_min * 60, "param_scale": scale,
            "call_reach": {"largest_size": reach, "minutes": call_est["seconds"] / 60},
            "cost_model": {"step_s": STEP_S, "train_tokens_per_s": TRAIN_TOKENS_PER_S,
                           "score_tokens_per_s": SCORE_TOKENS_PER_S,
                           "run_overhead_s": RUN_OVERHEAD_S, "size_overhead_s": SIZE_OVERHEAD_S}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, plan)
    return plan


# ---- run ---------------------------------------------------------------------------------------------------------

def size_config(cfg: PilotConfig, out: Path, size: int, seeds: int | None = None):
    """The compare run of one pilot size (public so a compare made beforehand can be laid out for reuse)."""
    from imtune.analysis.compare import CompareConfig

    overrides = {**cfg.train_overrides, "max_length": cfg.max_length, "template": cfg.template,
                 "epochs": cfg.epochs, "lr": cfg.lr, "micro_batch_size": cfg.batch, "global_batch_size": cfg.batch,
                 "precision": cfg.precision}
    return CompareConfig(data=cfg.data, out=str(out / f"n{size}"), model=cfg.train_model, objectives=("it", "im"),
                         n_train=size, n_val=cfg.n_val, seed=cfg.seed, seeds=seeds or cfg.seeds, evals=("loss",),
                         train_overrides=overrides, data_format=cfg.data_format, skip_invalid=cfg.skip_invalid,
                         data_source=cfg.data_source, progress=cfg.progress, lean=True)


def _run_size(cfg: PilotConfig, out: Path, size: int, seeds: int | None = None) -> dict:
    from imtune.analysis.compare import run_compare

    t0 = time.time()
    result = run_compare(size_config(cfg, out, size, seeds))
    p = out / f"n{size}" / "pilot_time.json"
    old = read_json_object(p, "pilot timing") if p.exists() else {"seconds": 0.0, "passes": 0}
    spent = round(old["seconds"] + time.time() - t0, 1)
    atomic_write_json(p, {"seconds": spent, "passes": old["passes"] + 1})
    _prune(out / f"n{size}")
    return {"n": size, "result": result, "seconds": spent}


def _prune(cell: Path) -> None:
    """A finished, evaluated run's checkpoints and weights (≈ 3.5 GB a run for a 135M model) are never read again: a
    rerun reuses the cached evaluations. Only imtune's own files inside the pilot's directory."""
    import shutil

    for run in (cell / "runs").glob("*"):
        if (run / "compare_done.json").exists() and (run / "eval" / "loss_heldout.json").exists():
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            for w in run.glob("*.safetensors"):
                w.unlink()


def difference_table(result: dict) -> tuple[np.ndarray, list[str]]:
    """seeds × held-out examples table of IM − IT from one compare's cached per-example evaluations."""
    from imtune.analysis.verdict import loss_map

    maps = {}
    for o in ("it", "im"):
        maps[o] = []
        for s in result["runs"][o]["seeds"]:
            cached = read_json_object(Path(s["dir"]) / "eval" / "loss_heldout.json", "evaluation result")["result"]
            maps[o].append(loss_map({"loss_heldout": cached}, "heldout"))
    ids = sorted(set.intersection(*(set(m) for m in maps["it"] + maps["im"])))
    table = np.asarray([[im[i] - it[i] for i in ids] for it, im in zip(maps["it"], maps["im"], strict=True)])
    return table, ids


def training_tokens(result: dict) -> int:
    """Tokens the size's runs processed in training, read from their metrics logs."""
    total = 0
    for o in ("it", "im"):
        for s in result["runs"][o]["seeds"]:
            p = Path(s["dir"]) / "metrics.jsonl"
            for row in read_jsonl_rows(p, what="metrics rows", empty_ok=True) if p.exists() else ():
                total += int(row.get("tokens", 0)) if "loss" in row and "eval_loss" not in row else 0
    return total


# ---- orchestration -----------------------------------------------------------------------------------------------

def _fresh(cfg: PilotConfig, out: Path, size: int) -> bool:
    """Whether the size's first-seed runs still have to be trained (else timing them measures nothing)."""
    from imtune.analysis.compare import run_dir_of

    cell = out / f"n{size}"
    return not all((run_dir_of(cell, o, cfg.seed, cfg.seed) / "compare_done.json").exists() for o in ("it", "im"))


def run_sizes(cfg: PilotConfig, out: Path, plan: dict, inputs, t0: float) -> tuple[dict, list[dict]]:
    """Run the plan's sizes; a planned (not --pilot-sizes) plan is calibrated on this machine on the way (module
    doc, `pilot_budget.py`): the first size with one seed is timed, the rest fitted to the wall clock left."""
    from imtune.analysis import pilot_budget as B

    if cfg.sizes:
        return plan, [_run_size(cfg, out, n) for n in plan["sizes"]]
    budget = cfg.budget_min * 60
    cal = plan.get("calibration")
    if cal is None:
        first, fresh = plan["sizes"][0], _fresh(cfg, out, plan["sizes"][0])
        t = time.monotonic()
        _run_size(cfg, out, first, seeds=1)
        ins = inputs()
        cost = B.cost_function(estimate, cfg.epochs, ins["pool_tokens"], ins["held_tokens"], ins["scale"], cfg.batch)
        measured = time.monotonic() - t if fresh else cost([first], 1)  # reused runs: keep the cost model
        n_max = min(plan["n_target"], len(ins["pool_tokens"]))
        cal = B.calibrated(plan, measured, budget - (time.monotonic() - t0), cfg.seeds, cost, n_max)
        plan = {**plan, "calibration": cal}
        atomic_write_json(out / "plan.json", plan)
        _log(f"calibrated on this machine: {measured:.0f} s for size {first} with one seed (cost model "
             f"{cal['first_modelled_s']:.0f} s, ×{cal['k']:.2f}); {budget / 60 - (time.monotonic() - t0) / 60:.1f} "
             f"min left → sizes {cal['sizes']} × {cal['seeds']} seed(s), ≈ {cal['seconds'] / 60:.1f} min more")
    first, seeds = cal["sizes"][0], cal["seeds"]
    t = time.monotonic()
    done = [_run_size(cfg, out, first, seeds)]
    if len(cal["sizes"]) > 1 and "remaining_s_rechecked" not in cal:
        ins = inputs()
        cost = B.cost_function(estimate, cfg.epochs, ins["pool_tokens"], ins["held_tokens"], ins["scale"], cfg.batch)
        # The first size's whole cost on this machine: its calibration pass plus the seeds added since.
        first_s = cal["first_measured_s"] + time.monotonic() - t
        before, cal = cal["sizes"], B.recheck(cal, first_s, budget - (time.monotonic() - t0), cost)
        plan = {**plan, "calibration": cal}
        atomic_write_json(out / "plan.json", plan)
        if cal["sizes"] != before:
            _log(f"re-checked after {seeds} seed(s) of size {first}: sizes {before} would overrun the budget; "
                 f"running {cal['sizes']}")
    done += [_run_size(cfg, out, n, seeds) for n in cal["sizes"][1:]]
    return plan, done


def run_pilot(cfg: PilotConfig) -> dict:
    """Plan, run (or reuse) every size's compare, fit and call; writes `<out>/pilot.json` and returns it."""
    from imtune.analysis.pilot_fit import call_text, extrapolate, needed
    from imtune.models import load_tokenizer
    from imtune.records.loading import load_dataset

    t0 = time.monotonic()  # the budget is the user's wall clock: set-up counts
    check_tokenizers(cfg.model, cfg.pilot_model)
    out = Path(cfg.out)  # made by make_plan once the data and the plan are good: a refused pilot leaves nothing
    records = load_dataset(cfg.data, format=cfg.data_format, skip_invalid=cfg.skip_invalid,
                           **cfg.data_source).records
    tok = load_tokenizer(cfg.train_model)
    memo: dict = {}

    def inputs() -> dict:
        if not memo:
            memo.update(cost_inputs(cfg, records, tok))
        return memo

    plan = make_plan(cfg, records, tok, out, inputs=None if (out / "plan.json").exists() else inputs())
    _log(f"plan: sizes {plan['sizes']} × {plan['seeds']} seeds × it,im, {plan['n_heldout']} held-out examples; "
         f"≈ {plan['seconds'] / 60:.1f} min, {plan['train_tokens']:,} training tokens (budget {cfg.budget_min:g} "
         f"min{'' if plan['fits'] else '; even the smallest pilot exceeds it'})")
    if plan["sizes"][-1] < plan["call_reach"]["largest_size"]:
        _log(f"note: a call at n = {plan['n_target']:,} needs a largest size of at least "
             f"{plan['call_reach']['largest_size']:,} (about {plan['call_reach']['minutes']:.0f} minutes: "
             f"--budget-min); with this budget the pilot can only say 'cannot tell'")
    plan, done = run_sizes(cfg, out, plan, inputs, t0)
    tables, ids = zip(*(difference_table(d["result"]) for d in done), strict=True)
    common = sorted(set.intersection(*(set(i) for i in ids)))
    tables = [t[:, [i.index(c) for c in common]] for t, i in zip(tables, ids, strict=True)]
    sizes = [d["result"]["split"].get("n_train_common", d["n"]) for d in done]
    ext = extrapolate(sizes, tables, plan["n_target"])
    seconds = sum(d["seconds"] for d in done)
    n_seeds = plan.get("calibration", {}).get("seeds", cfg.seeds)
    need = {**needed(ext, n_seeds, len(common), seconds / 60 / n_seeds), "call_reach": plan.get("call_reach")}
    result = {
        "kind": "imtune-pilot", "version": 1, "config": asdict(cfg), "plan": plan,
        "call": ext["call"], "text": call_text(ext, need, max(sizes)), "extrapolation": ext, "needed": need,
        "cost": {"wall_minutes": seconds / 60, "pilot_wall_minutes": (time.monotonic() - t0) / 60,
                 "training_tokens": sum(training_tokens(d["result"]) for d in done),
                 "planned_minutes": plan["seconds"] / 60, "planned_training_tokens": plan["train_tokens"]},
        "sizes": [{"n": n, "n_requested": d["n"], "results": str(out / f"n{d['n']}" / "results.json"),
                   "seconds": d["seconds"], "ratio": d["result"]["stats"]["instruction_output_ratio"]}
                  for n, d in zip(sizes, done, strict=True)],
        "model": cfg.model, "trained_model": cfg.train_model,
    }
    atomic_write_json(out / "pilot.json", result)
    return result


def run_pilot_per_source(cfg: PilotConfig, sources: list[dict]) -> dict:
    """`run_pilot` on each source of a training mixture (a YAML `data:` list), each in `<out>/source<k>-<name>/`,
    and which objective to give it: `im`, `it`, or "cannot tell" (keep the run's). Writes `<out>/per_source.json`."""
    from imtune.analysis.pilot_fit import IM_BETTER, IT_BETTER

    out, rows = Path(cfg.out), []
    for k, src in enumerate(sources):
        where = {key: src[key] for key in ("split", "config", "revision") if src.get(key)}
        sub = replace(cfg, data=src["path"], out=str(out / f"source{k}-{Path(src['path']).stem}"),
                      data_source={**cfg.data_source, **where}, n_target=src.get("n") or cfg.n_target)
        _log(f"source {k}: {src['path']}")
        r = run_pilot(sub)
        rows.append({"path": src["path"], "objective": {IM_BETTER: "im", IT_BETTER: "it"}.get(r["call"],
                                                                                             "cannot tell"),
                     "call": r["call"], "text": r["text"], "pilot": str(Path(sub.out) / "pilot.json"),
                     "wall_minutes": r["cost"]["wall_minutes"]})
    result = {"kind": "imtune-pilot-per-source", "version": 1, "sources": rows}
    atomic_write_json(out / "per_source.json", result)
    return result
