"""lm-evaluation-harness through imtune's backend: per request equal to lm-eval's own Hugging Face backend (HFLM)
on the tiny model, bundled lm-eval tasks score like HFLM and like imtune's built-in tasks, and the CLI."""

import json
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'imtune[lmeval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from imtune.cli.main import main  # noqa: E402
from imtune.evaluation import lm_eval_backend as B  # noqa: E402
from imtune.evaluation.tasks import gsm8k_prompt, load_gsm8k, parse_tasks, run_tasks  # noqa: E402

REQUESTS = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Question: What is 2 + 2?\nAnswer:", " four is it"),
            ("The quick brown fox ", "jumps"), ("", "Write a poem"), ("", "<|endoftext|>The sea"),
            ("Naïve café déjà vu — " * 3, " ünïcödé 你好 🙂"),
            ("The quick brown fox jumps over the lazy dog. " * 12, " Write a poem about the sea")]
ROLLING = ["The quick brown fox jumps over the lazy dog. " * 9, "Write a poem.", "<|endoftext|>Explain why " * 5]


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module", params=["plain", "bos"])
def tok(request, tiny_dir):
    """The tiny tokenizer as is, and one that prepends BOS like Llama-3's or Gemma's."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_dir))
    if request.param == "bos":
        t._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", t.bos_token_id)])
        assert t("a")["input_ids"][0] == t.bos_token_id
    return t


@pytest.fixture(scope="module")
def pair(tiny_model, tok):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny_model, tokenizer=tok, batch_size=3, device="cpu", max_length=64)
    ours = B.ImtuneLM(model=tiny_model, tokenizer=tok, batch_size=3, max_length=64)
    return hf, ours


def test_loglikelihood_equals_hflm(pair):
    hf, ours = pair
    ref = hf.loglikelihood(_instances("loglikelihood", REQUESTS), disable_tqdm=True)
    got = ours.loglikelihood(_instances("loglikelihood", REQUESTS))
    assert len(got) == len(REQUESTS)
    for (a, ga), (b, gb) in zip(got, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


def test_loglikelihood_rolling_equals_hflm(pair):
    hf, ours = pair
    args = [(t,) for t in ROLLING]
    ref = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", args), disable_tqdm=True)
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", args))
    assert len(hf.tok_encode(ROLLING[0])) > 64  # several windows
    assert got == pytest.approx(ref, abs=1e-3)


def test_generate_until_equals_hflm(pair):
    hf, ours = pair
    args = [("Question: What is 2 + 2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            ("Write a poem", {"until": ["sea"], "max_gen_toks": 5}),
            ("The quick brown", {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False})]
    ref = hf.generate_until(_instances("generate_until", args), disable_tqdm=True)
    assert ours.generate_until(_instances("generate_until", args)) == ref


BUNDLED = ["imtune_arc_easy", "imtune_hellaswag", "imtune_piqa", "imtune_openbookqa", "imtune_winogrande",
           "imtune_wsc273", "imtune_lambada_openai", "imtune_truthfulqa_mc1", "imtune_truthfulqa_mc2",
           "imtune_mmlu_anatomy", "imtune_gsm8k_cot"]
BUILTIN = {"imtune_mmlu_anatomy": "mmlu:anatomy", "imtune_gsm8k_cot": "gsm8k"}


@pytest.mark.slow
def test_bundled_tasks_score_like_hflm_and_builtin(tiny_model, tiny_tok):
    """Bundled lm-eval tasks, 6 rows each: imtune's backend equals HFLM, and equals imtune's built-in task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny_model, tokenizer=tiny_tok, batch_size=4, device="cpu")
    theirs = simple_evaluate(model=hf, tasks=BUNDLED, limit=6, task_manager=B.task_manager(),
                             gen_kwargs={"max_gen_toks": 12})["results"]
    ours = B.evaluate(tiny_model, tiny_tok, BUNDLED, limit=6, batch_size=4, max_new_tokens=12, log_samples=True)
    gsm = sorted(ours["lm-eval:imtune_gsm8k_cot"]["samples"], key=lambda s: s["doc_id"])[0]
    assert gsm["arguments"][0][0] == gsm8k_prompt(load_gsm8k()[0]["question"])  # lm-eval's 8 shots = ours
    for name in BUNDLED:
        got = ours[f"lm-eval:{name}"]
        assert got["n"] == 6
        for key, value in got["metrics"].items():
            metric, _, filt = key.partition("[")
            ref = theirs[name][f"{metric},{filt.rstrip(']') or 'none'}"]
            exact = metric in ("acc", "acc_norm", "exact_match") and name != "imtune_truthfulqa_mc2"  # counts
            assert value == pytest.approx(ref, rel=1e-9 if exact else 1e-3), (name, key)
    labels = [BUILTIN.get(n, n[len("imtune_"):]) for n in BUNDLED]
    builtin = run_tasks(tiny_model, tiny_tok, labels, limit=6, progress=False, max_new_tokens=12)["results"]
    for name, label in zip(BUNDLED, labels, strict=True):
        got = ours[f"lm-eval:{name}"]["metrics"]
        for metric, value in builtin[label]["metrics"].items():
            key = {"mc2": "acc", "acc_macro": "acc", "exact_match": "exact_match[flexible-extract]",
                   "exact_match_strict": "exact_match[strict-match]"}.get(metric, metric)
            assert got[key] == pytest.approx(value, rel=1e-3), (name, metric)
    assert {"imtune_mmlu", "imtune_mmlu_virology", "imtune"} <= set(B.task_manager().all_tasks) | set(
        B.task_manager().all_groups) | set(B.task_manager().all_tags)


