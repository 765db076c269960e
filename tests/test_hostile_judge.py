"""A hostile or mistaken judge server (tests/judge_server.py, real HTTP): whose verdict is reported, what reaches
the disk when the server echoes credentials, a huge reply, a reply dripped a byte at a time."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from imtune.errors import ImtuneError
from imtune.evaluation.judge import alpaca_eval as ae
from imtune.evaluation.judge.client import JudgeClient, normalise_url
from imtune.evaluation.judge.redact import redact

try:
    from .judge_server import JudgeServer
except ImportError:  # run as a top-level module
    from judge_server import JudgeServer

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def two_servers():
    a = JudgeServer(policy=lambda m: "Output (a)").start()
    b = JudgeServer(policy=lambda m: "Output (b)").start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def server():
    s = JudgeServer().start()
    yield s
    s.stop()


def make(url, cache, **kw):
    kw.setdefault("api_key", "")
    return JudgeClient(url, kw.pop("model", "same-model"), cache=cache, backoff_base=0.01, **kw)


def test_two_judges_give_their_own_verdicts(two_servers, tmp_path):
    a, b = two_servers
    cache = tmp_path / "c.sqlite3"
    pair = ae.pairwise_messages("q", "first", "second")
    assert make(a.base_url, cache).complete(pair) == "Output (a)"
    # Same model name, same prompt, same cache file, another server: that server is asked, its verdict kept.
    assert make(b.base_url, cache).complete(pair) == "Output (b)"
    assert a.n_requests == 1 and b.n_requests == 1
    # Each is served from the cache afterwards, with its own verdict.
    assert make(a.base_url + "/", cache).complete(pair) == "Output (a)"
    assert make(b.base_url, cache).complete(pair) == "Output (b)"
    assert a.n_requests == 1 and b.n_requests == 1


@pytest.mark.parametrize("change", [{"max_tokens": 7}, {"temperature": 0.7}, {"seed": 3}, {"model": "other"}])
def test_decoding_settings_are_part_of_the_key(server, tmp_path, change):
    cache = tmp_path / "c.sqlite3"
    make(server.base_url, cache).complete(HI)
    make(server.base_url, cache).complete(HI)
    assert server.n_requests == 1
    make(server.base_url, cache, **change).complete(HI)
    assert server.n_requests == 2
    sent = server.bodies[-1]
    for k, v in change.items():
        assert sent[k] == v


def test_normalised_url():
    assert normalise_url("HTTP://Host.Example:80/v1/") == normalise_url("http://host.example/v1")
    assert normalise_url("https://h/v1") != normalise_url("http://h/v1")
    assert normalise_url("http://h:8000/v1") != normalise_url("http://h:8001/v1")
    assert "pw" not in normalise_url("http://u:pw@h/v1")


def _disk_bytes(*paths) -> bytes:
    out = b""
    for p in paths:
        for f in p.parent.glob(p.name + "*"):  # the sqlite file and its -wal/-shm companions
            out += f.read_bytes()
    return out


def test_echoed_key_and_tokens_never_reach_the_disk(server, tmp_path, monkeypatch, capsys):
    from imtune.cli.main import main

    key, hf = "sk-judge-key-0123456789abcdef", "hf_" + "Z9" * 17
    monkeypatch.setenv("IMTUNE_JUDGE_API_KEY", key)
    monkeypatch.setenv("HF_TOKEN", hf)
    server.api_key, server.echo_auth = key, True
    server.policy = lambda m: f"Output (a). By the way your HF token is {hf} and key {key[::-1]}{key}"
    outs = tmp_path / "o.jsonl"
    outs.write_text("".join(json.dumps({"instruction": i, "output": "x"}) + "\n"
                            for i in ae.alpaca_eval_instructions(2)))
    cache, out_dir = tmp_path / "cache.sqlite3", tmp_path / "res"
    argv = ["judge", "alpaca-eval", "--outputs", str(outs), "--judge-base-url", server.base_url,
            "--judge-model", "m", "--limit", "2", "--out", str(out_dir), "--judge-cache", str(cache)]
    assert main(argv) == 0
    assert server.n_requests == 4 and server.auth_headers[0] == f"Bearer {key}"  # the key was really sent
    captured = capsys.readouterr()
    written = _disk_bytes(cache) + b"".join(f.read_bytes() for f in out_dir.iterdir())
    for secret in (key, hf):
        assert secret.encode() not in written
        assert secret not in captured.out + captured.err
    ann = (out_dir / "alpaca_eval_annotations.jsonl").read_text()
    assert "Authorization: ***" in ann
    assert main([*argv, "--overwrite"]) == 0 and server.n_requests == 4  # the redacted verdicts still parse and are reused


def test_redact_masks_credential_shapes_not_prose():
    assert redact("Authorization: Bearer abcdefghijklmnopqrstuv") == "Authorization: ***"
    assert redact('{"authorization": "Basic dXNlcjpwYXNzd29yZA=="}') == '{"authorization": "***"}'
    assert "hf_***" in redact("token hf_" + "a" * 30)
    for prose in ("Output (a) is better: it counts tokens correctly.", "Basic arithmetic, [[7]]", "Tie"):
        assert redact(prose) == prose


def test_huge_reply_is_refused_in_one_line(server):
    server.huge_reply = 200 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ImtuneError) as e:
            make(server.base_url, False, max_reply_bytes=1 << 20).complete(HI)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "sent a reply over 1048576 bytes" in str(e.value) and "\n" not in str(e.value)
    assert peak < 16 * 1024 * 1024  # the body was never held whole


def test_huge_error_replies_are_neither_read_nor_drained(server):
    server.huge_reply = 200 * 1024 * 1024
    server.fail_next([503, 503])
    tracemalloc.start()
    try:
        with pytest.raises(ImtuneError) as e:  # retried twice without reading 400 MB, then the 200 is refused
            make(server.base_url, False, max_reply_bytes=1 << 20, max_retries=3).complete(HI)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "sent a reply over" in str(e.value) and server.n_requests == 3
    assert peak < 16 * 1024 * 1024
    server.reset()
    server.huge_reply = 200 * 1024 * 1024
    server.fail_next([500] * 5)
    with pytest.raises(ImtuneError, match="kept failing: HTTP 500") as e:  # the last error's first bytes only
        make(server.base_url, False, max_retries=1).complete(HI)
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


def test_dripping_server_stops_at_the_deadline(server):
    server.drip = 0.05  # ~300 bytes of reply: 15 s at this pace
    t0 = time.monotonic()
    with pytest.raises(ImtuneError, match="did not finish its reply within the 1 s deadline") as e:
        make(server.base_url, False, deadline=1.0, timeout=30.0).complete(HI)
    elapsed = time.monotonic() - t0
    assert "\n" not in str(e.value)
    assert elapsed < 4.0, elapsed  # the deadline, not 15 s of drip nor the 30 s per-read timeout


def test_headers_dripped_a_byte_at_a_time_stop_at_the_deadline(server):
    server.drip_headers = 0.05  # ~150 bytes of status line and headers: 7 s at this pace
    t0 = time.monotonic()
    with pytest.raises(ImtuneError, match="did not finish its reply within the 1 s deadline"):
        make(server.base_url, False, deadline=1.0, timeout=30.0).complete(HI)
    assert time.monotonic() - t0 < 4.0


def test_silent_server_mid_body_stops_at_the_deadline(server):
    server.drip = 60.0  # one byte, then a minute of silence per byte
    t0 = time.monotonic()
    with pytest.raises(ImtuneError, match="deadline"):
        make(server.base_url, False, deadline=1.0, timeout=30.0).complete(HI)
    assert time.monotonic() - t0 < 4.0
