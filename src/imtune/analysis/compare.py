"""`imtune compare`: train one model per objective on identical data, evaluate each, and report the verdict.

Flow (each step cached under the output directory, so a rerun reuses finished work):
    split (data/train.jsonl, data/heldout.jsonl) → advise → train one run per (objective, training seed): same split,
    hyper-parameters and, per seed, the same initialisation and data order; interrupted runs resume → evaluate on the
    training device and precision (held-out and train output loss per example, memorisation BLEU, optional
    benchmarks) → results.json → report.md / report.html + plots.

The verdict (analysis/verdict.py) rests on paired per-example differences of held-out output loss, with a 95%
interval from a bootstrap over seeds and held-out examples; an interval containing 0 is reported as not resolved.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imtune.analysis.verdict import verdict
from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_MODEL
from imtune.errors import ImtuneError
from imtune.inputs import read_json_object, read_jsonl_rows
from imtune.io_utils import atomic_write_json, atomic_write_jsonl
from imtune.ranges import SEED_MAX


@dataclass
class CompareConfig:
    data: str
    out: str
    model: str = DEFAULT_MODEL
    objectives: tuple[str, ...] = ("it", "im")
    val_data: str | None = None
    val_fraction: float = 0.1
    n_train: int | None = None  # subsample the training split (after the held-out split) for quick runs
    n_val: int | None = None
    seed: int = 42  # the split's seed and the first training seed
    seeds: int = 1  # training seeds per objective: seed, seed+1, ... on the same split
    evals: tuple[str, ...] = ("loss", "memorisation")  # plus benchmark task names
    eval_limit: int | None = 50  # per benchmark task
    memorisation_n: int = 32
    max_new_tokens: int = 128
    eval_batch_size: int = 8
    train_overrides: dict = field(default_factory=dict)  # any TrainConfig field
    data_format: str | None = None
    skip_invalid: bool = False
    progress: bool = True
    data_source: dict = field(default_factory=dict)  # split / config / revision of a Hub id or dataset directory
    # A pilot's lean runs: only the trained models' held-out loss (no per-epoch, training-set or starting-model
    # scoring, which together cost as much as a small run), no checkpoints, no trackers.
    lean: bool = False

    def validate(self) -> CompareConfig:
        from imtune.masking.objectives import parse_objective

        if len(self.objectives) < 2:
            raise ImtuneError("--objectives needs at least two objectives to compare, e.g. it,im")
        specs = [parse_objective(o).spec for o in self.objectives]
        if len(set(specs)) != len(specs):
            raise ImtuneError(f"--objectives has duplicates: {','.join(specs)}")
        if not 0 < self.val_fraction < 1 and not self.val_data:
            raise ImtuneError("--val-fraction must be in (0, 1)")
        if self.seeds < 1:
            raise ImtuneError("--seeds must be at least 1")
        if not 0 <= self.seed <= SEED_MAX - self.seeds + 1:  # every seed run, --seed .. --seed+seeds-1
            raise ImtuneError(f"--seed {self.seed} with --seeds {self.seeds}: every seed must be in [0, {SEED_MAX}]")
        for name in ("n_train", "n_val", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ImtuneError(f"--{name.replace('_', '-')} must be at least 1")
        return self


def slug(objective: str) -> str:
    return objective.replace(":", "_").replace("@", "-")


def training_seeds(cfg: CompareConfig) -> list[int]:
    return [cfg.seed + k for k in range(cfg.seeds)]


def run_dir_of(out: Path, objective: str, seed: int, first_seed: int) -> Path:
    """runs/<objective> for the first seed (so `--seeds 1` directories keep working and `--seeds 3` reuses them),
    runs/<objective>-seed<N> for the others."""
    name = slug(objective) if seed == first_seed else f"{slug(objective)}-seed{seed}"
    return Path(out) / "runs" / name


def _log(msg: str) -> None:
    print(f"[imtune compare] {msg}", file=sys.stderr, flush=True)


# ---- split -------------------------------------------------------------------------------------------------------

def make_split(cfg: CompareConfig, out: Path) -> tuple[Path, Path, dict]:
    """Deterministic train/held-out split written once; a rerun with other split settings is refused."""
    from imtune.records.loading import load_dataset
    from imtune.records.sources import source_key
    from imtune.records.split import holdout_split, n_heldout

    spec = {"data": source_key(cfg.data), "val_data": source_key(cfg.val_data), "val_fraction": cfg.val_fraction,
            "n_train": cfg.n_train, "n_val": cfg.n_val, "seed": cfg.seed, "data_format": cfg.data_format,
            **({"data_source": cfg.data_source} if cfg.data_source else {})}  # unset: an old split.json matches
    d = out / "data"
    train_p, val_p, spec_p = d / "train.jsonl", d / "heldout.jsonl", d / "split.json"
    if spec_p.exists():
        old = read_json_object(spec_p, "split record")
        if old.get("spec") != spec:
            raise ImtuneError(f"{out} holds a comparison made with other data/split settings; "
                              "use a new --out directory")
        return train_p, val_p, old
    for p in (train_p, val_p):  # compare writes both with split.json; without it, they are not compare's
        if p.exists():
            raise ImtuneError(f"{p} exists and was not written by imtune compare; move it away or use a new --out")
    res = load_dataset(cfg.data, format=cfg.data_format, skip_invalid=cfg.skip_invalid, **cfg.data_source)
    if cfg.val_data:
        val = load_dataset(cfg.val_data, format=cfg.data_format, skip_invalid=cfg.skip_invalid).records
        val = val[: cfg.n_val] if cfg.n_val else val
        train, _ = holdout_split(res.records, 0, cfg.seed, n_train=cfg.n_train, source=cfg.data)
    else:
        n_val = cfg.n_val or n_heldout(len(res.records), cfg.val_fraction)
        train, val = holdout_split(res.records, n_val, cfg.seed, n_train=cfg.n_train, source=cfg.data)
    atomic_write_jsonl(train_p, (r.to_dict() for r in train))
    atomic_write_jsonl(val_p, (r.to_dict() for r in val))
    info = {"spec": spec, "n_train": len(train), "n_heldout": len(val), "skipped_invalid": len(res.skipped)}
    atomic_write_json(spec_p, info)
    return train_p, val_p, info


# ---- training ----------------------------------------------------------------------------------------------------

def _train_config(cfg: CompareConfig, objective: str, train_p: Path, val_p: Path, run_dir: Path,
                  seed: int | None = None):
    from imtune.config import TrainConfig

    base = {"epochs": 2, "progress": cfg.progress}
    # A lean run lasts a minute or two: retraining one that was killed costs less than checkpointing every run.
    base.update({"checkpoints": False, "report_to": ["none"]} if cfg.lean else {})
    base.update(cfg.train_overrides)
    base.update({"model": cfg.model, "data": str(train_p), "val_data": None if cfg.lean else str(val_p),
                 "objective": objective, "seed": cfg.seed if seed is None else seed, "out": str(run_dir),
                 "val_fraction": 0.0})
    return TrainConfig.from_dict(base, source="compare").validate()


def _run_done(run_dir: Path, tcfg) -> bool:
    marker = run_dir / "compare_done.json"
    if not marker.exists():
        return False
    return read_json_object(marker, "run marker").get("config") == _config_key(tcfg)


def _config_key(tcfg) -> str:
    d = tcfg.to_dict()
    for k in ("progress", "resume", "overwrite", "report_to", "run_name", "wandb_project", "mlflow_experiment"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_run(cfg: CompareConfig, objective: str, train_p: Path, val_p: Path, out: Path,
              seed: int | None = None) -> Path:
    """Train (or reuse, or resume) the run of one (objective, seed)."""
    from imtune.training.recipe import train

    seed = cfg.seed if seed is None else seed
    run_dir = run_dir_of(out, objective, seed, cfg.seed)
    tcfg = _train_config(cfg, objective, train_p, val_p, run_dir, seed)
    name = objective if cfg.seeds == 1 else f"{objective} seed {seed}"
    if _run_done(run_dir, tcfg):
        _log(f"{name}: reusing finished run in {run_dir}")
        return run_dir
    # A finished run with other settings is stale: its checkpoints belong to those settings, so it is retrained
    # from scratch (and its cached evaluations go with it); only an interrupted run is resumed.
    stale = (run_dir / "compare_done.json").exists()
    if not stale and run_dir.exists() and any(run_dir.glob("checkpoint*")):
        _log(f"{name}: resuming the interrupted run in {run_dir}")
        tcfg = tcfg.replace(resume="latest")
    elif run_dir.exists() and any(run_dir.iterdir()):
        _log(f"{name}: settings changed since the finished run; retraining" if stale else
             f"{name}: the run died before its first checkpoint; starting it over")
        tcfg = tcfg.replace(overwrite=True)
    _log(f"{name}: training → {run_dir}")
    train(tcfg)
    _own(run_dir, "compare_done.json")
    atomic_write_json(run_dir / "compare_done.json", {"config": _config_key(tcfg), "objective": objective})
    return run_dir


def _own(run_dir: Path, rel: str, kind: str = "files") -> None:
    """Record a path compare is about to create inside a run directory in the run's manifest, so that a later
    --overwrite (a retrain with changed settings) may remove it with the rest of the run. One that exists already
    is left as it is (claimed before, or from an older version: then a retrain refuses rather than removes it)."""
    from imtune.training.outputs import RunDir

    if not os.path.lexists(run_dir / rel):
        RunDir(run_dir).claim(rel, kind)


def common_training_set(train_p: Path, tokenizer, objectives, tcfg) -> tuple[Path, int | None]:
    """Examples every objective can train on. Truncation can leave an example with no weighted token under `it`
    (its output cut away) but not under `im`; training IT and IM on different example sets would confound the
    comparison, so such examples are removed for all runs. Returns the path to train on and the kept count (None
    when nothing was removed)."""
    from imtune.masking.encoding import encode_with_report

    recs = _records(train_p)
    dropped: set[str] = set()
    for o in objectives:
        _, rep = encode_with_report(recs, tokenizer, o, tcfg.template, tcfg.max_length, tcfg.truncation_side,
                                    allow_special_tokens_in_content=tcfg.allow_special_tokens_in_content)
        dropped.update(rep.dropped_no_weight)
    if not dropped:
        return train_p, None
    kept = [r for r in recs if r.id not in dropped]
    if not kept:
        raise ImtuneError(f"no training example keeps a weighted token under every objective at max length "
                          f"{tcfg.max_length}; raise --max-length")
    common = train_p.with_name("train_common.jsonl")
    atomic_write_jsonl(common, (r.to_dict() for r in kept))
    return common, len(kept)


# ---- evaluation --------------------------------------------------------------------------------------------------

def _cached(path: Path, params: dict, compute):
    """Evaluation result cache: reuse `path` when it was computed with the same params."""
    if path.exists():
        d = read_json_object(path, "evaluation result")
        if d.get("params") == params and "result" in d:
            return d["result"]
    result = compute()
    atomic_write_json(path, {"params": params, "result": result})
    return result


def _records(p: Path):
    from imtune.records.loading import load_records

    return load_records(p)


def eval_precision(precision: str) -> str:
    """The precision a run with `precision` trained in on this machine's inference device (`auto` resolved the way
    training resolves it), so evaluation matches training."""
    from imtune.models import inference_device
    from imtune.training.fast_defaults import resolve_precision

    return resolve_precision(precision, inference_device(None))[0]


def evaluate_model(cfg: CompareConfig, model_ref: str, eval_dir: Path, train_p: Path, val_p: Path,
                   template: str, with_generation: bool = True, precision: str = "auto",
                   revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """Evaluations of one model, on the device and in the precision its run trained with (imtune's one loader:
    the GPU when there is one; `auto` resolves as training does). `revision`: of a Hub id (the starting model)."""
    from imtune.evaluation.loss_probe import per_example_loss, summarise
    from imtune.models import load_for_inference

    precision = eval_precision(precision)  # cached results record the precision they were computed in
    state: dict = {}

    def model_tok():
        if not state:
            state["model"], state["tok"], _ = load_for_inference(model_ref, dtype=precision, revision=revision,
                                                                 trust_remote_code=trust_remote_code)
        return state["model"], state["tok"]

    max_len = int(cfg.train_overrides.get("max_length", DEFAULT_MAX_LENGTH))
    results: dict = {}
    val_recs, train_recs = _records(val_p), _records(train_p)
    if "loss" in cfg.evals:
        for split, recs in (("heldout", val_recs), ("train", train_recs))[: 1 if cfg.lean else 2]:
            params = {"split": split, "n": len(recs), "template": template, "max_length": max_len, "v": 1,
                      "precision": precision, **({"revision": revision} if revision else {})}

            def compute(recs=recs):
                m, t = model_tok()
                rows = per_example_loss(m, t, recs, objective="it", template=template, max_length=max_len,
                                        batch_size=cfg.eval_batch_size, progress=cfg.progress)
                return {"rows": rows, "summary": summarise(rows)}

            results[f"loss_{split}"] = _cached(eval_dir / f"loss_{split}.json", params, compute)
    if "memorisation" in cfg.evals and with_generation:
        results["memorisation"] = _memorisation(cfg, train_recs[: cfg.memorisation_n], template, eval_dir,
                                                model_tok, precision)
    tasks = [e for e in cfg.evals if e not in ("loss", "memorisation")]
    if tasks:
        from imtune.evaluation import run_tasks

        params = {"tasks": tasks, "limit": cfg.eval_limit, "v": 1, "precision": precision}

        def compute_bench():
            m, t = model_tok()
            return run_tasks(m, t, tasks, limit=cfg.eval_limit)

        results["benchmarks"] = _cached(eval_dir / "benchmarks.json", params, compute_bench)
    return results


def _memorisation(cfg: CompareConfig, recs, template: str, eval_dir: Path, model_tok, precision: str) -> dict:
    from imtune.evaluation.chat_generation import generate_chat, split_last_turn
    from imtune.evaluation.memorisation import memorisation_scores

    params = {"n": len(recs), "max_new_tokens": cfg.max_new_tokens, "template": template, "v": 1,
              "precision": precision}

    def compute():
        m, t = model_tok()
        prompts, refs = zip(*(split_last_turn(r) for r in recs), strict=True)
        outs = generate_chat(m, t, list(prompts), template=template, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.eval_batch_size, progress=cfg.progress)
        scores = memorisation_scores(outs, list(refs))
        scores["examples"] = [{"id": r.id, "output": o} for r, o in zip(recs, outs, strict=True)]
        return scores

    return _cached(eval_dir / "memorisation.json", params, compute)


# ---- orchestration -----------------------------------------------------------------------------------------------

def _prepare(cfg: CompareConfig, out: Path):
    """Split, advise and find the examples every objective can train on."""
    from imtune.analysis.advise import advise
    from imtune.models import load_tokenizer

    train_p, val_p, split = make_split(cfg, out)
    _log(f"split: {split['n_train']} train / {split['n_heldout']} held-out examples → {out / 'data'}")
    objectives = list(cfg.objectives)
    tcfg0 = _train_config(cfg, objectives[0], train_p, val_p, run_dir_of(out, objectives[0], cfg.seed, cfg.seed))
    tok = load_tokenizer(cfg.model, trust_remote_code=tcfg0.trust_remote_code, revision=tcfg0.revision)
    adv, stats = advise(_records(train_p), tok, template=tcfg0.template, max_length=tcfg0.max_length)
    atomic_write_json(out / "advice.json", {"advice": adv.to_dict(), "stats": stats})
    _log(f"advisor: recommends {adv.recommendation} ({adv.confidence}); predicted {adv.predicted_im_minus_it}")
    train_p, n_common = common_training_set(train_p, tok, objectives, tcfg0)
    if n_common is not None:
        split = {**split, "n_train_common": n_common}
        _log(f"{split['n_train'] - n_common} training example(s) keep no weighted token under some objective "
             f"(truncation at {tcfg0.max_length}); every run trains on the {n_common} that all objectives keep")
    return train_p, val_p, split, tcfg0, adv, stats


def run_compare(cfg: CompareConfig) -> dict:
    """Run (or resume) the whole comparison and write results.json, report.md, report.html and plots."""
    from imtune.analysis.report import write_report
    from imtune.evaluation.loss_probe import default_template
    from imtune.models import model_info

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_p, val_p, split, tcfg0, adv, stats = _prepare(cfg, out)
    objectives, seeds = list(cfg.objectives), training_seeds(cfg)
    # Seed-major order: after the first seed a complete one-seed comparison exists on disk.
    dirs = {(o, s): train_run(cfg, o, train_p, val_p, out, s) for s in seeds for o in objectives}
    evals_base = {}
    if not cfg.lean:
        _log("evaluating the starting model (held-out loss only)")
        evals_base = evaluate_model(CompareConfig(**{**asdict(cfg), "evals": ("loss",)}), cfg.model, out / "base" /
                                    "eval", train_p, val_p, tcfg0.template, with_generation=False,
                                    precision=tcfg0.precision, revision=tcfg0.revision,
                                    trust_remote_code=tcfg0.trust_remote_code)
    evals = {o: [] for o in objectives}
    for s in seeds:
        for o in objectives:
            d = dirs[(o, s)]
            _log(f"evaluating {o}" + (f" (seed {s})" if len(seeds) > 1 else ""))
            _own(d, "eval", "trees")
            evals[o].append(evaluate_model(cfg, str(d), d / "eval", train_p, val_p, default_template(str(d), None),
                                           precision=tcfg0.precision, trust_remote_code=tcfg0.trust_remote_code))
    runs = {}
    for o in objectives:
        per_seed = [{"seed": s, "dir": str(dirs[(o, s)]), "history": _read_metrics(dirs[(o, s)]),
                     "evals": _strip_rows(ev)} for s, ev in zip(seeds, evals[o], strict=True)]
        runs[o] = {"dir": per_seed[0]["dir"], "history": per_seed[0]["history"],
                   "evals": pool_evals(evals[o]), "seeds": per_seed}
    result = {
        "config": {**asdict(cfg), "objectives": objectives, "evals": list(cfg.evals)},
        "model": model_info(cfg.model, revision=tcfg0.revision),
        "split": split,
        "seeds": seeds,
        "train_config": {k: v for k, v in tcfg0.to_dict().items() if k not in ("objective", "out", "data", "seed")},
        "advice": adv.to_dict(),
        "stats": stats,
        "verdict": verdict(objectives, evals, adv.to_dict()),
        "base": {"heldout_loss": evals_base.get("loss_heldout", {}).get("summary"),
                 "train_loss": evals_base.get("loss_train", {}).get("summary")},
        "runs": runs,
    }
    atomic_write_json(out / "results.json", result)
    if not cfg.lean:  # a lean run has no training-set loss for the report's tables; its results.json is all
        _log(f"report: {write_report(result, evals, out)['html']}")
    return result


def _strip_rows(ev: dict) -> dict:
    """results.json keeps summaries; per-example rows stay in each run's eval/ folder."""
    out = {}
    for k, v in ev.items():
        if k.startswith("loss_"):
            out[k] = v["summary"]
        elif k == "memorisation":
            out[k] = {kk: vv for kk, vv in v.items() if kk not in ("sentence_bleu", "rougeL", "examples")}
        else:
            out[k] = v
    return out


