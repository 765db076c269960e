import json

import pytest

from imtune.errors import InputError
from imtune.records.loading import load_dataset, load_records

from .conftest import data_file


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


MSG = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_four_schemas_normalise_to_the_same_conversation(tmp_path):
    rows = {
        "messages": MSG,
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        "alpaca": {"instruction": "Hi", "input": "", "output": "Hello"},
        "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    }
    convs = []
    for name, row in rows.items():
        p = write(tmp_path, f"{name}.jsonl", json.dumps(row) + "\n")
        convs.append(load_records(p)[0])
    assert all(c.messages == convs[0].messages for c in convs)


def test_alpaca_input_is_appended_to_instruction(tmp_path):
    p = write(tmp_path, "a.json", json.dumps([{"instruction": "Sum", "input": "1 2", "output": "3"}]))
    c = load_records(p)[0]
    assert c.messages[0].content == "Sum\n\n1 2" and c.messages[1].content == "3"


def test_json_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = write(tmp_path, "d.csv", "instruction,input,output\nSay hi,,hi\n\"Multi\nline\",x,y\n")
    recs = load_records(p)
    assert len(recs) == 2 and recs[1].messages[0].content == "Multi\nline\n\nx"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}]), tmp_path / "d.parquet")
    assert load_records(tmp_path / "d.parquet")[0].messages[1].content == "b"
    p = write(tmp_path, "m.json", json.dumps([MSG, MSG]))
    assert len(load_records(p)) == 2


def test_forced_format(tmp_path):
    p = write(tmp_path, "x.jsonl", json.dumps({"prompt": "a", "completion": "b", "instruction": "i", "output": "o"}))
    assert load_records(p, format="prompt_completion")[0].messages[0].content == "a"
    assert load_records(p)[0].messages[0].content == "i"  # auto: alpaca wins


BAD = [
    ("malformed json", '{"messages": [}\n', "malformed JSON", 1),
    ("missing field", json.dumps({"instruction": "x"}) + "\n", "missing field 'output'", 1),
    ("unknown role", json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n", "unknown role 'bot'", 1),
    ("empty content", json.dumps({"messages": [{"role": "user", "content": "  "},
                                               {"role": "assistant", "content": "a"}]}) + "\n", "empty content", 1),
    ("no assistant", json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n", "no assistant turn", 1),
    ("sharegpt role", json.dumps({"conversations": [{"from": "alien", "value": "x"}]}) + "\n", "unknown role", 1),
    ("non-string", json.dumps({"prompt": 3, "completion": "x"}) + "\n", "must be a string", 1),
]


@pytest.mark.parametrize("name,text,reason,line", BAD, ids=[b[0] for b in BAD])
def test_bad_record_names_file_line_reason(tmp_path, name, text, reason, line):
    good = json.dumps(MSG) + "\n"
    p = write(tmp_path, "bad.jsonl", good + good + text)
    with pytest.raises(InputError) as ei:
        load_records(p)
    msg = str(ei.value)
    assert f"bad.jsonl:{line + 2}" in msg and reason in msg and "\n" not in msg


def test_non_utf8_bytes(tmp_path):
    p = write(tmp_path, "b.jsonl", (json.dumps(MSG) + "\n").encode() + b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    with pytest.raises(InputError, match=r"b\.jsonl:2: not valid UTF-8"):
        load_records(p)
    p = write(tmp_path, "b.json", b'[{"prompt": "ok",\n "completion": "\xff"}]')
    with pytest.raises(InputError, match=r"b\.json:2: not valid UTF-8"):
        load_records(p)


def test_record_index_for_json_arrays(tmp_path):
    p = write(tmp_path, "a.json", json.dumps([MSG, {"instruction": "x"}]))
    with pytest.raises(InputError, match=r"a\.json: record 1: missing field 'output'"):
        load_records(p)


def test_skip_invalid_reports_which(tmp_path):
    good = json.dumps(MSG) + "\n"
    p = write(tmp_path, "s.jsonl", good + "{oops\n" + good + json.dumps({"messages": []}) + "\n")
    res = load_dataset(p, skip_invalid=True)
    assert len(res.records) == 2
    assert [e.line for e in res.skipped] == [2, 4]


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no valid records"):
        load_records(write(tmp_path, "e.jsonl", "\n"))
    with pytest.raises(InputError, match="unsupported file type"):
        load_records(write(tmp_path, "e.txt", "x"))


@pytest.mark.parametrize("name,n", [("lima.jsonl", 1030), ("alpagasus_dolly_3k.jsonl", 2996),
                                    ("code_alpaca_2k.json", 2017)])
def test_real_training_sets_load(name, n):
    # Code-Alpaca has a few records with an empty output: they are reported, and skippable.
    res = load_dataset(data_file(name), skip_invalid=True)
    assert len(res.records) + len(res.skipped) == n
    assert all("empty content" in e.reason for e in res.skipped)
    assert len(res.skipped) < n * 0.01
    assert all(r.messages[-1].role == "assistant" for r in res.records)
