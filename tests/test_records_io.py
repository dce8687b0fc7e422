"""mmloom.data.records_io: JSON list / jsonl record files as users have them (BOM, bad bytes, objects)."""

from __future__ import annotations

import json

import pytest

from mmloom.data.records_io import JsonFileError, SkipRecord, iter_json_list, iter_records, load_json
from mmloom.errors import MmloomError

BOM = "\ufeff"
RECORDS = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i} é"}]} for i in range(3)]


def kept(items) -> list:
    return [item for _, item in items if not isinstance(item, SkipRecord)]


def skips(items) -> list[tuple[str, str, str]]:
    return [(where, item.reason, str(item)) for where, item in items if isinstance(item, SkipRecord)]


@pytest.mark.parametrize("indent", [None, 1])
def test_bom_is_ignored_in_json_and_jsonl(tmp_path, indent):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(BOM + "".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    listed = tmp_path / "a.json"
    listed.write_text(BOM + json.dumps(RECORDS, indent=indent), encoding="utf-8")
    assert kept(iter_records(jsonl)) == RECORDS
    assert kept(iter_records(listed)) == RECORDS
    assert kept(iter_records(listed, "json")) == RECORDS
    assert load_json(listed) == RECORDS


def test_non_utf8_jsonl_line_is_a_counted_skip(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS]
    lines[1] = lines[1].replace("é".encode(), b"\xe9")  # Latin-1 é inside a UTF-8 file
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(iter_records(path))
    assert kept(items) == [RECORDS[0], RECORDS[2]]
    [(where, reason, message)] = skips(items)
    assert (where, reason) == (f"{path}:2", "bad_encoding")
    assert "not UTF-8" in message and "0xe9" in message


def test_non_utf8_bytes_in_a_json_list_skip_only_that_record(tmp_path):
    path = tmp_path / "a.json"
    data = json.dumps(RECORDS, indent=1, ensure_ascii=False).encode()
    second = data.index(b'"q1 ')
    path.write_bytes(data[:second] + data[second:].replace("é".encode(), b"\xe9", 1))
    items = list(iter_records(path))
    assert kept(items) == [RECORDS[0], RECORDS[2]]
    [(where, reason, message)] = skips(items)
    line = data[:second].count(b"\n") + 1
    assert reason == "bad_encoding" and f"byte 0xe9 on line {line}" in message
    assert where.startswith(f"{path}[1] line ") and int(where.rsplit(" ", 1)[1]) < line  # where the record starts


def test_list_records_are_named_by_index_and_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in RECORDS) + "\n]\n", encoding="utf-8")
    assert [where for where, _ in iter_records(path)] == [f"{path}[{i}] line {i + 2}" for i in range(3)]


@pytest.mark.parametrize("name, text", [
    ("obj.json", json.dumps({"annotations": RECORDS}, indent=2)),  # pretty-printed object
    ("obj.json", json.dumps({"annotations": RECORDS})),  # one-line object in a .json file
    ("obj.txt", json.dumps({"a": 1}, indent=2)),  # pretty-printed object, any name
])
def test_json_object_is_refused_as_not_a_list(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MmloomError, match="not a JSON list") as err:
        list(iter_records(path))
    assert str(path) in str(err.value)
    with pytest.raises(MmloomError, match="not a JSON list"):
        list(iter_json_list(path))


def test_jsonl_starting_with_an_object_is_jsonl(tmp_path):
    path = tmp_path / "a.json"  # jsonl content in a .json file (LLaVA-Pretrain style mix-ups)
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{broken\n", encoding="utf-8")
    items = list(iter_records(path))
    assert kept(items) == RECORDS
    assert skips(items)[0][:2] == (f"{path}:4", "bad_json")


@pytest.mark.parametrize("text, where", [
    ('[{"id": 1},\n {"id": }]', "line 2 column 9"),
    ('[{"id": 1} {"id": 2}]', "line 1 column 12"),
    ('[{"id": 1}] trailing', "line 1 column 13"),
])
def test_malformed_list_names_line_and_column(tmp_path, text, where):
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JsonFileError, match=where) as err:
        list(iter_records(path))
    assert err.value.reason == "bad_json" and str(path) in str(err.value)


def test_empty_inputs_yield_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text(BOM + " [ ] \n", encoding="utf-8")
    assert list(iter_records(tmp_path / "empty.jsonl")) == []
    assert list(iter_records(tmp_path / "empty.json")) == []


def test_keyed_list_and_load_json_reasons(tmp_path):
    path = tmp_path / "train_v1.0_withQT.json"
    path.write_text(BOM + json.dumps({"data": RECORDS}), encoding="utf-8")
    assert [w for w, _ in iter_json_list(path, "data")] == [f"{path}[{i}]" for i in range(3)]
    assert kept(iter_json_list(path, "data")) == RECORDS
    with pytest.raises(MmloomError, match="expected a JSON object with a 'rows' list"):
        list(iter_json_list(path, "rows"))
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"q": "caf\xe9"}')
    with pytest.raises(JsonFileError, match="0xe9") as err:
        load_json(bad)
    assert err.value.reason == "bad_encoding"
    bad.write_text('{"q": ', encoding="utf-8")
    with pytest.raises(JsonFileError, match="malformed JSON at line 1") as err:
        load_json(bad)
    assert err.value.reason == "bad_json"