def pool_evals(seed_evals: list[dict]) -> dict:
    """One objective's evaluations pooled over training seeds: means of the per-seed figures, with intervals from
    the two-way bootstrap over seeds and examples where per-example values exist. One seed: unchanged."""
    from imtune.statistics import crossed_bootstrap_means

    if len(seed_evals) == 1:
        return _strip_rows(seed_evals[0])
    out: dict = {}
    for key, field_ in (("loss_heldout", "loss"), ("loss_train", "loss"), ("memorisation", "sentence_bleu")):
        per = [ev.get(key) for ev in seed_evals]
        if not all(per):
            continue
        rows = [p["rows"] if key.startswith("loss_") else p[field_] for p in per]
        vals = [[r["loss"] for r in rs] if key.startswith("loss_") else list(rs) for rs in rows]
        if len({len(v) for v in vals}) != 1 or not vals[0]:
            continue
        table = np.asarray(vals, dtype=np.float64)
        boots = crossed_bootstrap_means(table)
        mean = float(table.mean())
        lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
        if key.startswith("loss_"):
            out[key] = {"n": len(vals[0]), "n_seeds": len(vals), "mean": mean, "ci95": [min(lo, mean), max(hi, mean)],
                        "per_seed": [p["summary"]["mean"] for p in per]}
        else:
            out[key] = {"sentence_bleu_mean": mean, "sentence_bleu_ci95": [min(lo, mean), max(hi, mean)],
                        "rougeL_mean": float(sum(p["rougeL_mean"] for p in per) / len(per)), "n_seeds": len(per),
                        "per_seed": [p["sentence_bleu_mean"] for p in per]}
    benches = [ev.get("benchmarks") for ev in seed_evals]
    if all(benches):
        out["benchmarks"] = {"per_seed": benches}
    return out


def _read_metrics(run_dir: Path) -> dict:
    p = run_dir / "metrics.jsonl"
    rows = read_jsonl_rows(p, what="metrics rows", empty_ok=True) if p.exists() else []
    return {"train_loss": [(r.get("step"), r["loss"]) for r in rows if "loss" in r and "eval_loss" not in r],
            "eval_loss": [(r.get("step"), r["eval_loss"]) for r in rows if "eval_loss" in r]}
