"""LLM-judge evaluation against a real local HTTP server (tests/judge_server.py); nothing in the client is patched."""

from __future__ import annotations

import json
import socket
import time

import pytest

from imtune.errors import ImtuneError, InputError
from imtune.evaluation.judge import alpaca_eval as ae
from imtune.evaluation.judge import mt_bench as mb
from imtune.evaluation.judge.client import KEY_MESSAGE, JudgeClient, chat_url

try:
    from .judge_server import MARKER, JudgeServer, always_first, scripted_judge
except ImportError:  # tests/ run as plain directory
    from judge_server import MARKER, JudgeServer, always_first, scripted_judge


@pytest.fixture(scope="module")
def _server():
    s = JudgeServer().start()
    yield s
    s.stop()


@pytest.fixture
def server(_server):
    _server.reset()
    yield _server
    _server.reset()


def client(server, tmp_path=None, **kw):
    kw.setdefault("api_key", "")
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("cache", (tmp_path / "cache.sqlite3") if tmp_path is not None else False)
    return JudgeClient(kw.pop("base_url", server.base_url), kw.pop("model", "judge-1"), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("reply,expected", [
    ("Output (a)", "a"), ("Output (b)", "b"), ("output (B).", "b"), ("**Output (a)**", "a"), ("(b)", "b"),
    ("b", "b"), ("Output b", "b"), ("[[a]]", "a"), ("Tie", "tie"),
    ("Output (a) misreads the question.\nOutput (b) answers it.\n\nOutput (b)", "b"),
    ("Both are fine but I prefer the second.\nFinal verdict: Output (b)", "b"),
    ("<think>maybe Output (a)</think>\nOutput (b)", "b"),
    ("To answer a question well, Output (b) is better.", "b"),
    ("Output (a)\n\nExplanation: Output (b) misses the second part.", "a"),
    ("Verdict: a tie", "tie"), ("Output (a)\nOutput (b)", None),
    ("Output (a) is better than Output (b).", None), ("I cannot tell.", None), ("", None),
])
def test_parse_verdict(reply, expected):
    assert ae.parse_verdict(reply) == expected


@pytest.mark.parametrize("reply,expected", [
    ("Good.\nRating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Format \"[[5]]\"... my rating: [[3]]", 3.0),
    ("Rating: [9]", 9.0), ("Rating: [[11]]", None), ("Rating: [[?]]", None), ("no rating", None),
])
def test_parse_rating(reply, expected):
    assert mb.parse_rating(reply) == expected


def test_chat_url():
    assert chat_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(ImtuneError, match="not an http"):
        chat_url("localhost:8000/v1")


# ------------------------------------------------------------------------------------------------ win rate


def test_win_rate_on_crafted_pairs(server):
    pairs = [
        {"instruction": "q1", "output": f"{MARKER} answer", "reference": "a much longer reference answer"},
        {"instruction": "q2", "output": "a much longer model answer", "reference": f"{MARKER}"},
        {"instruction": "q3", "output": "TIE one", "reference": "TIE two"},
        {"instruction": "q4", "output": "same", "reference": "same "},          # identical: tie, not judged
        {"instruction": "q5", "output": "longer model output", "reference": "short"},
    ]
    res = ae.judge_pairs(client(server), pairs)
    s = res.summary
    assert s["win_rate"] == pytest.approx(60.0)
    assert (s["wins"], s["ties"], s["losses"]) == (2, 2, 1)
    assert s["standard_error"] == pytest.approx(100 * (0.175 ** 0.5) / 5 ** 0.5)
    lo, hi = s["ci95"]
    assert 0 <= lo <= 60 <= hi <= 100
    assert s["n_judgements"] == 8 and server.n_requests == 8
    assert s["n_unparseable"] == 0 and s["position_bias_rate"] == 0.0
    assert s["length_controlled"] is False
    assert [a["score"] for a in res.annotations] == [1.0, 0.0, 0.5, 0.5, 1.0]
    assert res.annotations[3]["identical"] is True
    # Both orders were really asked: the model's output shows up once as (a) and once as (b).
    shown_first = [b["messages"][1]["content"].split("[Output (a)]\n")[1].split("\n")[0] for b in server.bodies]
    assert sorted(shown_first).count(f"{MARKER} answer") == 1


def test_position_swap_cancels_position_bias(server):
    server.policy = always_first
    pairs = [{"instruction": f"q{i}", "output": "x" * (i + 1), "reference": "y" * (5 - i)} for i in range(4)]
    s = ae.judge_pairs(client(server), pairs).summary
    assert s["win_rate"] == pytest.approx(50.0)
    assert s["position_bias_rate"] == 1.0 and s["first_position_rate"] == 1.0
    assert s["ties"] == 4 and s["standard_error"] == 0.0


def test_unparseable_verdicts_are_counted_and_excluded(server):
    server.policy = lambda msgs: "Both have merits."
    pairs = [{"instruction": "q", "output": "a", "reference": "b"}]
    s = ae.judge_pairs(client(server), pairs).summary
    assert s["n_unparseable"] == 2 and s["n_excluded"] == 1 and s["win_rate"] is None
    assert s["position_bias_rate"] is None


# ------------------------------------------------------------------------------------------------ client


def test_retries_succeed_after_transient_errors(server):
    server.fail_next([429, 500, 503])
    c = client(server)
    assert c.complete([{"role": "user", "content": "hi"}]) == "hello"
    assert server.n_requests == 4
    assert c.stats.retries == 3 and c.stats.requests == 4


def test_retries_exhausted(server):
    server.fail_next([500] * 5)
    with pytest.raises(ImtuneError, match=r"kept failing: HTTP 500.*3 attempts"):
        c = client(server, max_retries=2)
        c.complete([{"role": "user", "content": "hi"}])
    assert server.n_requests == 3
    assert c.complete([{"role": "user", "content": "hi"}]) == "hello"  # the client stays usable


def test_bad_key_is_a_clear_error_without_retries(server, monkeypatch):
    server.api_key = "secret"
    with pytest.raises(ImtuneError) as e:
        client(server, api_key="wrong").complete([{"role": "user", "content": "hi"}])
    assert str(e.value).startswith(KEY_MESSAGE)
    assert server.n_requests == 1
    # The key comes from IMTUNE_JUDGE_API_KEY first, then OPENAI_API_KEY.
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    monkeypatch.setenv("IMTUNE_JUDGE_API_KEY", "secret")
    assert JudgeClient(server.base_url, "m", cache=False).complete([{"role": "user", "content": "x"}]) == "hello"
    monkeypatch.delenv("IMTUNE_JUDGE_API_KEY")
    with pytest.raises(ImtuneError, match="rejected the API key"):
        JudgeClient(server.base_url, "m", cache=False).complete([{"role": "user", "content": "y"}])


def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}/v1"
    c = JudgeClient(url, "m", api_key="", cache=False, max_retries=1, backoff_base=0.01)
    with pytest.raises(ImtuneError, match=rf"cannot reach judge at {url} \(connection refused"):
        c.complete([{"role": "user", "content": "hi"}])


