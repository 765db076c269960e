"""Benchmark tasks: imtune's own runner on the bundled evaluation data, and any lm-evaluation-harness task.

Two ways to evaluate, both scored by the same packed log-likelihood engine (`imtune.evaluation.scoring`) and the
same batched generator (`imtune.evaluation.generation`):

* Built-in tasks (`arc_easy`, `mmlu@5`, `bbh:navigate`, ...) run here, offline, on the files under
  imtune/data/eval. They follow lm-eval's prompt formats and metrics (cited per task in `prompts`); the test suite
  checks request for request that they equal lm-eval's own runs of the same rows.
* `lm-eval:TASK` runs lm-evaluation-harness itself (`pip install imtune[lmeval]`), with imtune registered as its
  model backend (`imtune.evaluation.lm_eval_backend`): every lm-eval task online, and offline the bundled files
  as lm-eval tasks (`lm-eval:imtune_arc_easy`, ...; their YAMLs ship under imtune/data/eval/lm_eval). With
  `apply_chat_template` lm-eval renders the prompts with the tokenizer's chat template.

Built-in prompts are raw text even for chat-tuned models, as in the paper's lm-eval runs: no chat template is
applied, and no special tokens are added except BOS for Gemma models (see scoring.default_add_bos).

Task results are means over examples with the standard error of the mean (sample std / sqrt(n), as lm-eval);
LAMBADA perplexity is exp(-mean log-likelihood) and has no standard error here.

Modules: `data` (loaders), `registry` (task table, task-list parsing), `prompts` (documents and prompts),
`metrics` (per-example metrics), `runner` (`run_task`, `run_tasks`).
"""

from __future__ import annotations

import importlib

# Public names and the submodule each lives in; resolved on first use.
_EXPORTS = {
    "data": ("DATA", "MC_FILES", "bbh_subtasks", "load_bbh", "load_bbh_prompt", "load_gsm8k", "load_mc", "load_mmlu",
             "load_truthfulqa", "load_tydiqa", "mmlu_subjects"),
    "metrics": ("bbh_correct", "extract_bbh_answer", "extract_gsm8k_answer", "gsm8k_correct", "mc2_score",
                "mc_predictions", "normalize_answer", "squad_em", "squad_f1"),
    "prompts": ("GEN_SETTINGS", "GSM8K_COT_EXEMPLARS", "TRUTHFULQA_PREAMBLE", "TYDIQA_INSTRUCTION", "GenDoc", "MCDoc",
                "bbh_prompt", "build_gen_docs", "build_mc_docs", "gsm8k_prompt", "mmlu_prompt", "tydiqa_prompt"),
    "registry": ("ALIASES", "GROUPS", "TASKS", "TaskInfo", "TaskSpec", "list_tasks", "parse_tasks"),
    "runner": ("run_task", "run_tasks"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
