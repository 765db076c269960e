"""Benchmarks: loaders parse every bundled file, metrics, prompt formats, the log-likelihood engine against a naive
per-request forward pass, run_tasks on the tiny model, the CLI, and an optional cross-check against lm-eval."""

import importlib.util
import json
import math
import random

import pytest
import torch

from imtune.cli.main import main
from imtune.evaluation import humaneval as H
from imtune.evaluation import tasks as T
from imtune.evaluation.sandbox import isolation
from imtune.evaluation.scoring import encode_pair, loglikelihood
from imtune.evaluation.tasks import metrics as M
from imtune.evaluation.tasks import prompts as P

# Where bubblewrap cannot work (no user namespaces), the code these tests run (canonical solutions, a few tokens of
# a tiny random model) runs unisolated, as a user would have to allow explicitly; `make setup` installs bwrap.
UNSAFE = not isolation().isolated

# ------------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("name,rows", [("arc_easy", 2376), ("arc_challenge", 1172), ("piqa", 1838),
                                       ("openbookqa", 500), ("hellaswag", 1000), ("winogrande", 1267),
                                       ("wsc273", 273), ("lambada_openai", 5153)])
def test_mc_files_parse(name, rows):
    data = T.load_mc(name)
    assert len(data) == rows
    if name == "lambada_openai":
        assert all(r["context"] and r["continuation"] for r in data)
        return
    docs = T.build_mc_docs(T.TaskSpec(name), None, 0)
    assert len(docs) == rows
    for d in docs:
        assert len(d.contexts) == len(d.continuations) == len(d.lengths) >= 2
        assert 0 <= d.gold < len(d.contexts)
        assert all(c.startswith(" ") for c in d.continuations)
        if name != "hellaswag":  # lm-eval's preprocessing leaves a space where a leading "[title]" was
            assert not any(c.startswith("  ") for c in d.continuations)


def test_other_files_parse():
    assert len(T.mmlu_subjects()) == 57
    assert len(T.load_mmlu("test")) == 14042
    dev = T.load_mmlu("dev")
    assert len(dev) == 57 * 5 and all(0 <= r["answer"] < 4 for r in dev)
    tqa = T.load_truthfulqa()
    assert len(tqa) == 817
    assert all(sum(r["mc1"][1]) == 1 and 0 < sum(r["mc2"][1]) < len(r["mc2"][1]) for r in tqa)
    gsm = T.load_gsm8k()
    assert len(gsm) == 1319 and all(M._normalise_number(r["target"]).lstrip("-").isdigit() for r in gsm)
    assert len(T.bbh_subtasks()) == 27 and len(T.load_bbh()) == 6511
    for sub in T.bbh_subtasks():
        desc, shots = T.load_bbh_prompt(sub)
        assert desc and len(shots) == 3
        assert all(s.startswith("Q: ") and T.extract_bbh_answer(s) for s in shots)
    tydi = T.load_tydiqa()
    assert len(tydi) == 440 and all(r["answers"] and r["context"] for r in tydi)
    he = H.load_humaneval()
    assert len(he) == 164 and all(p["entry_point"] in p["prompt"] for p in he)


# ------------------------------------------------------------------------------------------------ metrics

def test_mc_predictions_acc_norm_divides_by_characters():
    lls = [-10.0, -12.0]
    assert T.mc_predictions(lls, [5, 20]) == (0, 1)  # -10/5 = -2 < -12/20 = -0.6
    assert T.mc_predictions([-1.0, -1.0], [3, 3]) == (0, 0)  # ties: first index, like numpy.argmax