def test_timeout_after_retries(server):
    server.delay = 1.0
    t0 = time.monotonic()
    with pytest.raises(ImtuneError, match=r"timed out after 2 attempts \(0.2 s each\)"):
        client(server, timeout=0.2, max_retries=1).complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 1.5


def test_concurrency_limit_is_respected(server):
    server.delay = 0.15
    c = client(server, concurrency=3)
    replies = c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(12)])
    assert replies == ["hello"] * 12
    assert server.n_requests == 12
    assert server.max_in_flight == 3


def test_rerun_hits_the_cache(server, tmp_path):
    outputs = [{"instruction": i, "output": f"{MARKER} {k}" if k % 2 else "ok"}
               for k, i in enumerate(ae.alpaca_eval_instructions(4))]
    first = ae.evaluate_outputs(client(server, tmp_path), outputs, limit=4)
    n = server.n_requests
    assert n == 8
    # The same judge spelt differently (upper-case scheme/host, trailing slash): nothing is asked again.
    c2 = client(server, tmp_path, base_url=server.base_url.replace("http://", "HTTP://") + "/")
    second = ae.evaluate_outputs(c2, outputs, limit=4)
    assert server.n_requests == n
    assert c2.stats.requests == 0 and c2.stats.cache_hits == 8
    assert second.summary["win_rate"] == first.summary["win_rate"]
    # Another URL is another judge (tests/test_hostile_judge.py): it is asked.
    client(server, tmp_path, base_url=server.base_url.replace("127.0.0.1", "localhost")).complete(
        first_messages(outputs))
    assert server.n_requests == n + 1
    n += 1
    # A different judge model is a different judgement.
    client(server, tmp_path, model="judge-2").complete(first_messages(outputs))
    assert server.n_requests == n + 1


