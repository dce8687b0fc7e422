"""`mmloom data convert` / `json2jsonl` on inputs as they come from upstream: official download layouts,
sharded parquet runs into one folder, damaged images, BOMs and stray bytes, paths that leave the image root,
and runs that keep nothing (issue #13)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.sources.parquet import BRIEF_DESCRIPTION_PROMPTS, SYNTHDOG_OCR_PROMPTS
from test_data_sources import PREVIOUS, convert, make_arxivcap, png, read_jsonl, rec, write_json, write_jsonl


def noisy(fmt: str, seed: int = 0, cut: bool = False, mode: str = "RGB") -> bytes:
    """A 64x64 noise picture (most of the file is image data); `cut` keeps its first half, header intact."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert(mode) \
        .save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2] if cut else data


def synthdog_shard(path: Path, images: list[bytes], texts: list[str] | None = None) -> Path:
    """A SynthDoG parquet shard as on the Hub: `image` {bytes, path} + `ground_truth` JSON text."""
    texts = texts or [f"{path.stem} text {i}" for i in range(len(images))]
    rows = [{"image": {"bytes": data, "path": None},
             "ground_truth": json.dumps({"gt_parse": {"text_sequence": t}})} for data, t in zip(images, texts, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def solid(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def pixel(path: Path):
    with Image.open(path) as img:
        return img.convert("RGB").getpixel((0, 0))


# ---------------------------------------------------------------------------------------------- DocVQA family


def docvqa_official(root: Path, split: str = "train") -> tuple[Path, Path, list[str]]:
    """SP-DocVQA as the RRC downloads unpack: spdocvqa_qas/{split}_v1.0_withQT.json + spdocvqa_images/*.png."""
    names = ["abcd0001_1.png", "efgh0002_3.png"]
    for name in names:
        png(root / "spdocvqa_images" / name)
    data = [{"questionId": 100 + i, "question": f"question {i}?", "question_types": ["form"],
             "image": f"documents/{name}", "docId": i, "ucsf_document_id": name[:8], "ucsf_document_page_no": "1",
             "answers": [f"answer {i}", "other"], "data_split": split} for i, name in enumerate(names)]
    write_json(root / "spdocvqa_qas" / f"{split}_v1.0_withQT.json",
               {"dataset_name": "SP-DocVQA", "dataset_split": split, "dataset_version": "1.0", "data": data})
    return root / "spdocvqa_qas", root / "spdocvqa_images", names


def test_docvqa_official_layout_with_image_dir(tmp_path, capsys):
    qas, images, names = docvqa_official(tmp_path / "DocVQA", "val")
    out = tmp_path / "docvqa.jsonl"
    assert convert("docvqa", qas, out, "--image-dir", str(images), "--split", "val") == 0
    assert read_jsonl(out) == [rec(str(100 + i), name, f"question {i}?", f"answer {i}") for i, name in enumerate(names)]
    assert "read 2, written 2, skipped 0" in capsys.readouterr().out
    # The question file itself as --input works the same.
    assert convert("docvqa", qas / "val_v1.0_withQT.json", out, "--image-dir", str(images), "--split", "val") == 0
    assert [r["image"] for r in read_jsonl(out)] == names


def test_docvqa_official_layout_from_the_parent_folder(tmp_path):
    _, _, names = docvqa_official(tmp_path / "DocVQA")
    out = tmp_path / "docvqa.jsonl"
    assert convert("docvqa", tmp_path / "DocVQA", out) == 0  # finds spdocvqa_qas/ and spdocvqa_images/ inside
    assert [r["image"] for r in read_jsonl(out)] == [f"spdocvqa_images/{n}" for n in names]


def test_docvqa_without_image_dir_fails_with_the_hint(tmp_path, capsys):
    qas, _, _ = docvqa_official(tmp_path / "DocVQA")
    out = tmp_path / "docvqa.jsonl"
    out.write_text(PREVIOUS)  # an earlier conversion's output
    assert convert("docvqa", qas, out) == 2
    err = capsys.readouterr().err
    assert "0 of 2 records written" in err and "skipped missing_image: 2" in err and "--image-dir" in err
    assert out.read_text() == PREVIOUS  # an earlier output is not replaced by an empty one


def test_docvqa_older_release_layout(tmp_path):
    root = tmp_path / "docvqa"  # train/train_v1.0.json next to train/documents/
    png(root / "train" / "documents" / "x_1.png")
    write_json(root / "train" / "train_v1.0.json", {"data": [
        {"questionId": 1, "question": "q?", "image": "documents/x_1.png", "answers": ["a"]}]})
    out = tmp_path / "o.jsonl"
    assert convert("docvqa", root, out) == 0
    assert read_jsonl(out) == [rec("1", "train/documents/x_1.png", "q?", "a")]


def test_infographicsvqa_official_layout(tmp_path):
    root = tmp_path / "InfographicsVQA"
    for name in ("10001.jpeg", "10002.jpeg"):
        png(root / "infographicsvqa_images" / name, fmt="JPEG")
    data = [{"questionId": 200 + i, "question": f"q{i}?", "image_local_name": name, "image_url": "http://x",
             "ocr_output_file": name + ".json", "answers": [f"a{i}"], "data_split": "train",
             "answer_type": ["single span"]} for i, name in enumerate(("10001.jpeg", "10002.jpeg"))]
    write_json(root / "infographicsvqa_qas" / "infographicsVQA_train_v1.0.json",
               {"dataset_name": "infographicVQA", "dataset_version": "1.0", "dataset_split": "train", "data": data})
    out = tmp_path / "info.jsonl"
    assert convert("infographicsvqa", root / "infographicsvqa_qas", out,
                   "--image-dir", str(root / "infographicsvqa_images")) == 0
    assert read_jsonl(out) == [rec("200", "10001.jpeg", "q0?", "a0"), rec("201", "10002.jpeg", "q1?", "a1")]
    assert convert("infographicsvqa", root, out) == 0
    assert [r["image"] for r in read_jsonl(out)] == ["infographicsvqa_images/10001.jpeg",
                                                     "infographicsvqa_images/10002.jpeg"]


def test_dvqa_official_layout(tmp_path):
    root = tmp_path / "DVQA"  # images/ and qa/{train,val_easy,val_hard}_qa.json
    png(root / "images" / "bar_val_easy_00000001.png")
    write_json(root / "qa" / "val_easy_qa.json", [
        {"question_id": 7, "image": "bar_val_easy_00000001.png", "question": "How many bars?", "answer": "2",
         "template_id": "structure", "answer_bbox": []}])
    out = tmp_path / "dvqa.jsonl"
    assert convert("dvqa", root, out, "--split", "val_easy") == 0
    assert read_jsonl(out) == [rec("7", "images/bar_val_easy_00000001.png", "How many bars?", "2")]


# ---------------------------------------------------------------------------------------------- SynthDoG


def test_synthdog_runs_into_one_folder_keep_their_own_images(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "synthdog"
    synthdog_shard(raw / "train-00000-of-00002.parquet", [solid((220, 20, 20))] * 2)
    synthdog_shard(raw / "train-00001-of-00002.parquet", [solid((20, 20, 220))] * 2)
    for k in (0, 1):  # one run per shard, the same output folder
        assert convert("synthdog", raw / f"train-0000{k}-of-00002.parquet", out / f"part{k}.jsonl") == 0
    for k, color in ((0, (220, 20, 20)), (1, (20, 20, 220))):
        records = read_jsonl(out / f"part{k}.jsonl")
        assert [r["image"] for r in records] == [f"images/train-0000{k}-of-00002/000000{i}.png" for i in range(2)]
        assert [pixel(out / r["image"]) for r in records] == [color, color]


def test_synthdog_never_overwrites_a_different_image(tmp_path, capsys):
    shard = synthdog_shard(tmp_path / "raw" / "train-00000-of-00001.parquet", [solid((0, 200, 0))] * 2)
    out, img_dir = tmp_path / "o.jsonl", tmp_path / "imgs"
    assert convert("synthdog", shard, out, "--image-dir", str(img_dir)) == 0
    first = out.read_bytes()
    assert convert("synthdog", shard, out, "--image-dir", str(img_dir)) == 0  # identical files reused
    assert out.read_bytes() == first
    capsys.readouterr()
    # Another dataset whose shard has the same file name, into the same folder: refused, nothing replaced.
    other = synthdog_shard(tmp_path / "zh" / "train-00000-of-00001.parquet", [solid((9, 9, 9))] * 2)
    assert convert("synthdog", other, tmp_path / "zh.jsonl", "--image-dir", str(img_dir)) == 2
    err = capsys.readouterr().err
    assert str(img_dir / "train-00000-of-00001" / "0000000.png") in err and "already exists with other content" in err
    assert pixel(img_dir / "train-00000-of-00001" / "0000000.png") == (0, 200, 0)
    assert not (tmp_path / "zh.jsonl").exists()


def test_synthdog_truncated_images_are_counted_bad_image(tmp_path, capsys):
    shard = synthdog_shard(tmp_path / "raw" / "train-00000-of-00001.parquet", [
        noisy("JPEG", 0), noisy("JPEG", 1, cut=True), noisy("PNG", 2), noisy("PNG", 3, cut=True),
        b"not an image", noisy("JPEG", 5, mode="CMYK")])
    out = tmp_path / "out" / "synthdog.jsonl"
    assert convert("synthdog", shard.parent, out) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"train-00000-of-00001/000000{i}" for i in (0, 2, 5)]
    for r in records:
        with Image.open(out.parent / r["image"]) as img:
            assert img.format == "PNG"
            img.load()
    summary = capsys.readouterr().out
    assert "read 6, written 3, skipped 3" in summary and "skipped bad_image: 3" in summary
    assert f"{shard} row 1: image bytes cannot be decoded" in summary


def test_synthdog_split(tmp_path, capsys):
    data = tmp_path / "synthdog-en" / "data"  # the Hub layout: data/{split}-000NN-of-000MM-<hash>.parquet
    synthdog_shard(data / "train-00000-of-00001-1a2b.parquet", [solid((1, 1, 1))], ["train page"])
    synthdog_shard(data / "validation-00000-of-00001-3c4d.parquet", [solid((2, 2, 2))], ["validation page"])
    out = tmp_path / "o.jsonl"

    def answers(*extra):
        assert convert("synthdog", tmp_path / "synthdog-en", out, *extra) == 0
        return [r["conversations"][1]["value"] for r in read_jsonl(out)]

    assert answers() == ["train page"]  # the validation shard stays out of training
    assert answers("--split", "validation") == ["validation page"]
    assert answers("--split", "val") == ["validation page"]
    capsys.readouterr()
    assert convert("synthdog", data / "validation-00000-of-00001-3c4d.parquet", out, "--split", "train") == 2
    assert "a validation file, but --split is train" in capsys.readouterr().err
    assert convert("synthdog", data, out, "--split", "dev") == 2
    assert convert("ai2d", tmp_path, out, "--split", "val") == 2  # a source without splits says so
    assert "ai2d has no splits" in capsys.readouterr().err


def test_synthdog_prompts_are_seeded_per_record(tmp_path):
    raw = tmp_path / "raw"
    for k in range(2):
        synthdog_shard(raw / f"train-0000{k}-of-00002.parquet", [solid((k, 0, 0))] * 12)
    out = tmp_path / "all.jsonl"

    def prompts(path: Path) -> dict[str, str]:
        return {r["id"]: r["conversations"][0]["value"].removeprefix("<image>\n") for r in read_jsonl(path)}

    assert convert("synthdog", raw, out) == 0
    drawn = prompts(out)
    assert set(drawn.values()) <= set(BRIEF_DESCRIPTION_PROMPTS) and len(set(drawn.values())) > 3
    # The same record gets the same prompt whichever shards a run converts.
    assert convert("synthdog", raw / "train-00001-of-00002.parquet", tmp_path / "one.jsonl") == 0
    assert prompts(tmp_path / "one.jsonl") == {k: v for k, v in drawn.items() if k.startswith("train-00001")}
    assert convert("synthdog", raw, out, "--seed", "1") == 0
    assert prompts(out) != drawn
    assert convert("synthdog", raw, out, "--prompts", "ocr") == 0
    assert set(prompts(out).values()) <= set(SYNTHDOG_OCR_PROMPTS)
    assert len(BRIEF_DESCRIPTION_PROMPTS) == 11 and BRIEF_DESCRIPTION_PROMPTS[0] == "Describe the image concisely."


# ---------------------------------------------------------------------------------------------- ArxivCap


def test_arxivcap_unsafe_file_name_is_skipped_and_never_overwrites(tmp_path, capsys):
    pair = pa.struct([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("image_file", pa.string()), ("sub_caption", pa.string())])
    schema = pa.schema([("caption_images", pa.list_(pa.struct([("cil_pairs", pa.list_(pair)),
                                                               ("caption", pa.string())])))])
    rows = [{"caption_images": [
        {"cil_pairs": [{"image": {"bytes": png(color="red"), "path": None}, "image_file": "../../evil.png",
                        "sub_caption": ""}], "caption": "Escapes."},
        {"cil_pairs": [{"image": {"bytes": png(color="blue"), "path": None}, "image_file": None,
                        "sub_caption": ""}], "caption": "No name."},
    ]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "arXiv_src_2101_001.parquet")
    out = tmp_path / "out" / "cap.jsonl"
    assert convert("arxivcap", tmp_path / "arXiv_src_2101_001.parquet", out) == 0
    assert [r["image"] for r in read_jsonl(out)] == ["images/arXiv_src_2101_001/0000000_1.png"]
    summary = capsys.readouterr().out
    assert "skipped bad_image_path: 1" in summary and not (tmp_path / "evil.png").exists()
    # The same names from other content (another parquet with the same file name) are not overwritten.
    make_arxivcap(tmp_path / "a.parquet")
    assert convert("arxivcap", tmp_path / "a.parquet", out) == 0
    other = tmp_path / "b" / "a.parquet"
    other.parent.mkdir()
    table = pq.read_table(tmp_path / "a.parquet").to_pylist()
    table[0]["caption_images"][0]["cil_pairs"][0]["image"]["bytes"] = png(color="yellow")
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tmp_path / "a.parquet")), other)
    assert convert("arxivcap", other, tmp_path / "out" / "b.jsonl") == 2
    assert "already exists with other content" in capsys.readouterr().err
    assert pixel(out.parent / "images" / "2101.00001" / "fig1.png") == (255, 0, 0)


# ---------------------------------------------------------------------------------------------- AI2D / ArxivQA


def test_ai2d_malformed_question_file_is_a_counted_skip(tmp_path, capsys):
    root = tmp_path / "ai2d"
    png(root / "images" / "1.png")
    write_json(root / "questions" / "1.png.json", {"imageName": "1.png", "questions": {
        "Q?": {"answerTexts": ["x", "y"], "correctAnswer": 0, "questionId": "1.png-0", "abcLabel": False}}})
    (root / "questions" / "2.png.json").write_text('{"imageName": "2.png", "questions": {', encoding="utf-8")
    (root / "questions" / "3.png.json").write_bytes(b'{"imageName": "3.png", "questions": {"caf\xe9?": {}}}')
    out = tmp_path / "ai2d.jsonl"
    assert convert("ai2d", root, out) == 0
    assert read_jsonl(out) == [rec("1.png-0", "images/1.png", "Q? a) x b) y", "a) x")]
    summary = capsys.readouterr().out
    assert "read 3, written 1, skipped 2" in summary
    assert f"skipped bad_json: 1 (first: {root / 'questions' / '2.png.json'}: malformed JSON at line 1" in summary
    assert "skipped bad_encoding: 1" in summary


def arxivqa(tmp_path: Path, options: list[str], label: str, *extra: str) -> dict:
    png(tmp_path / "images" / "a.png")
    path = write_jsonl(tmp_path / "arxivqa.jsonl", [
        {"id": "q", "image": "images/a.png", "question": "Which organism?", "options": options, "label": label,
         "rationale": ""}])
    assert convert("arxivqa", path, tmp_path / "o.jsonl", *extra) == 0
    [record] = read_jsonl(tmp_path / "o.jsonl")
    return {"q": record["conversations"][0]["value"].removeprefix("<image>\n"),
            "a": record["conversations"][1]["value"]}


@pytest.mark.parametrize("options, label, question, answer", [
    # Unlettered options that start with "X.": labelled, never taken as letters (no two "B" options).
    (["E. coli", "B. subtilis", "C. elegans"], "B",
     "Which organism? A) E. coli B) B. subtilis C) C. elegans", "B) B. subtilis"),
    (["E. coli", "B. subtilis", "C. elegans"], "B. subtilis",
     "Which organism? A) E. coli B) B. subtilis C) C. elegans", "B) B. subtilis"),
    # Consistently lettered in order: shown as given.
    (["A. E. coli", "B. yeast"], "B", "Which organism? A. E. coli B. yeast", "B. yeast"),
    (["(A) x", "(B) y", "(C) z"], "C", "Which organism? (A) x (B) y (C) z", "(C) z"),
    # Letters out of order or in mixed styles: not lettered.
    (["B. x", "A. y"], "A", "Which organism? A) B. x B) A. y", "A) B. x"),
    (["A) x", "B. y"], "B", "Which organism? A) A) x B) B. y", "B) B. y"),
])
def test_arxivqa_options(tmp_path, options, label, question, answer):
    assert arxivqa(tmp_path, options, label) == {"q": question, "a": answer}


def test_arxivqa_newline_options(tmp_path):
    got = arxivqa(tmp_path, ["x", "y"], "B", "--options", "newline")
    assert got == {"q": "Which organism?\nA) x\nB) y", "a": "B) y"}


# ---------------------------------------------------------------------------------------------- llava, json2jsonl

GOOD = [{"id": str(i), "image": f"coco/{i}.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat is this? é"}, {"from": "gpt", "value": f"Answer {i}."}]}
    for i in range(3)]