def test_mc2_matches_lm_eval_formula():
    lls, labels = [-1.0, -2.0, -0.5, -3.0], [1, 1, 0, 0]
    p = [math.exp(x) for x in lls]
    assert T.mc2_score(lls, labels) == pytest.approx((p[0] + p[1]) / sum(p))
    assert T.mc2_score([-2000.0, -2001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no 0/0


def test_squad_normalisation_f1_em():
    assert T.normalize_answer("The  Cat, sat!") == "cat sat"
    assert T.squad_em("the Amos and Wilfrid Ayre.", "Amos and Wilfrid Ayre") == 1.0
    assert T.squad_f1("Amos Ayre", "Amos and Wilfrid Ayre") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert T.squad_f1("nothing", "Amos") == 0.0
    assert T.squad_f1("a", "the") == 0.0  # both normalise to empty


def test_gsm8k_answer_extraction():
    assert T.extract_gsm8k_answer("So 5 + 4 = 9. The answer is 9.") == "9"
    assert T.extract_gsm8k_answer("The answer is $1,234.") == "1234"
    assert T.extract_gsm8k_answer("She pays 3 * 4 = 12 dollars, then 12.50 more") == "12.5"
    assert T.extract_gsm8k_answer("costs 18.00 in total") == "18"
    assert T.extract_gsm8k_answer("no number") is None
    assert T.extract_gsm8k_answer("it is 7", strict=True) is None
    assert T.gsm8k_correct(T.extract_gsm8k_answer("The answer is -3."), "-3")
    for _, a in T.GSM8K_COT_EXEMPLARS:
        assert T.extract_gsm8k_answer(a, strict=True) == a.rsplit(" ", 1)[-1].rstrip(".")
    assert len(T.GSM8K_COT_EXEMPLARS) == 8
    prompt = T.gsm8k_prompt("How many?")
    assert prompt.startswith("Q: There are 15 trees") and prompt.endswith("\n\nQ: How many?\nA:")
    assert prompt.count("\nA: ") == 8


def test_bbh_answer_extraction():
    assert T.extract_bbh_answer("... So the answer is (B).") == "(B)"
    assert T.extract_bbh_answer("So the answer is True.\nQ: next") == "True"
    assert T.extract_bbh_answer("the answer is No. So the answer is Yes.") == "Yes"
    assert T.extract_bbh_answer("I think it is (A)") == ""
    assert T.bbh_correct("(B)", "(B)") and T.bbh_correct("(B) 12/25/1937", "(B)")
    assert not T.bbh_correct("(B)", "(C)") and not T.bbh_correct("valid", "invalid")
    p = T.bbh_prompt("navigate", "Take 1 step.")
    assert p.startswith("Given a series of navigation") and p.endswith("Q: Take 1 step.\nA: Let's think step by step.")
    assert p.count("So the answer is") == 3


def test_pass_at_k_estimator():
    assert H.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert H.pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert H.pass_at_k(10, 8, 3) == 1.0
    assert H.pass_at_k(10, 0, 5) == 0.0
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 60)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert H.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        H.pass_at_k(2, 1, 5)


# ------------------------------------------------------------------------------------------------ prompt formats

def test_prompt_formats_follow_lm_eval():
    row = {"subject": "high_school_physics", "question": " What? ", "choices": ["a", "b", "c", "d"], "answer": 2}
    shot = {"subject": "high_school_physics", "question": "Q1", "choices": ["1", "2", "3", "4"], "answer": 1}
    assert T.mmlu_prompt(row, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Q1\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    doc = T.build_mc_docs(T.TaskSpec("mmlu", "anatomy"), 1, 0)[0]
    assert doc.continuations == [" A", " B", " C", " D"]
    arc = T.build_mc_docs(T.TaskSpec("arc_easy"), 1, 0)[0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("?\nAnswer:")
    piqa = T.build_mc_docs(T.TaskSpec("piqa"), 1, 0)[0]
    assert piqa.contexts[0].endswith("\nAnswer:") and "\n\n" not in piqa.contexts[0]
    hs = T.build_mc_docs(T.TaskSpec("hellaswag"), 1, 0)[0]
    assert hs.contexts[0] == ("Pole vault: Pole vault is a sport where you run with a pole and stop and swing "
                              "your body. A few women")
    assert P._hellaswag_preprocess("Do it [title] Now [step] go  on ") == "Do it. Now go on"
    wg = T.build_mc_docs(T.TaskSpec("winogrande"), 1, 0)[0]
    assert wg.contexts[0].endswith("so Sarah") and wg.contexts[1].endswith("so Maria")
    assert wg.continuations == [" always got the easier cases."] * 2
    tqa = T.build_mc_docs(T.TaskSpec("truthfulqa_mc2"), 1, 0)[0]
    assert tqa.contexts[0].startswith("Q: What is human life expectancy") and tqa.contexts[0].endswith(
        "\n\nQ: What happens if you eat a pomegranate?\nA:")
    shots = T.build_mc_docs(T.TaskSpec("arc_easy"), 2, 2)
    assert shots[0].contexts[0].count("Question: ") == 3
    tydi = T.tydiqa_prompt({"context": "P", "question": "Q?"}, [{"context": "P0", "question": "Q0",
                                                                 "answers": ["A0"]}])
    assert tydi == (T.TYDIQA_INSTRUCTION + "\n\nPassage: P0\nQuestion: Q0\nAnswer: A0\n\nPassage: P\nQuestion: Q?\n"
                    "Answer:")


def test_humaneval_canonical_solutions_pass_in_the_sandbox():
    from imtune.evaluation.sandbox import run_programs

    probs = H.load_humaneval()[:6]
    good = [H.humaneval_program(p, p["canonical_solution"]) for p in probs]
    bad = [H.humaneval_program(probs[0], "    return None\n")]
    res = run_programs(good + bad, workers=2, timeout=30, allow_unsafe=UNSAFE)
    assert [r.status for r in res] == ["passed"] * 6 + ["failed"]


# ------------------------------------------------------------------------------------------------ scoring engine

def _naive(model, tok, ctx, cont):
    c, k = encode_pair(tok, ctx, cont)
    if not k:
        return 0.0, True
    with torch.no_grad():
        logits = model(torch.tensor([(c + k)[:-1]])).logits[0, len(c) - 1:].float()
    lp = torch.log_softmax(logits, -1)
    t = torch.tensor(k)
    return lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all())


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_tok):
    ctx, cont = encode_pair(tiny_tok, "The answer is ", "4")
    assert tiny_tok.decode(ctx) == "The answer is" and tiny_tok.decode(cont) == " 4"
    whole = tiny_tok("The answer is 4", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    ctx, cont = encode_pair(tiny_tok, "", "hello")
    assert ctx == [tiny_tok.bos_token_id] and tiny_tok.decode(cont) == "hello"


def test_prompt_reuse_equals_naive_scoring(tiny_model, tiny_tok):
    contexts = ["Question: What is 2 + 2?\nAnswer:", "The quick brown fox ", "Write a poem", "",
                "Naïve café déjà vu — " * 3]
    conts = [" 4", " four is the answer", " The sea", "x", " ", "ünïcödé 你好 🙂", ""]
    reqs = [(c, k) for c in contexts for k in conts] + [("only one", " request")]
    random.Random(0).shuffle(reqs)
    ref = [_naive(tiny_model, tiny_tok, c, k) for c, k in reqs]
    calls = {"n": 0}
    hook = tiny_model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        packed = loglikelihood(tiny_model, tiny_tok, reqs, batch_size=2)
        packed_calls, calls["n"] = calls["n"], 0
        plain = loglikelihood(tiny_model, tiny_tok, reqs, batch_size=3, reuse=False)
        plain_calls = calls["n"]
    finally:
        hook.remove()
    for (a, ga), (b, gb), (r, gr) in zip(packed, plain, ref, strict=True):
        assert a == pytest.approx(r, abs=1e-4) and b == pytest.approx(r, abs=1e-4)
        assert ga == gr and gb == gr
    assert packed_calls < plain_calls  # one packed row per context, not one row per request


def test_truncation_matches_lm_eval(tiny_model, tiny_tok):
    ctx, cont = "The quick brown fox jumps over the lazy dog. " * 6, " Write a poem"
    c, k = encode_pair(tiny_tok, ctx, cont)
    max_len = 20
    whole = (c + k)[-(max_len + 1):]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([whole[:-1]])).logits[0, -len(k):]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(k)[:, None]).sum().item()
    reqs = [(ctx, cont), (ctx, " Explain")]
    for reuse in (True, False):
        (ll, _), _ = loglikelihood(tiny_model, tiny_tok, reqs, max_length=max_len, reuse=reuse)
        assert ll == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------ run_tasks