def first_messages(outputs):
    refs = ae.load_reference("1.0")
    return ae.pairwise_messages(outputs[0]["instruction"], outputs[0]["output"], refs[0]["output"])


def test_fatal_error_stops_a_batch(server):
    server.api_key = "secret"
    c = client(server, api_key="wrong", concurrency=2)
    with pytest.raises(ImtuneError, match="rejected the API key"):
        c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(50)])
    assert server.n_requests < 10


# ------------------------------------------------------------------------------------------------ data


def test_alpaca_eval_data():
    instr = ae.alpaca_eval_instructions()
    assert len(instr) == 805 and ae.alpaca_eval_instructions(3) == instr[:3]
    assert [r["instruction"] for r in ae.load_reference("2.0")] == instr
    with pytest.raises(ImtuneError, match="unknown AlpacaEval reference"):
        ae.load_reference("3.0")


def test_model_outputs_validation(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(InputError, match=r"o.jsonl:2: missing or non-string 'output'"):
        ae.load_model_outputs(p)
    with pytest.raises(ImtuneError, match="not in AlpacaEval"):
        ae.pair_with_reference([{"instruction": "not an alpaca instruction", "output": "y"}])
    instr = ae.alpaca_eval_instructions(3)
    pairs, missing = ae.pair_with_reference([{"instruction": " " + instr[1] + "\n", "output": "o"}], limit=3)
    assert [p["instruction"] for p in pairs] == [instr[1]] and missing == [instr[0], instr[2]]


def test_generate_outputs_uses_single_turn_conversations():
    seen = []

    def gen(convs):
        seen.extend(convs)
        return [c[-1]["content"].upper() for c in convs]

    outs = ae.generate_outputs(gen, ["a b", "c"], generator="m")
    assert seen == [[{"role": "user", "content": "a b"}], [{"role": "user", "content": "c"}]]
    assert outs == [{"instruction": "a b", "output": "A B", "generator": "m"},
                    {"instruction": "c", "output": "C", "generator": "m"}]


# ------------------------------------------------------------------------------------------------ MT-Bench


def test_mt_bench_generation_is_two_turn():
    qs = mb.load_questions(2)
    calls = []

    def gen(convs):
        calls.append(convs)
        return [f"answer{len(c)}:{c[-1]['content'][:10]}" for c in convs]

    rows = mb.generate_answers(gen, qs)
    assert len(calls) == 2 and all(len(c) == 1 for c in calls[0]) and all(len(c) == 3 for c in calls[1])
    # Turn 2 sees the model's own turn-1 answer.
    assert calls[1][0][1] == {"role": "assistant", "content": rows[0]["turns"][0]}
    assert calls[1][0][2]["content"] == qs[0]["turns"][1]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in qs]