def test_parse_lm_eval_prefix():
    specs = parse_tasks("arc_easy,lm-eval:hellaswag@5,mmlu, lm-eval:piqa")
    assert [(s.label, s.lm_eval) for s in specs] == [("arc_easy", False), ("lm-eval:hellaswag@5", True),
                                                     ("lm-eval:mmlu", True), ("lm-eval:piqa", True)]


@pytest.mark.slow
def test_cli_lm_eval_tasks_with_and_without_chat_template(tiny_dir, tmp_path, capsys):
    dest = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tiny_dir), "--tasks", "arc_easy,lm-eval:imtune_arc_easy,imtune_piqa",
                 "--limit", "3", "--out", str(dest), "--log-samples"]) == 0
    res = json.loads(dest.read_text())
    assert set(res["results"]) == {"arc_easy", "lm-eval:imtune_arc_easy", "lm-eval:imtune_piqa"}
    assert res["results"]["lm-eval:imtune_arc_easy"]["metrics"] == res["results"]["arc_easy"]["metrics"]
    assert res["config"]["lm_eval"]["apply_chat_template"] is False
    raw = res["results"]["lm-eval:imtune_arc_easy"]["samples"][0]["arguments"]
    assert "lm-eval:imtune_arc_easy" in capsys.readouterr().out

    assert main(["evaluate", "--model", str(tiny_dir), "--tasks", "lm-eval:imtune_arc_easy", "--limit", "3",
                 "--apply-chat-template", "--out", str(dest), "--log-samples", "--overwrite"]) == 0
    res = json.loads(dest.read_text())
    chat = res["results"]["lm-eval:imtune_arc_easy"]["samples"][0]["arguments"]
    question = raw[0][0]
    assert chat[0][0] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    # lm-eval drops the space delimiter when the answer follows an assistant header.
    assert [a[1] for a in chat] == [a[1][1:] for a in raw]
    assert res["config"]["lm_eval"]["apply_chat_template"] is True


def test_cli_unknown_lm_eval_task_is_one_line(capsys):
    assert main(["evaluate", "--tasks", "lm-eval:imtune_arc_eazy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown lm-eval task 'imtune_arc_eazy'" in err and "imtune_arc_easy" in err


def test_missing_lm_eval_is_one_line(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    monkeypatch.delitem(sys.modules, "imtune.evaluation.lm_eval_backend")
    assert main(["evaluate", "--tasks", "lm-eval:hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'imtune[lmeval]'" in err


def test_offline_hub_task_says_to_use_the_bundled_copy(tiny_dir, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as conftest's HF_HUB_OFFLINE=1: no network
    assert main(["evaluate", "--model", str(tiny_dir), "--tasks", "lm-eval:arc_easy", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not load the data of arc_easy" in err and "lm-eval:imtune_arc_easy" in err
