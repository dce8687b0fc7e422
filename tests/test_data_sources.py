"""`mmloom data convert` / `json2jsonl`: every source from a tiny on-disk copy of its real format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.sources.parquet import ARXIVCAP_QUESTION, BRIEF_DESCRIPTION_PROMPTS


def png(path: Path | None = None, color: str = "red", fmt: str = "PNG") -> bytes:
    """A real 4x4 image; written to `path` when given."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


PREVIOUS = json.dumps({"id": "0", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n"


def convert(source: str, inp: Path, out: Path, *extra: str) -> int:
    """`mmloom data convert` (replacing `out` when an earlier conversion wrote it: tests convert again and again)."""
    return main(["data", "convert", source, "--input", str(inp), "--output", str(out), "--overwrite", *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rec(rid: str, image: str, question: str, answer: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


def assert_images_exist(records: list[dict], root: Path) -> None:
    for r in records:
        assert (root / r["image"]).is_file(), r["image"]


# ---------------------------------------------------------------------------------------------- sources


def test_ai2d(tmp_path, capsys):
    root = tmp_path / "ai2d"
    png(root / "images" / "1.png")
    write_json(root / "questions" / "1.png.json", {"imageName": "1.png", "questions": {
        "Which stage comes first?": {"answerTexts": ["egg", "larva", "pupa", "adult"], "correctAnswer": 0,
                                     "questionId": "1.png-0", "abcLabel": False},
        "What does label B show?": {"answerTexts": ["A", "B", "C", "D"], "correctAnswer": 3,
                                    "questionId": "1.png-1", "abcLabel": True},
    }})
    out = tmp_path / "out" / "ai2d.jsonl"
    assert convert("ai2d", root, out) == 0
    records = read_jsonl(out)
    # Cerebras' preprocess_dataset.py: question + " " + " ".join("a) ...", "b) ...")
    assert records == [
        rec("1.png-0", "images/1.png", "Which stage comes first? a) egg b) larva c) pupa d) adult", "a) egg"),
        rec("1.png-1", "images/1.png", "What does label B show? a) A b) B c) C d) D", "d) D"),
    ]
    assert_images_exist(records, root)
    assert "ai2d: read 2, written 2, skipped 0" in capsys.readouterr().out
    assert convert("ai2d", root, out, "--options", "newline") == 0
    assert read_jsonl(out)[0] == rec("1.png-0", "images/1.png",
                                     "Which stage comes first?\na) egg\nb) larva\nc) pupa\nd) adult", "a) egg")


def test_image_dir_makes_paths_relative_to_it(tmp_path, capsys):
    root = tmp_path / "data" / "ai2d"
    png(root / "images" / "1.png")
    write_json(root / "questions" / "1.png.json", {"imageName": "1.png", "questions": {
        "Q?": {"answerTexts": ["x", "y"], "correctAnswer": 1, "questionId": "q1", "abcLabel": False}}})
    out = tmp_path / "ai2d.jsonl"
    assert convert("ai2d", root, out, "--image-dir", str(tmp_path / "data")) == 0
    assert read_jsonl(out) == [rec("q1", "ai2d/images/1.png", "Q? a) x b) y", "b) y")]
    # An image root that does not contain the images: every record skipped, so the run fails with the reason.
    (tmp_path / "elsewhere").mkdir()
    assert convert("ai2d", root, tmp_path / "other.jsonl", "--image-dir", str(tmp_path / "elsewhere")) == 2
    err = capsys.readouterr().err
    assert "0 of 1 records written" in err and "skipped missing_image: 1" in err and "not under the image root" in err
    assert not (tmp_path / "other.jsonl").exists()


def test_arxivqa(tmp_path, capsys):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png", "blue")
    path = write_jsonl(tmp_path / "arxivqa.jsonl", [
        {"id": "q1", "image": "images/a.png", "question": "What trend is shown?",
         "options": ["A) rising", "B) falling", "C) flat"], "label": "B", "rationale": "The curve goes down."},
        {"id": "q2", "image": "images/b.png", "question": "Which color?",
         "options": ["red", "blue"], "label": "A) red", "rationale": ""},
        {"id": "q3", "image": "images/a.png", "question": "Q?", "options": ["A) x", "B) y"], "label": "",
         "rationale": "r"},
        {"id": "q4", "image": "images/a.png", "question": "Q?", "options": ["A) x", "B) y"], "label": "D",
         "rationale": "r"},
    ])
    out = tmp_path / "arxivqa_llava.jsonl"
    assert convert("arxivqa", path, out) == 0
    records = read_jsonl(out)
    assert records == [
        rec("q1", "images/a.png", "What trend is shown? A) rising B) falling C) flat",
            "B) falling The curve goes down."),
        rec("q2", "images/b.png", "Which color? A) red B) blue", "A) red"),
    ]
    assert_images_exist(records, tmp_path)
    assert "read 4, written 2, skipped 2" in capsys.readouterr().out


def make_arxivcap(path: Path) -> None:
    pair = pa.struct([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("image_file", pa.string()), ("sub_caption", pa.string())])
    schema = pa.schema([("caption_images", pa.list_(pa.struct([("cil_pairs", pa.list_(pair)),
                                                               ("caption", pa.string())])))])

    def cil(name: str, color: str) -> dict:
        return {"image": {"bytes": png(color=color), "path": name}, "image_file": name, "sub_caption": ""}

    rows = [
        {"caption_images": [
            {"cil_pairs": [cil("2101.00001/fig1.png", "red")], "caption": "Accuracy versus epochs."},
            {"cil_pairs": [cil("2101.00001/fig2a.png", "red"), cil("2101.00001/fig2b.png", "blue")],
             "caption": "Two panels."},
        ]},
        {"caption_images": [{"cil_pairs": [cil("2101.00002/fig1.png", "green")], "caption": "A block diagram."}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_arxivcap(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    make_arxivcap(src / "arXiv_src_2101_001.parquet")
    out = tmp_path / "out" / "arxivcap.jsonl"
    assert convert("arxivcap", src, out) == 0
    records = read_jsonl(out)
    assert records == [
        rec("2101.00001/fig1", "images/2101.00001/fig1.png", ARXIVCAP_QUESTION, "Accuracy versus epochs."),
        rec("2101.00002/fig1", "images/2101.00002/fig1.png", ARXIVCAP_QUESTION, "A block diagram."),
    ]
    assert_images_exist(records, out.parent)
    assert (out.parent / records[1]["image"]).read_bytes() == png(color="green")
    assert not (out.parent / "images" / "2101.00001" / "fig2a.png").exists()
    assert "read 3, written 2, skipped 1" in capsys.readouterr().out

    # With --image-dir the images go there and the paths are relative to it.
    img_dir = tmp_path / "imgs"
    assert convert("arxivcap", src, out, "--image-dir", str(img_dir)) == 0
    assert [r["image"] for r in read_jsonl(out)] == ["2101.00001/fig1.png", "2101.00002/fig1.png"]
    assert_images_exist(read_jsonl(out), img_dir)
    assert not list(img_dir.rglob("*.tmp"))


def test_chartqa(tmp_path):
    root = tmp_path / "ChartQA"
    png(root / "val" / "png" / "c1.png")
    png(root / "val" / "png" / "c2.png", "blue")
    write_json(root / "val" / "val_human.json", [{"imgname": "c1.png", "query": "What is the max?", "label": "17"}])
    write_json(root / "val" / "val_augmented.json", [
        {"imgname": "c2.png", "query": "Is it rising?", "label": "Yes"},
        {"imgname": "c1.png", "query": "Peak value?", "label": 42},
    ])
    out = tmp_path / "chartqa.jsonl"
    assert convert("chartqa", root, out, "--split", "val") == 0
    records = read_jsonl(out)
    assert records == [
        rec("val_human_0", "val/png/c1.png", "What is the max?", "17"),
        rec("val_augmented_0", "val/png/c2.png", "Is it rising?", "Yes"),
        rec("val_augmented_1", "val/png/c1.png", "Peak value?", "42"),
    ]
    assert_images_exist(records, root)
    assert convert("chartqa", root, out, "--split", "dev") == 2


def test_docvqa(tmp_path):
    root = tmp_path / "docvqa"
    png(root / "documents" / "ffbf0023_4.png")
    write_json(root / "train_v1.0_withQT.json", {"dataset_name": "docvqa", "data": [
        {"questionId": 337, "question": "what is the date?", "image": "documents/ffbf0023_4.png",
         "docId": 279, "answers": ["1/8/93", "January 8, 1993"], "question_types": ["form"]},
    ]})
    out = tmp_path / "docvqa.jsonl"
    assert convert("docvqa", root, out) == 0
    records = read_jsonl(out)
    assert records == [rec("337", "documents/ffbf0023_4.png", "what is the date?", "1/8/93")]
    assert_images_exist(records, root)


def test_infographicsvqa(tmp_path):
    root = tmp_path / "infovqa"
    png(root / "images" / "38490.jpeg", fmt="JPEG")
    write_json(root / "infographicsVQA_val_v1.0_withQT.json", {"data": [
        {"questionId": 65718, "question": "What percentage use phones?", "image_local_name": "38490.jpeg",
         "answers": ["24%", "24"]},
    ]})
    out = tmp_path / "infovqa.jsonl"
    assert convert("infographicsvqa", root, out, "--split", "val") == 0
    records = read_jsonl(out)
    assert records == [rec("65718", "images/38490.jpeg", "What percentage use phones?", "24%")]
    assert_images_exist(records, root)


def test_dvqa(tmp_path):
    root = tmp_path / "DVQA"
    png(root / "images" / "bar_train_00000000.png")
    write_json(root / "train_qa.json", [
        {"question_id": 1, "image": "bar_train_00000000.png", "question": "How many bars?", "answer": "3",
         "template_id": "structure"},
    ])
    out = tmp_path / "dvqa.jsonl"
    assert convert("dvqa", root, out) == 0
    records = read_jsonl(out)
    assert records == [rec("1", "images/bar_train_00000000.png", "How many bars?", "3")]
    assert_images_exist(records, root)


def test_synthdog(tmp_path, capsys):
    src = tmp_path / "synthdog"
    src.mkdir()
    rows = [{"image": {"bytes": png(color="white", fmt="JPEG" if i == 1 else "PNG"), "path": None},
             "ground_truth": json.dumps({"gt_parse": {"text_sequence": f"hello world {i}"}})} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows[:2]), src / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), src / "train-00001-of-00002.parquet")
    out = tmp_path / "out" / "synthdog.jsonl"
    img_dir = tmp_path / "images"
    assert convert("synthdog", src, out, "--image-dir", str(img_dir)) == 0
    records = read_jsonl(out)
    ids = ["train-00000-of-00002/0000000", "train-00000-of-00002/0000001", "train-00001-of-00002/0000000"]
    assert [r["id"] for r in records] == ids
    assert [r["image"] for r in records] == [f"{i}.png" for i in ids]
    assert [r["conversations"][1]["value"] for r in records] == [f"hello world {i}" for i in range(3)]
    for r in records:  # LLaVA's brief-description prompts, as Cerebras draws them
        assert r["conversations"][0]["value"].removeprefix("<image>\n") in BRIEF_DESCRIPTION_PROMPTS
    assert_images_exist(records, img_dir)
    with Image.open(img_dir / records[1]["image"]) as img:  # the JPEG was stored as PNG
        assert img.format == "PNG"
    assert (img_dir / records[0]["image"]).read_bytes() == rows[0]["image"]["bytes"]  # PNG kept byte for byte
    first = out.read_bytes()
    assert convert("synthdog", src, out, "--image-dir", str(img_dir)) == 0
    assert out.read_bytes() == first  # deterministic; the identical images are reused
    assert "synthdog: read 3, written 3, skipped 0" in capsys.readouterr().out


def test_llava_json_and_jsonl(tmp_path):
    png(tmp_path / "imgs" / "coco" / "1.jpg")
    good = {"id": "1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square. ✓"}]}
    text_only = {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    missing = dict(good, id="3", image="coco/nope.jpg")
    no_conv = {"id": "4", "image": "coco/1.jpg"}
    bad_turn = {"id": "5", "conversations": [{"from": "human"}]}
    path = write_json(tmp_path / "mix.json", [good, text_only, missing, no_conv, bad_turn])
    out = tmp_path / "mix.jsonl"
    assert convert("llava", path, out, "--image-dir", str(tmp_path / "imgs")) == 0
    assert read_jsonl(out) == [good, text_only]
    assert "✓" in out.read_text(encoding="utf-8")  # ensure_ascii=False

    jsonl = write_jsonl(tmp_path / "pretrain.jsonl", [good, text_only])
    out2 = tmp_path / "out2.jsonl"
    assert convert("llava", jsonl, out2) == 0
    assert out2.read_bytes() == out.read_bytes()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_records_counted_by_reason(tmp_path, capsys):
    root = tmp_path / "DVQA"
    png(root / "images" / "ok.png")
    write_json(root / "train_qa.json", [
        {"question_id": 1, "image": "ok.png", "question": "Q1?", "answer": "a"},
        {"question_id": 2, "image": "ok.png", "answer": "b"},                       # no question
        {"question_id": 3, "image": "gone.png", "question": "Q3?", "answer": "c"},  # no image
        {"question_id": 4, "image": "ok.png", "question": ["Q4?"], "answer": "d"},  # wrong type
        "not a record",
        {"question_id": 6, "image": "ok.png", "question": "Q6?", "answer": "f"},
    ])
    out = tmp_path / "dvqa.jsonl"
    assert convert("dvqa", root, out) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["1", "6"]
    summary = capsys.readouterr().out
    assert "dvqa: read 6, written 2, skipped 4" in summary
    assert "skipped missing_field: 1" in summary and "train_qa.json[1]" in summary
    assert "skipped missing_image: 1" in summary
    assert "skipped bad_field: 2" in summary


def test_arxivcap_reasons_add_up(tmp_path, capsys):
    make_arxivcap(tmp_path / "a.parquet")
    assert convert("arxivcap", tmp_path / "a.parquet", tmp_path / "out.jsonl") == 0
    summary = capsys.readouterr().out
    assert "read 3, written 2, skipped 1" in summary
    assert "skipped multi_figure: 1 (first: " in summary and "a.parquet row 0 figure 1" in summary


def test_strict_names_file_and_line(tmp_path, capsys):
    png(tmp_path / "a.png")
    ok = {"id": "q1", "image": "a.png", "question": "Q?", "options": ["x", "y"], "label": "A", "rationale": ""}
    path = write_jsonl(tmp_path / "arxivqa.jsonl", [ok, dict(ok, id="q2", label="F"), ok])
    out = tmp_path / "out.jsonl"
    assert convert("arxivqa", path, out, "--strict") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}:2: bad_label" in err and "only 2 options" in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


def test_malformed_jsonl_line(tmp_path, capsys):
    png(tmp_path / "a.png")
    ok = {"id": "q1", "image": "a.png", "question": "Q?", "options": ["x", "y"], "label": "B", "rationale": ""}
    path = write_jsonl(tmp_path / "arxivqa.jsonl", [ok, '{"id": "q2", "image":', ok])
    out = tmp_path / "out.jsonl"
    assert convert("arxivqa", path, out) == 0
    assert "read 3, written 2, skipped 1" in capsys.readouterr().out
    assert convert("arxivqa", path, out, "--strict") == 2
    err = capsys.readouterr().err
    assert f"{path}:2: bad_json: malformed JSON" in err


def test_malformed_json_names_file(tmp_path, capsys):
    root = tmp_path / "DVQA"
    root.mkdir()
    (root / "train_qa.json").write_text('[{"question_id": 1,\n "image": }]', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text(PREVIOUS)  # an earlier conversion's output
    assert convert("dvqa", root, out) == 2
    err = capsys.readouterr().err
    assert str(root / "train_qa.json") in err and "malformed JSON at line 2" in err
    assert "Traceback" not in err
    assert out.read_text() == PREVIOUS  # untouched


def test_user_errors_exit_2(tmp_path, capsys):
    assert convert("docvqa", tmp_path / "missing", tmp_path / "o.jsonl") == 2
    assert "input not found" in capsys.readouterr().err
    assert convert("docvqa", tmp_path, tmp_path / "o.jsonl") == 2
    assert "train_v1.0_withQT.json" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert convert("synthdog", tmp_path / "bad.parquet", tmp_path / "o.jsonl") == 2
    assert "bad.parquet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- json2jsonl


def test_json2jsonl(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    write_json(in_dir / "a.json", [{"id": "1", "x": "é"}, {"id": "2"}])
    (in_dir / "notes.txt").write_text("ignored")
    assert main(["data", "json2jsonl", str(in_dir), str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.jsonl"]
    assert (out_dir / "a.jsonl").read_text(encoding="utf-8") == '{"id": "1", "x": "é"}\n{"id": "2"}\n'
    assert "wrote 2 records" in capsys.readouterr().out

    # A JSON object and an empty list are reported (exit 2) and not written; the good file still is.
    write_json(in_dir / "b.json", [])
    write_json(in_dir / "c.json", {"not": "a list"})
    (out_dir / "a.jsonl").unlink()
    assert main(["data", "json2jsonl", str(in_dir), str(out_dir)]) == 2
    captured = capsys.readouterr()
    assert "2 of 3 file(s) not converted" in captured.err
    assert f"{in_dir / 'c.json'}: not a JSON list" in captured.err
    assert f"no records found in {in_dir / 'b.json'}" in captured.err
    assert "wrote 2 records" in captured.out
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.jsonl"]