def test_mt_bench_grading_with_answers(server, tmp_path):
    answers = {81: ["Aloha travel post", "NORATING rewrite"], 111: ["area is 3", "circle"],
               101: ["second place", "still second"]}
    res = mb.grade(client(server, tmp_path), answers)
    s = res.summary
    assert s["n_judgements"] == 6 and s["n_rated"] == 5 and s["n_unparseable"] == 1
    assert s["n_questions"] == 3 and s["n_missing"] == 77
    assert s["overall"] == 7.0 and s["per_turn"] == {"1": 7.0, "2": 7.0}
    assert s["per_category"] == {"writing": 7.0, "reasoning": 7.0, "math": 7.0}
    assert s["per_category_turn"]["writing"] == {"1": 7.0}
    by = {(j["question_id"], j["turn"]): j for j in res.judgements}
    assert by[(81, 1)]["judge_prompt"] == "single-v1" and by[(81, 2)]["judge_prompt"] == "single-v1-multi-turn"
    assert by[(111, 1)]["judge_prompt"] == "single-math-v1"
    assert by[(101, 2)]["judge_prompt"] == "single-math-v1-multi-turn"
    assert by[(81, 2)]["score"] is None
    bodies = {b["messages"][1]["content"]: b for b in server.bodies}
    ref = mb.load_reference_answers()[111][0]
    math1 = [t for t in bodies if "area is 3" in t and "[The Start of Reference Answer]" in t]
    assert len(math1) == 1 and ref in math1[0]
    turn2 = [t for t in bodies if "### Assistant A:\nAloha travel post" in t]
    assert len(turn2) == 1 and "NORATING rewrite" in turn2[0]
    assert all(b["temperature"] == 0 and b["model"] == "judge-1" for b in server.bodies)


