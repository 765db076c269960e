import json

import pytest
import sacrebleu

from imtune.cli.main import main
from imtune.errors import ImtuneError, InputError
from imtune.evaluation.memorisation import memorisation_scores, read_generations

REFS = ["The quick brown fox jumps over the lazy dog.", "Instruction tuning trains a language model.",
        "What is 2 + 2? The answer is 4.", "bonjour"]


def test_identical_outputs_score_maximal():
    s = memorisation_scores(REFS, REFS)
    assert s["n"] == 4
    assert s["corpus_bleu"] == pytest.approx(100.0)
    assert s["sentence_bleu"] == pytest.approx([100.0] * 4)  # effective order: one-word "bonjour" too
    assert s["sentence_bleu_mean"] == pytest.approx(100.0)
    assert s["rougeL"] == pytest.approx([1.0] * 4) and s["rougeL_mean"] == pytest.approx(1.0)


def test_disjoint_outputs_score_near_zero():
    outs = ["Zebras graze quietly at noon.", "Purple mountains rise far away.", "Cats sleep all day long.",
            "Ciao amici"]
    s = memorisation_scores(outs, REFS)
    assert s["corpus_bleu"] < 5 and s["sentence_bleu_mean"] < 5 and s["rougeL_mean"] < 0.05


def test_bleu_matches_sacrebleu_directly():
    outs = ["The quick brown fox jumped over a lazy dog.", "Instruction tuning trains models.",
            "The answer is 4.", "bonjour le monde"]
    s = memorisation_scores(outs, REFS)
    assert s["corpus_bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [REFS]).score)
    for o, r, b in zip(outs, REFS, s["sentence_bleu"], strict=True):
        assert b == pytest.approx(sacrebleu.sentence_bleu(o, [r]).score)
    assert 0 < s["corpus_bleu"] < 100
    assert s["sentence_bleu_ci95"] == memorisation_scores(outs, REFS)["sentence_bleu_ci95"]  # fixed seed
    lo, hi = s["sentence_bleu_ci95"]
    assert lo <= s["sentence_bleu_mean"] <= hi
    # stemming: "jumped" matches "jumps"
    assert s["rougeL"][0] > memorisation_scores(["The quick brown fox leaped over a lazy dog."], REFS[:1])["rougeL"][0]


def test_bad_arguments():
    with pytest.raises(ImtuneError):
        memorisation_scores(["a"], ["a", "b"])
    assert memorisation_scores([], [])["n"] == 0


def _gen_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_existing_generations(tmp_path, capsys):
    gen = _gen_file(tmp_path / "gen.jsonl", [{"id": str(i), "prompt": [], "reference": r, "output": r}
                                             for i, r in enumerate(REFS)])
    out = tmp_path / "mem"
    assert main(["memorisation", "--generations", str(gen), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["corpus_bleu"] == pytest.approx(100.0)
    assert summary["generations"] == str(gen) and "sentence_bleu" not in summary
    rows = [json.loads(x) for x in (out / "memorisation.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"] and rows[0]["rougeL"] == pytest.approx(1.0)
    assert not (out / "generations.jsonl").exists()
    assert "sentence BLEU 100.00" in capsys.readouterr().out


def test_cli_generates_then_scores(tmp_path, tiny_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {r}", "output": r}) + "\n" for r in REFS))
    out = tmp_path / "mem"
    assert main(["memorisation", "--model", str(tiny_dir), "--data", str(data), "--n", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["reference"] for g in gens] == REFS[:2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["model"] == str(tiny_dir)
    expected = memorisation_scores([g["output"] for g in gens], REFS[:2])
    assert summary["corpus_bleu"] == pytest.approx(expected["corpus_bleu"])


def test_read_generations_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_generations(tmp_path / "nope.jsonl")
    p = _gen_file(tmp_path / "g.jsonl", [{"output": "a", "reference": "b"}, {"output": "a"}])
    with pytest.raises(InputError, match=r"g\.jsonl:2: field 'reference' missing"):
        read_generations(p)


@pytest.mark.parametrize("content,needle", [
    ('{"output": "a", "reference": "b"}\n{"output": \n', "bad.jsonl:2: malformed JSON"),
    ('{"output": 3, "reference": "b"}\n', "bad.jsonl:1: field 'output' not a string"),
])
def test_cli_bad_generations_one_line_exit_2(tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    rc = main(["memorisation", "--generations", str(bad), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "m").exists()


def test_cli_needs_data_or_generations(tmp_path, capsys):
    assert main(["memorisation", "--out", str(tmp_path / "m")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["memorisation", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl" in err[0]
