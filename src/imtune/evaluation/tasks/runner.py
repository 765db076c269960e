"""Running tasks: build the documents, score or generate, compute metrics, summarise (`run_task`, `run_tasks`)."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence

from imtune.evaluation.humaneval import run_humaneval, samples_per_problem, select_problems
from imtune.evaluation.tasks.data import load_mc
from imtune.evaluation.tasks.metrics import (
    bbh_correct,
    extract_bbh_answer,
    extract_gsm8k_answer,
    gsm8k_correct,
    mc2_score,
    mc_predictions,
    squad_em,
    squad_f1,
)
from imtune.evaluation.tasks.prompts import (
    GEN_SETTINGS,
    GenDoc,
    MCDoc,
    build_gen_docs,
    build_mc_docs,
    first_n,
)
from imtune.evaluation.tasks.registry import TASKS, TaskSpec, parse_tasks
from imtune.statistics import mean_stderr


def _summarise(per_doc: dict[str, list[float]], groups: list[str] | None = None) -> tuple[dict, dict, dict]:
    metrics, stderr = {}, {}
    for name, vals in per_doc.items():
        m, se = mean_stderr(vals)
        metrics[name] = m
        stderr[name] = se
    sub = {}
    if groups and len(set(groups)) > 1:
        for g in sorted(set(groups)):
            idx = [i for i, x in enumerate(groups) if x == g]
            sub[g] = {"n": len(idx), **{k: sum(v[i] for i in idx) / len(idx) for k, v in per_doc.items()}}
    return metrics, stderr, sub


def _run_mc(model, tokenizer, spec, docs: list[MCDoc], opts) -> tuple[dict, dict, dict, list]:
    from imtune.evaluation.scoring import loglikelihood

    requests, spans = [], []
    for d in docs:
        spans.append((len(requests), len(d.contexts)))
        requests.extend(zip(d.contexts, d.continuations, strict=True))
    out = loglikelihood(model, tokenizer, requests, batch_size=opts["batch_size"], reuse=opts["reuse"],
                        progress=opts["progress"])
    per: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for d, (start, n) in zip(docs, spans, strict=True):
        lls = [ll for ll, _ in out[start:start + n]]
        if spec.name == "truthfulqa_mc2":
            per["mc2"].append(mc2_score(lls, d.labels))
            pred = None
        else:
            pred, pred_norm = mc_predictions(lls, d.lengths)
            per["acc"].append(float(pred == d.gold))
            if "acc_norm" in TASKS[spec.name].metrics:
                per["acc_norm"].append(float(pred_norm == d.gold))
        if opts["log_samples"]:
            samples.append({"context": d.contexts[d.gold], "choices": d.continuations, "gold": d.gold,
                            "loglikelihoods": lls, "prediction": pred})
    groups = [d.group for d in docs]
    metrics, stderr, sub = _summarise(per, groups)
    if spec.name == "mmlu":
        # acc is the micro average over questions (lm-eval's size-weighted group score); acc_macro averages the
        # subjects, as in the original MMLU paper.
        accs = [s["acc"] for s in sub.values()] or [metrics["acc"]]
        metrics["acc_macro"], stderr["acc_macro"] = sum(accs) / len(accs), None
    return metrics, stderr, sub, samples


def _run_lambada(model, tokenizer, spec, rows: list[dict], opts):
    from imtune.evaluation.scoring import loglikelihood

    out = loglikelihood(model, tokenizer, [(r["context"], " " + r["continuation"]) for r in rows],
                        batch_size=opts["batch_size"], reuse=opts["reuse"], progress=opts["progress"])
    accs = [float(g) for _, g in out]
    lls = [ll for ll, _ in out]
    acc, se = mean_stderr(accs)
    ppl = math.exp(-sum(lls) / len(lls)) if lls else float("nan")
    samples = [{"context": r["context"][-200:], "target": r["continuation"], "loglikelihood": ll, "greedy": g}
               for r, (ll, g) in zip(rows, out, strict=True)] if opts["log_samples"] else []
    return {"acc": acc, "perplexity": ppl}, {"acc": se, "perplexity": None}, {}, samples


def _run_generate(model, tokenizer, spec, docs: list[GenDoc], opts):
    from imtune.evaluation.generation import generate_texts
    from imtune.evaluation.scoring import default_add_bos

    max_new, stop = GEN_SETTINGS[spec.name]
    if opts["max_new_tokens"] is not None:
        max_new = opts["max_new_tokens"]
    outs = generate_texts(model, tokenizer, [d.prompt for d in docs], max_new_tokens=max_new, stop=stop,
                          batch_size=opts["batch_size"], seed=opts["seed"], progress=opts["progress"],
                          add_special_tokens=default_add_bos(model))
    per: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for d, text in zip(docs, outs, strict=True):
        if spec.name == "gsm8k":
            flex, strict = extract_gsm8k_answer(text), extract_gsm8k_answer(text, strict=True)
            per["exact_match"].append(float(gsm8k_correct(flex, d.target)))
            per["exact_match_strict"].append(float(gsm8k_correct(strict, d.target)))
            pred = flex
        elif spec.name == "bbh":
            pred = extract_bbh_answer(text)
            per["exact_match"].append(float(bbh_correct(pred, d.target)))
        else:  # tydiqa
            pred = text.strip()
            per["f1"].append(max(squad_f1(pred, g) for g in d.target))
            per["exact_match"].append(max(squad_em(pred, g) for g in d.target))
        if opts["log_samples"]:
            samples.append({"prompt_tail": d.prompt[-300:], "generation": text, "prediction": pred,
                            "target": d.target, **({"subtask": d.group} if d.group else {})})
    metrics, stderr, sub = _summarise(per, [d.group for d in docs])
    return metrics, stderr, sub, samples


def _run_humaneval(model, tokenizer, spec, docs: list[GenDoc], opts):
    per, samples = run_humaneval(model, tokenizer, [d.meta for d in docs], opts)
    metrics, stderr, sub = _summarise(per)
    return metrics, stderr, sub, samples


def run_task(model, tokenizer, spec: TaskSpec | str, *, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, n_samples: int = 1,
             temperature: float | None = None, seed: int = 0, reuse: bool = True, progress: bool = True,
             log_samples: bool = False, code_timeout: float = 10.0, code_workers: int | None = None,
             completions: dict[str, list[str]] | None = None, allow_unsafe_exec: bool = False) -> dict:
    """Evaluate one task; returns {metrics, stderr, n, num_fewshot, time_s[, subtasks][, samples]}.

    `completions` (task_id -> completions) scores given HumanEval completions instead of generating them;
    `allow_unsafe_exec` runs them even where the sandbox has no OS isolation (see evaluation.sandbox).
    An lm-eval spec gives lm-eval's result for that name; a tag's tasks come back under "subtasks"."""
    if isinstance(spec, str):
        (spec,) = parse_tasks(spec)
    if spec.lm_eval:
        out = _run_lm_eval(model, tokenizer, [spec], dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                                          max_new_tokens=max_new_tokens, seed=seed, reuse=reuse,
                                                          progress=progress, log_samples=log_samples))
        if spec.label in out:
            return out.pop(spec.label) | ({"subtasks": {k: v["metrics"] for k, v in out.items()}} if out else {})
        return {"metrics": {}, "stderr": {}, "n": sum(v["n"] for v in out.values()), "num_fewshot": spec.num_fewshot,
                "time_s": max((v["time_s"] for v in out.values()), default=0.0),
                "subtasks": {k: v["metrics"] for k, v in out.items()}}
    info = TASKS[spec.name]
    k = spec.num_fewshot if spec.num_fewshot is not None else (
        num_fewshot if num_fewshot is not None else info.default_fewshot)
    if info.max_fewshot is not None:
        k = min(k, info.max_fewshot)
    opts = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, n_samples=n_samples, temperature=temperature,
                seed=seed, reuse=reuse, progress=progress, log_samples=log_samples, code_timeout=code_timeout,
                code_workers=code_workers, completions=completions, allow_unsafe_exec=allow_unsafe_exec)
    t0 = time.perf_counter()
    if info.kind == "multiple_choice":
        docs = build_mc_docs(spec, limit, k)
        metrics, stderr, sub, samples = _run_mc(model, tokenizer, spec, docs, opts)
    elif info.kind == "loglikelihood":
        docs = first_n(load_mc(spec.name), limit)
        metrics, stderr, sub, samples = _run_lambada(model, tokenizer, spec, docs, opts)
    elif info.kind == "generate":
        docs = build_gen_docs(spec, limit, k)
        metrics, stderr, sub, samples = _run_generate(model, tokenizer, spec, docs, opts)
    else:
        docs = [GenDoc(p["prompt"], None, meta=p) for p in select_problems(limit, completions)]
        metrics, stderr, sub, samples = _run_humaneval(model, tokenizer, spec, docs, opts)
    out = {"metrics": metrics, "stderr": stderr, "n": len(docs), "num_fewshot": k,
           "time_s": round(time.perf_counter() - t0, 3)}
    if info.kind == "code":
        out["n_samples"] = samples_per_problem(n_samples, completions)
    if sub:
        out["subtasks"] = sub
    if log_samples:
        out["samples"] = samples
    return out


def _run_lm_eval(model, tokenizer, specs: list[TaskSpec], opts: dict) -> dict[str, dict]:
    """lm-eval specs in one harness run per few-shot setting; results keyed by lm-eval's task names, except
    that a requested name with '@k' keeps its label."""
    from imtune.evaluation.lm_eval_backend import evaluate

    by_shots: dict[int | None, list[TaskSpec]] = {}
    for s in specs:
        by_shots.setdefault(s.num_fewshot if s.num_fewshot is not None else opts["num_fewshot"], []).append(s)
    out: dict[str, dict] = {}
    for shots, group in by_shots.items():
        res = evaluate(model, tokenizer, [s.name for s in group], **{**opts, "num_fewshot": shots})
        for s in group:
            plain = TaskSpec(s.name, lm_eval=True).label
            if plain in res and s.label != plain:
                res[s.label] = res.pop(plain)
        out.update(res)
    return out


def run_tasks(model, tokenizer, tasks: str | Sequence[str], limit: int | None = None, *,
              num_fewshot: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
              n_samples: int = 1, temperature: float | None = None, seed: int = 0, reuse: bool = True,
              progress: bool = True, log_samples: bool = False, code_timeout: float = 10.0,
              code_workers: int | None = None, completions: dict[str, list[str]] | None = None,
              allow_unsafe_exec: bool = False, apply_chat_template: bool = False,
              on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Evaluate `model` on `tasks` ('arc_easy,mmlu@5,bbh:navigate,lm-eval:hellaswag', a list, or a group: all,
    loglikelihood, generative). Returns {"results": {task label: run_task(...) dict}, "config": {...}}.

    `limit` caps examples per task (spread evenly over subtasks for mmlu/bbh); `num_fewshot` overrides every
    task's default (a task's own '@k' wins); `on_result(label, result)` is called as each task finishes.
    lm-eval tasks run last, in lm-eval (every task and group it reports becomes a result), with the tokenizer's
    chat template when `apply_chat_template`; built-in tasks always use raw text.
    """
    specs = parse_tasks(tasks)
    results = {}
    for spec in (s for s in specs if not s.lm_eval):
        res = run_task(model, tokenizer, spec, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, n_samples=n_samples, temperature=temperature, seed=seed,
                       reuse=reuse, progress=progress, log_samples=log_samples, code_timeout=code_timeout,
                       code_workers=code_workers, completions=completions,
                       allow_unsafe_exec=allow_unsafe_exec)
        results[spec.label] = res
        if on_result is not None:
            on_result(spec.label, res)
    lm_specs = [s for s in specs if s.lm_eval]
    if lm_specs:
        res = _run_lm_eval(model, tokenizer, lm_specs, dict(
            limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
            reuse=reuse, progress=progress, log_samples=log_samples, apply_chat_template=apply_chat_template))
        for label, r in res.items():
            results[label] = r
            if on_result is not None:
                on_result(label, r)
    config = {"tasks": [s.label for s in specs], "limit": limit, "num_fewshot": num_fewshot,
              "batch_size": batch_size, "max_new_tokens": max_new_tokens, "n_samples": n_samples,
              "temperature": temperature, "seed": seed, "prompt_reuse": reuse,
              "prompt_format": "raw text (no chat template)"}
    if lm_specs:
        import lm_eval

        config["lm_eval"] = {"version": lm_eval.__version__, "apply_chat_template": apply_chat_template}
    return {"results": results, "config": config}