def test_mt_bench_answers_file(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"question_id": 81, "turns": ["x", "y"]}) + "\n"
                 + json.dumps({"question_id": 82, "choices": [{"index": 0, "turns": ["z"]}]}) + "\n")
    assert mb.load_answers(p) == {81: ["x", "y"], 82: ["z"]}
    p.write_text(json.dumps({"question_id": 9999, "turns": ["x"]}) + "\n")
    with pytest.raises(InputError, match="not an MT-Bench question"):
        mb.load_answers(p)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_alpaca_eval_end_to_end(server, tmp_path, capsys):
    from imtune.cli.main import main

    instr = ae.alpaca_eval_instructions(4)
    outs = tmp_path / "model_outputs.jsonl"
    outs.write_text("".join(json.dumps({"instruction": i, "output": f"{MARKER}!" if k < 3 else ""}) + "\n"
                            for k, i in enumerate(instr)))
    out_dir = tmp_path / "res"
    argv = ["judge", "alpaca-eval", "--outputs", str(outs), "--judge-base-url", server.base_url,
            "--judge-model", "judge-1", "--limit", "4", "--out", str(out_dir),
            "--judge-cache", str(tmp_path / "c.sqlite3")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "75.0%" in printed
    summary = json.loads((out_dir / "alpaca_eval_results.json").read_text())
    assert summary["win_rate"] == pytest.approx(75.0) and summary["n"] == 4
    assert summary["reference_generator"] == "text-davinci-003" and summary["length_controlled"] is False
    assert len((out_dir / "alpaca_eval_annotations.jsonl").read_text().splitlines()) == 4
    assert server.n_requests == 8
    assert main([*argv, "--overwrite"]) == 0 and server.n_requests == 8  # rerun: all from the cache


def test_cli_mt_bench_end_to_end(server, tmp_path, capsys):
    from imtune.cli.main import main

    ans = tmp_path / "answers.jsonl"
    ans.write_text("".join(json.dumps({"question_id": q["question_id"], "turns": ["a1", "a2"]}) + "\n"
                           for q in mb.load_questions(2)))
    out_dir = tmp_path / "mt"
    rc = main(["judge", "mt-bench", "--answers", str(ans), "--judge-base-url", server.base_url,
               "--judge-model", "judge-1", "--limit", "2", "--out", str(out_dir), "--no-judge-cache"])
    assert rc == 0
    summary = json.loads((out_dir / "mt_bench_results.json").read_text())
    assert summary["overall"] == 7.0 and summary["n_judgements"] == 4
    assert "overall 7.00" in capsys.readouterr().out


def test_cli_errors_are_one_line(server, tmp_path, capsys):
    from imtune.cli.main import main

    server.api_key = "secret"
    outs = tmp_path / "o.jsonl"
    outs.write_text(json.dumps({"instruction": ae.alpaca_eval_instructions(1)[0], "output": "x"}) + "\n")
    base = ["judge", "alpaca-eval", "--outputs", str(outs), "--judge-model", "m", "--no-judge-cache", "--limit", "1"]
    assert main(base + ["--judge-base-url", server.base_url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and KEY_MESSAGE in err and "Traceback" not in err
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(base + ["--judge-base-url", url, "--judge-max-retries", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"imtune judge: error: cannot reach judge at {url} (connection refused; 1 attempt)"


@pytest.mark.slow  # builds the tiny torch model (shared with other test files); ~10 s on its own
def test_cli_generates_with_model_then_judges(server, tmp_path, tiny_dir):
    from imtune.cli.main import main

    out_dir = tmp_path / "gen"
    common = ["--judge-base-url", server.base_url, "--judge-model", "judge-1", "--limit", "2",
              "--out", str(out_dir), "--no-judge-cache", "--max-new-tokens", "4", "--template", "chatml"]
    assert main(["judge", "mt-bench", "--model", str(tiny_dir)] + common) == 0
    rows = [json.loads(x) for x in (out_dir / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [len(r["turns"]) for r in rows] == [2, 2]
    assert json.loads((out_dir / "mt_bench_results.json").read_text())["n_judgements"] == 4
    assert main(["judge", "alpaca-eval", "--model", str(tiny_dir)] + common) == 0
    outs = json.loads((out_dir / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outs] == ae.alpaca_eval_instructions(2)
    assert json.loads((out_dir / "alpaca_eval_results.json").read_text())["n"] == 2


# ------------------------------------------------------------------------------------------------ hygiene (issue 8)


@pytest.fixture(scope="module")
def _other_host():
    s = JudgeServer().start()
    yield s
    s.stop()


def test_redirect_to_another_host_is_not_followed(server, _other_host):
    _other_host.reset()
    # "localhost" vs 127.0.0.1 and another port: another origin, as a 302 to an attacker's host would be.
    server.redirect_to = _other_host.base_url.replace("127.0.0.1", "localhost") + "/chat/completions"
    c = client(server, api_key="sk-test-secret-key")
    with pytest.raises(ImtuneError, match=r"HTTP 302 \(a redirect.*redirects are not followed") as e:
        c.complete([{"role": "user", "content": "hi"}])
    assert _other_host.n_requests == 0 and server.n_requests == 1
    assert "sk-test-secret-key" not in str(e.value)
    # Redirect targets carrying credentials are not echoed either.
    server.redirect_to = "http://user:hunter2@evil.example/steal?token=abc"
    with pytest.raises(ImtuneError) as e:
        c.complete([{"role": "user", "content": "again"}])
    assert "hunter2" not in str(e.value) and "token=abc" not in str(e.value) and "evil.example" in str(e.value)


def test_garbage_reply_is_an_error_and_never_cached(server, tmp_path):
    server.raw_reply = b"<html>302 Found: login here</html>"
    c = client(server, tmp_path)
    with pytest.raises(ImtuneError, match="did not answer in the chat-completions format"):
        c.complete([{"role": "user", "content": "hi"}], parse=ae.parse_verdict)
    assert len(c.cache) == 0
    server.raw_reply = json.dumps({"choices": []}).encode()
    with pytest.raises(ImtuneError, match="chat-completions format"):
        c.complete([{"role": "user", "content": "hi"}])
    assert len(c.cache) == 0


@pytest.mark.parametrize("bad_reply", ["Both have merits.", "", "   "])
def test_unparseable_or_empty_verdicts_are_not_cached(server, tmp_path, bad_reply):
    pairs = [{"instruction": "q", "output": f"{MARKER} x", "reference": "y"}]
    server.policy = lambda msgs: bad_reply
    first = ae.judge_pairs(client(server, tmp_path), pairs).summary
    assert first["n_unparseable"] == 2 and first["win_rate"] is None
    assert server.n_requests == 2
    # Rerun against a healthy judge: asked again (nothing was cached), and now it scores.
    server.policy = scripted_judge
    c = client(server, tmp_path)
    second = ae.judge_pairs(c, pairs).summary
    assert server.n_requests == 4 and c.stats.cache_hits == 0
    assert second["win_rate"] == 100.0 and len(c.cache) == 2
    # Parseable verdicts are cached: a third run makes no request.
    c3 = client(server, tmp_path)
    ae.judge_pairs(c3, pairs)
    assert server.n_requests == 4 and c3.stats.cache_hits == 2


def test_mt_bench_unparseable_ratings_are_not_cached(server, tmp_path):
    answers = {81: ["NORATING answer"]}
    c = client(server, tmp_path)
    assert mb.grade(c, answers).summary["n_unparseable"] == 1 and len(c.cache) == 0


def test_huge_retry_after_is_capped(server):
    server.fail_next([(429, {"Retry-After": "3600"}), (503, {"Retry-After": "99999"})])
    t0 = time.monotonic()
    c = client(server, backoff_max=0.3)
    assert c.complete([{"role": "user", "content": "hi"}]) == "hello"
    assert time.monotonic() - t0 < 3 and server.n_requests == 3 and c.stats.retries == 2


def test_overall_deadline_per_request(server):
    server.fail_next([(429, {"Retry-After": "3600"})] * 100)
    t0 = time.monotonic()
    with pytest.raises(ImtuneError, match="kept failing: HTTP 429"):
        client(server, backoff_max=30, deadline=1.0, max_retries=50).complete([{"role": "user", "content": "x"}])
    assert time.monotonic() - t0 < 4
    assert server.n_requests < 5


def test_credentials_never_printed(server, caplog):
    port = server.base_url.split(":")[2].split("/")[0]
    url = f"http://judge-user:hunter2-secret@127.0.0.1:{port}/v1?api-key=query-secret"
    server.fail_next([500, 500])
    c = JudgeClient(url, "m", api_key="", cache=False, max_retries=1, backoff_base=0.01)
    with caplog.at_level("DEBUG"), pytest.raises(ImtuneError) as e:
        c.complete([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert "kept failing: HTTP 500" in msg and "***@127.0.0.1" in msg
    # user:pass went to that server only, as HTTP basic auth, and no message or log line shows it.
    assert server.auth_headers[0].startswith("Basic ") and len(server.auth_headers) == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("hunter2-secret", "query-secret"):
        assert secret not in msg and secret not in logged and secret not in repr(c.__dict__.get("base_url"))
    # A key the server echoes back in its 401 is masked too.
    server.api_key = "right-key"
    with pytest.raises(ImtuneError) as e:
        JudgeClient(server.base_url, "m", api_key="sk-wrong-secret", cache=False).complete(
            [{"role": "user", "content": "hi"}])
    assert "sk-wrong-secret" not in str(e.value)
    with pytest.raises(ImtuneError) as e:
        JudgeClient("ftp://u:hunter2-secret@host/v1", "m", cache=False)
    assert "hunter2-secret" not in str(e.value)


def test_cli_judge_fails_when_no_verdict_parses(server, tmp_path, capsys):
    from imtune.cli.main import main

    server.policy = lambda msgs: "I like both."
    outs = tmp_path / "o.jsonl"
    outs.write_text("".join(json.dumps({"instruction": i, "output": "x"}) + "\n"
                            for i in ae.alpaca_eval_instructions(2)))
    out_dir = tmp_path / "res"
    rc = main(["judge", "alpaca-eval", "--outputs", str(outs), "--judge-base-url", server.base_url,
               "--judge-model", "m", "--limit", "2", "--out", str(out_dir), "--judge-cache", str(tmp_path / "c")])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert "no judge reply could be parsed (4 of 4 unparseable" in err and err.count("\n") == 0
    assert (out_dir / "alpaca_eval_annotations.jsonl").exists()
    ans = tmp_path / "a.jsonl"
    ans.write_text(json.dumps({"question_id": mb.load_questions(1)[0]["question_id"], "turns": ["x"]}) + "\n")
    rc = main(["judge", "mt-bench", "--answers", str(ans), "--judge-base-url", server.base_url,
               "--judge-model", "m", "--limit", "1", "--out", str(tmp_path / "mt"), "--no-judge-cache"])
    assert rc != 0 and "no judge reply could be parsed (1 of 1" in capsys.readouterr().err
