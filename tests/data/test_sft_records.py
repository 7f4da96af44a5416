"""Reading chat records (jsonl, jsonl.gz, JSON arrays streamed in small chunks) and validating them."""
import gzip
import json

import pytest

from mindpretrain.data import sft_records
from mindpretrain.data.sft_records import (InputError, RecordError, RecordValidator, merge_reasoning,
                                           read_records)

RECORDS = [
    {"messages": [{"role": "user", "content": "9.11 和 9.2 谁更大"}, {"role": "assistant", "content": "9.2"}]},
    {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "[1, 2] {\"a\": ]"}]},
    {"messages": [{"role": "user", "content": "é"}, {"role": "assistant", "content": "ü", "loss": "true"}]},
]


def array_text(records):
    return "\ufeff[\n  " + ",\n  ".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n]\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_json_array_streams_in_any_chunk_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sft_records, "_READ_CHUNK", chunk)
    path = tmp_path / "records.json"
    path.write_text(array_text(RECORDS), encoding="utf-8")
    read = list(read_records(path))
    assert [json.loads(record.payload) for record in read] == RECORDS  # json.loads: the independent parse
    assert [record.source for record in read] == [f"{path}:record {n}" for n in (1, 2, 3)]
    assert [record.nbytes for record in read] == [len(json.dumps(r, ensure_ascii=False).encode()) for r in RECORDS]


def test_jsonl_and_gzip_give_the_same_payloads(tmp_path):
    lines = [json.dumps(record, ensure_ascii=False) for record in RECORDS]
    text = lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n"
    plain, packed = tmp_path / "r.jsonl", tmp_path / "r.jsonl.gz"
    plain.write_text(text, encoding="utf-8")
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write(text)
    for path in (plain, packed):
        read = list(read_records(path))
        assert [json.loads(record.payload) for record in read] == RECORDS
        assert [record.source for record in read] == [f"{path}:1", f"{path}:3", f"{path}:4"]  # blank line 2


@pytest.mark.parametrize("text, problem", [
    ('[{"messages": []}, {"messages": [}]', "record 2: invalid_json"),
    ('[{"messages": []} {"messages": []}]', "expected ','"),
    ('[{"messages": []}] trailing', "text after the end"),
    ('[{"messages": []}', "expected ','"),
])
def test_broken_json_array_stops_naming_the_record(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=problem):
        list(read_records(path))


def test_not_utf8_array_and_line(tmp_path):
    array = tmp_path / "bad.json"
    array.write_bytes(b'[{"messages": "\xff"}]')
    with pytest.raises(InputError, match="not UTF-8"):
        list(read_records(array))
    lines = tmp_path / "bad.jsonl"
    lines.write_bytes(b'{"messages": "\xff"}\n')
    (record,) = read_records(lines)  # a jsonl line is that record's problem, not the file's
    with pytest.raises(RecordError) as caught:
        RecordValidator().parse(record.payload)
    assert caught.value.code == "invalid_json"


def test_guide_merge_and_loss_strings():
    assert merge_reasoning("Final answer", "Reasoning process") == \
        "<think>\nReasoning process\n</think>\n\nFinal answer"  # the guide README's example, verbatim
    assert merge_reasoning("A", "") == "A" and merge_reasoning("A", None) == "A"
    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "loss": "False"},
                           {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "b", "reasoning_content": "r", "loss": True}]}
    turns = RecordValidator(default_system="sys").validate(record).turns
    assert [(t.role, t.content, t.trained, t.number) for t in turns] == [
        ("system", "sys", False, 0), ("user", "q", False, 1), ("assistant", "a", False, 2),
        ("user", "q2", False, 3), ("assistant", "<think>\nr\n</think>\n\nb", True, 4)]


def test_default_system_only_when_there_is_none():
    record = {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    assert [t.content for t in RecordValidator(default_system="sys").validate(record).turns] == ["own", "q", "a"]


def test_forbidden_strings_found_anywhere():
    validator = RecordValidator(["<｜User｜>", "<｜Assistant｜>", "<x>"])
    assert validator.find_forbidden("plain <｜User text") is None
    assert validator.find_forbidden("a<x>b") == "<x>"
    assert validator.find_forbidden("ab <｜Assistant｜>") == "<｜Assistant｜>"
    assert RecordValidator().find_forbidden("<｜User｜>") is None