def test_llava_refuses_a_json_object(tmp_path, capsys):
    path = write_json(tmp_path / "mix.json", {"annotations": GOOD})
    assert convert("llava", path, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{path}: not a JSON list" in err and "bad_json" not in err


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_llava_bom(tmp_path, name):
    path = tmp_path / name
    body = json.dumps(GOOD, indent=1) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in GOOD)
    path.write_text("\ufeff" + body, encoding="utf-8")
    assert convert("llava", path, tmp_path / "o.jsonl") == 0
    assert read_jsonl(tmp_path / "o.jsonl") == GOOD


def latin1_in(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode().replace("é".encode(), b"\xe9")


def test_llava_non_utf8_line_is_a_counted_skip(tmp_path, capsys):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b"\n".join([json.dumps(GOOD[0]).encode(), latin1_in(GOOD[1]), json.dumps(GOOD[2]).encode()]))
    listed = tmp_path / "data.json"
    listed.write_bytes(b"[\n" + b",\n".join([json.dumps(GOOD[0]).encode(), latin1_in(GOOD[1]),
                                              json.dumps(GOOD[2]).encode()]) + b"\n]")
    escaped = write_jsonl(tmp_path / "escaped.jsonl", [GOOD[0], json.dumps(GOOD[1]).replace("?", "\\udc80")])
    for path, where, n in ((jsonl, f"{jsonl}:2", 2), (listed, f"{listed}[1] line 3", 2), (escaped, f"{escaped}:2", 1)):
        out = tmp_path / "o.jsonl"
        assert convert("llava", path, out) == 0
        assert read_jsonl(out) == [GOOD[0], GOOD[2]][:n]
        summary = capsys.readouterr().out
        assert f"skipped bad_encoding: 1 (first: {where}: " in summary
    (tmp_path / "lists").mkdir()
    listed.rename(tmp_path / "lists" / "data.json")
    assert main(["data", "json2jsonl", str(tmp_path / "lists"), str(tmp_path / "lists_out")]) == 0
    assert read_jsonl(tmp_path / "lists_out" / "data.jsonl") == [GOOD[0], GOOD[2]]
    assert "skipped bad_encoding: 1" in capsys.readouterr().out


