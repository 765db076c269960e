"""lm-evaluation-harness with imtune as its model backend: `imtune evaluate --tasks lm-eval:TASK[,...]`.

`ImtuneLM` is an `lm_eval.api.model.LM`, registered as lm-eval model "imtune" once this module is imported
(then `lm_eval.simple_evaluate(model="imtune", model_args="pretrained=...")` works too). Its three request types run on imtune's engines:

* loglikelihood: `scoring.loglikelihood_tokens`, which packs the choices of a question behind one pass over their
  shared context (lm-eval's HF backend re-runs the context per multi-token choice);
* loglikelihood_rolling: lm-eval's own rolling windows (`lm_eval.utils.get_rolling_token_windows`), scored by the
  same engine;
* generate_until: `generation.generate_texts`, imtune's batched generator (which also stops at the chat template's
  end-of-turn token).

Tokenisation follows lm-eval's HF backend, so per-request log-likelihoods equal it (tests/test_lm_eval_backend.py):
a context's trailing spaces move to the continuation, BOS is added exactly when the tokenizer adds it by default
(or when the text does not already start with it), and an empty context is the BOS (else EOS) token.

`--apply-chat-template` hands lm-eval the tokenizer's chat template: each prompt (with few-shot examples as
turns) is rendered as a conversation ending in the assistant's turn.

Offline, lm-eval's own tasks cannot fetch their datasets; the bundled evaluation files are lm-eval tasks too
(`imtune_arc_easy`, `imtune_hellaswag`, `imtune_gsm8k_cot`, ..., tag `imtune`; group `imtune_mmlu`), from the YAMLs
in imtune/data/eval/lm_eval.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from imtune.errors import ImtuneError

MISSING = "lm-eval tasks need lm-evaluation-harness: pip install 'imtune[lmeval]'"
TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "eval" / "lm_eval"

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # the optional extra is not installed
    raise ImtuneError(MISSING) from e


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by default, which is what lm-eval's HF backend then does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


class ImtuneLM(LM):
    """An lm-eval model backed by imtune's scoring engine and generator (see the module docstring)."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 16,
                 reuse: bool = True, add_bos: bool | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0,
                 progress: bool = False, dtype: str = "float32", device: str | None = None,
                 trust_remote_code: bool = False, **_ignored):
        super().__init__()
        if model is None:
            if not pretrained:
                raise ImtuneError("the imtune lm-eval model needs pretrained=MODEL (a path, alias or Hub id)")
            from imtune.models import load_model, load_tokenizer

            tokenizer = load_tokenizer(pretrained, trust_remote_code=trust_remote_code)
            model = load_model(pretrained, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        from imtune.evaluation.scoring import default_add_bos, max_length_of, prefix_token_id

        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # lm-eval's "auto" is not ours
        self.reuse, self.seed, self.progress = bool(reuse), int(seed), progress
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = add_bos if add_bos is not None else (_adds_bos(tokenizer) or default_add_bos(model))
        self.max_length = int(max_length) if max_length else max_length_of(model, tokenizer)
        self.prefix_id = prefix_token_id(tokenizer)
        bos = getattr(tokenizer, "bos_token", None)
        self._bos_text = bos if isinstance(bos, str) and bos else None

    # ------------------------------------------------------------------------------------------ tokenisation

    def _encode(self, text: str) -> list[int]:
        special = self.add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            # As lm-eval: the prefix token conditions the continuation, unless the continuation starts with it.
            return ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self._encode(context)
        return ctx, self._encode(context + continuation)[len(ctx):]

    # ------------------------------------------------------------------------------------------- requests

    def _score(self, pairs, disable_tqdm: bool) -> list[tuple[float, bool]]:
        from imtune.evaluation.scoring import loglikelihood_tokens

        return loglikelihood_tokens(self.model, pairs, self.batch_size, reuse=self.reuse, max_length=self.max_length,
                                    progress=self.progress and not disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self._score([self._pair(*r.args) for r in requests], disable_tqdm)
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            for w in get_rolling_token_windows(token_list=self._encode(r.args[0]), prefix_token=self.prefix_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(windows, disable_tqdm), strict=True):
            totals[i] += ll
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from imtune.evaluation.generation import generate_texts

        eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            has_bos = bool(self._bos_text and context.startswith(self._bos_text))
            groups.setdefault((json.dumps(gen_kwargs, sort_keys=True, default=str), has_bos), []).append(i)
        out: list[str] = [""] * len(requests)
        for (_, has_bos), idx in groups.items():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            texts = generate_texts(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                                   max_new_tokens=int(kwargs.pop("max_gen_toks")),
                                   do_sample=bool(kwargs.get("do_sample")),
                                   temperature=float(kwargs.get("temperature") or 0.0),
                                   top_p=float(kwargs.get("top_p") or 1.0), stop=until, batch_size=self.batch_size,
                                   seed=self.seed, add_special_tokens=self.add_bos and not has_bos,
                                   progress=self.progress and not disable_tqdm)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # -------------------------------------------------------------------------------------- chat template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ImtuneError("--apply-chat-template: this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None


if "imtune" not in model_registry:  # a re-imported module must not register a second class under the name
    model_registry.register("imtune")(ImtuneLM)


@functools.cache
def task_manager():
    """lm-eval's task index with the bundled task YAMLs added (built once: it reads every task YAML)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR))


def check_tasks(names: Sequence[str], manager=None) -> None:
    """ImtuneError naming the first task lm-eval does not know (before any model is loaded)."""
    import difflib

    manager = manager or task_manager()
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ImtuneError(f"unknown lm-eval task {name!r}{hint}; 'lm_eval ls tasks' lists them, and "
                              f"lm-eval:imtune runs the bundled copies offline")


def _metric_name(key: str) -> tuple[str, bool]:
    """'acc,none' -> ('acc', False); 'exact_match_stderr,strict-match' -> ('exact_match[strict-match]', True)."""
    metric, _, filt = key.partition(",")
    stderr = metric.endswith("_stderr")
    metric = metric[: -len("_stderr")] if stderr else metric
    return (metric if filt in ("", "none") else f"{metric}[{filt}]"), stderr


def _as_result(entry: dict, n: int, shots, seconds: float) -> dict:
    metrics, stderr = {}, {}
    for key, value in entry.items():
        if key in ("alias", "sample_len", "name") or "," not in key:
            continue
        name, is_se = _metric_name(key)
        number = float(value) if isinstance(value, (int, float)) else None
        (stderr if is_se else metrics)[name] = number
    for name in metrics:
        stderr.setdefault(name, None)
    return {"metrics": metrics, "stderr": stderr, "n": n, "num_fewshot": shots, "time_s": round(seconds, 3)}


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def evaluate(model, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, apply_chat_template: bool = False,
             seed: int = 0, reuse: bool = True, progress: bool = False, log_samples: bool = False) -> dict:
    """Run lm-eval `tasks` (task, group or tag names) on `model` through `ImtuneLM`; returns
    {"lm-eval:NAME": {metrics, stderr, n, num_fewshot, time_s[, samples]}} for every task and group lm-eval
    reports, `time_s` being the wall time of the whole run. Metrics keep lm-eval's names ('acc', 'acc_norm';
    a filter other than 'none' in brackets)."""
    from lm_eval import simple_evaluate

    manager = task_manager()
    check_tasks(tasks, manager)
    lm = ImtuneLM(model=model, tokenizer=tokenizer, batch_size=batch_size, reuse=reuse, seed=seed,
                  progress=progress)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices would drown imtune's table
    t0 = time.perf_counter()
    try:
        res = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, apply_chat_template=apply_chat_template,
                              log_samples=log_samples, random_seed=seed,
                              gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None)
    except (ConnectionError, OSError) as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImtuneError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: {why}); "
                          f"offline, run the bundled copies (lm-eval:imtune, lm-eval:imtune_arc_easy, ...)") from e
    seconds = time.perf_counter() - t0
    counts = res.get("n-samples", {})
    out = {}
    for name, entry in res["results"].items():
        n = counts.get(name, {}).get("effective")
        if n is None:  # a group: the documents of its tasks
            n = sum(c.get("effective", 0) for t, c in counts.items() if t in res.get("group_subtasks", {}).get(
                name, []))
        result = _as_result(entry, int(n), res.get("n-shot", {}).get(name), seconds)
        if log_samples and name in res.get("samples", {}):
            result["samples"] = _jsonable([{k: s.get(k) for k in ("doc_id", "arguments", "filtered_resps", "target")}
                                           | {m: s.get(m) for m in result["metrics"] if m in s}
                                           for s in res["samples"][name]])
        out[f"lm-eval:{name}"] = result
    return out