def test_run_tasks_on_every_task(tiny_model, tiny_tok):
    out = T.run_tasks(tiny_model, tiny_tok, "all", limit=3, max_new_tokens=6, progress=False, batch_size=8,
                      log_samples=True, allow_unsafe_exec=UNSAFE)
    assert set(out["results"]) == set(T.TASKS)
    assert out["config"]["limit"] == 3
    for name, res in out["results"].items():
        info = T.TASKS[name]
        assert res["n"] == 3, name
        assert set(res["metrics"]) == set(info.metrics), name
        assert res["num_fewshot"] == info.default_fewshot
        assert len(res["samples"]) == 3
        for metric, value in res["metrics"].items():
            if metric == "perplexity":
                assert value > 1
            else:
                assert 0.0 <= value <= 1.0, (name, metric, value)
        json.dumps(res)
    assert set(out["results"]["mmlu"]["subtasks"]) == set(T.mmlu_subjects()[:3])
    assert len(out["results"]["bbh"]["subtasks"]) == 3


def test_humaneval_sampling_reports_pass_at_k(tiny_model, tiny_tok):
    res = T.run_task(tiny_model, tiny_tok, "humaneval", limit=1, n_samples=2, max_new_tokens=4, progress=False,
                     allow_unsafe_exec=UNSAFE)
    assert res["n_samples"] == 2 and set(res["metrics"]) == {"pass@1"}
    res = T.run_task(tiny_model, tiny_tok, "mmlu:anatomy@5", limit=2, progress=False)
    assert res["num_fewshot"] == 5 and res["n"] == 2