def test_json2jsonl_bom(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bom.json").write_text("\ufeff" + json.dumps(GOOD, indent=1), encoding="utf-8")
    assert main(["data", "json2jsonl", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert read_jsonl(tmp_path / "out" / "bom.jsonl") == GOOD


# ---------------------------------------------------------------------------------------------- image paths


@pytest.mark.parametrize("bad", ["../coco/0.jpg", "/etc/passwd", "coco/../../x.jpg", "C:\\data\\x.jpg", "..\\x.jpg"])
def test_image_path_leaving_the_root_is_skipped(tmp_path, capsys, bad):
    png(tmp_path / "imgs" / "coco" / "0.jpg")
    png(tmp_path / "imgs" / "coco" / "2.jpg")
    records = [GOOD[0], dict(GOOD[1], image=bad), GOOD[2]]
    out = tmp_path / "o.jsonl"
    assert convert("llava", write_json(tmp_path / "mix.json", records), out, "--image-dir", str(tmp_path / "imgs")) == 0
    assert read_jsonl(out) == [GOOD[0], GOOD[2]]
    assert "skipped bad_image_path: 1" in capsys.readouterr().out
    # The same in a converter that looks images up on disk.
    png(tmp_path / "images" / "a.png")
    ok = {"id": "q1", "image": "images/a.png", "question": "Q?", "options": ["x", "y"], "label": "A", "rationale": ""}
    path = write_jsonl(tmp_path / "arxivqa.jsonl", [ok, dict(ok, id="q2", image=bad)])
    assert convert("arxivqa", path, out) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["q1"]
    assert f"skipped bad_image_path: 1 (first: {path}:2: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- nothing written


def _zero_inputs(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    """One input per source whose every record is bad: source -> (input, extra args, expected reason)."""
    ai2d = tmp_path / "ai2d"
    write_json(ai2d / "questions" / "1.png.json", {"imageName": "1.png", "questions": {
        "Q?": {"answerTexts": ["x"], "correctAnswer": 0, "questionId": "q"}}})
    chart = tmp_path / "chartqa"
    write_json(chart / "train" / "train_human.json", [{"imgname": "c.png", "query": "q", "label": "1"}])
    write_json(chart / "train" / "train_augmented.json", [])
    doc = tmp_path / "docvqa"
    write_json(doc / "test_v1.0.json", {"data": [{"questionId": 1, "question": "q", "image": "documents/x.png"}]})
    info = tmp_path / "info"
    write_json(info / "infographicsVQA_train_v1.0.json", {"data": [
        {"questionId": 1, "question": "q", "image_local_name": "1.jpeg", "answers": ["a"]}]})
    dvqa = tmp_path / "dvqa"
    write_json(dvqa / "train_qa.json", [{"question_id": 1, "image": "b.png", "question": "q"}])
    arxivqa = write_jsonl(tmp_path / "arxivqa.jsonl", [{"id": "1", "image": "a.png", "question": "q",
                                                       "options": ["x"], "label": "", "rationale": ""}])
    cap = tmp_path / "cap.parquet"
    make_arxivcap(cap)
    table = pq.read_table(cap).to_pylist()
    table = [{"caption_images": [e for e in row["caption_images"] if len(e["cil_pairs"]) > 1]} for row in table]
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(cap)), cap)
    dog = synthdog_shard(tmp_path / "dog" / "train-00000-of-00001.parquet", [b"\x89PNG\r\n\x1a\nbroken"])
    llava = write_jsonl(tmp_path / "llava.jsonl", ['{"id": 1,', {"id": "2"}])
    return {"ai2d": (ai2d, (), "missing_image"), "chartqa": (chart, (), "missing_image"),
            "docvqa": (doc, ("--split", "test"), "missing_field"), "infographicsvqa": (info, (), "missing_image"),
            "dvqa": (dvqa, (), "missing_field"), "arxivqa": (arxivqa, (), "bad_label"),
            "arxivcap": (cap, (), "multi_figure"), "synthdog": (dog, (), "bad_image"),
            "llava": (llava, (), "bad_json")}


@pytest.mark.parametrize("source", ["ai2d", "arxivqa", "arxivcap", "chartqa", "docvqa", "infographicsvqa", "dvqa",
                                    "synthdog", "llava"])
def test_a_run_that_keeps_nothing_fails_with_the_reasons(tmp_path, capsys, source):
    inp, extra, reason = _zero_inputs(tmp_path)[source]
    out = tmp_path / "out" / "o.jsonl"
    assert convert(source, inp, out, *extra) == 2
    err = capsys.readouterr().err
    assert f"{source}: 0 of " in err and f"skipped {reason}: " in err
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def test_no_records_at_all_fails(tmp_path, capsys):
    (tmp_path / "ai2d" / "questions").mkdir(parents=True)
    assert convert("ai2d", tmp_path / "ai2d", tmp_path / "o.jsonl") == 2
    assert "no records found in" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert convert("llava", tmp_path / "empty.jsonl", tmp_path / "o.jsonl") == 2
    assert not (tmp_path / "o.jsonl").exists()
