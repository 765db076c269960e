"""Evaluation: benchmark tasks (`tasks`), the log-likelihood engine (`scoring`), the code sandbox (`sandbox`), and
the chat/judge evaluations in the sibling modules.

    run_tasks(model, tokenizer, tasks, limit=None, ...) -> {"results": {task: {...}}, "config": {...}}
    run_task(model, tokenizer, task, ...) -> {...}
    list_tasks() -> [TaskInfo]
    loglikelihood(model, tokenizer, [(context, continuation)], batch_size=16) -> [(logprob, is_greedy)]

Imported lazily so that `import imtune.evaluation.<module>` does not pull in torch or the task tables.
"""

from __future__ import annotations

_LAZY = {
    "run_tasks": ("tasks", "run_tasks"),
    "run_task": ("tasks", "run_task"),
    "list_tasks": ("tasks", "list_tasks"),
    "parse_tasks": ("tasks", "parse_tasks"),
    "TASKS": ("tasks", "TASKS"),
    "loglikelihood": ("scoring", "loglikelihood"),
    "run_program": ("sandbox", "run_program"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