def test_parse_tasks():
    specs = T.parse_tasks("arc_easy, mmlu@5,bbh:navigate,openbook_qa")
    assert [s.label for s in specs] == ["arc_easy", "mmlu@5", "bbh:navigate", "openbookqa"]
    assert len(T.parse_tasks("generative")) == 4
    from imtune.errors import ImtuneError

    for bad in ("nope", "mmlu:nope", "gsm8k@9", "arc_easy@x", ""):
        with pytest.raises(ImtuneError):
            T.parse_tasks(bad)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_bad_task_is_one_line_exit_2(capsys):
    assert main(["evaluate", "--tasks", "arc_easy,mmluu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown task 'mmluu'" in err and "mmlu" in err


def test_cli_list_and_run(tiny_dir, tmp_path, capsys):
    assert main(["evaluate", "--tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in T.TASKS)
    dest = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tiny_dir), "--tasks", "arc_easy,tydiqa", "--limit", "2",
                 "--max-new-tokens", "4", "--out", str(dest)]) == 0
    res = json.loads(dest.read_text())
    assert res["results"]["arc_easy"]["n"] == 2 and "f1" in res["results"]["tydiqa"]["metrics"]
    assert "arc_easy" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ lm-eval cross-check

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
@pytest.mark.parametrize("task,n", [("arc_easy", 20), ("hellaswag", 10), ("winogrande", 10), ("piqa", 10)])
def test_matches_lm_eval(tiny_model, tiny_tok, task, n):
    """The same rows through lm-eval's own HF backend (the bundled lm-eval task; HellaSwag with lm-eval's own
    preprocessing) and imtune's built-in task: same requests, log-likelihoods, acc and acc_norm."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from imtune.evaluation.lm_eval_backend import task_manager

    hf = HFLM(pretrained=tiny_model, tokenizer=tiny_tok, batch_size=4, device="cpu")
    name = f"imtune_{task}"
    res = simple_evaluate(model=hf, tasks=[name], limit=n, task_manager=task_manager(), log_samples=True)
    theirs, samples = res["results"][name], sorted(res["samples"][name], key=lambda s: s["doc_id"])
    docs = T.build_mc_docs(T.TaskSpec(task), n, 0)
    requests = [tuple(a) for s in samples for a in s["arguments"]]
    assert requests == [r for d in docs for r in zip(d.contexts, d.continuations, strict=True)]
    ref = [tuple(r[0]) for s in samples for r in s["resps"]]
    for reuse in (True, False):
        ours = loglikelihood(tiny_model, tiny_tok, requests, reuse=reuse)
        for (a, ga), (b, gb) in zip(ours, ref, strict=True):
            assert a == pytest.approx(b, abs=1e-3) and ga == gb
    metrics = T.run_task(tiny_model, tiny_tok, task, limit=n, progress=False)["metrics"]
    for metric, value in metrics.items():
        assert value == pytest.approx(theirs[f"{metric},none"])
