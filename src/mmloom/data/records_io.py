"""Reading JSON and jsonl record files as users actually have them (BOM, stray non-UTF-8 bytes, list or lines).

One place for the rules every command that reads user record files should share:

* A UTF-8 byte-order mark (``EF BB BF``, written by Windows editors and some exporters) is ignored,
  in ``.json`` and ``.jsonl`` files alike.
* jsonl: each non-blank line is one record. A line that is not UTF-8 or not valid JSON is yielded
  as a :class:`SkipRecord` (reasons ``bad_encoding`` / ``bad_json``) named ``file:line``; the other
  lines are kept.
* JSON list (LLaVA's ``.json`` files, e.g. ``llava_v1_5_mix665k.json``): records are decoded one by
  one, so each is named ``file[index] line N``. Bytes that are not UTF-8 do not abort the file: the
  text is decoded with ``surrogateescape`` and the record holding them is yielded as a
  ``bad_encoding`` skip. Malformed JSON inside a list cannot be re-synchronised and raises.
* A JSON *object* where a list of records is expected is refused as "not a JSON list" (a common
  mistake: a COCO-style ``{"annotations": [...]}`` file, or a dict keyed by id).

The main entry point is :func:`iter_records`; :func:`load_json` reads a whole JSON document with
the same BOM and error rules, :func:`iter_json_list` / :func:`iter_jsonl` are the two formats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from mmloom.errors import MmloomError
from mmloom.files import BOM, JsonFileError, read_json

_DRIVE = re.compile(r"^[A-Za-z]:")

_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace (RFC 8259)
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape decoding


class SkipRecord(MmloomError):
    """A record that cannot be used: counted under ``reason`` (a short key such as ``bad_json``),
    ``detail`` says what is wrong with it (``str(skip)`` too)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise MmloomError(f"{path}: is a folder, not a JSON file") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror or err}") from None


def _decode(data: bytes) -> str:
    """UTF-8 text without a leading BOM; bytes that are not UTF-8 become lone surrogates U+DC80..U+DCFF."""
    return data.removeprefix(BOM).decode("utf-8", errors="surrogateescape")


def _malformed(path: Path, err: json.JSONDecodeError) -> JsonFileError:
    return JsonFileError("bad_json", f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}")


def _not_utf8(text: str) -> str | None:
    """A description of the first non-UTF-8 byte in surrogateescape-decoded `text`, or None."""
    match = _ESCAPED.search(text)
    if match is None:
        return None
    return f"not UTF-8 text (byte 0x{ord(match.group()) - 0xDC00:02x})"


_SURROGATE = re.compile("[\ud800-\udfff]")


def unencodable_text(text: str) -> str | None:
    """A description of the first lone surrogate (U+D800..U+DFFF) in `text`, or None.

    JSON may spell them as escapes (`"caf\\udce9"`: what `json.dumps` writes for text read with
    `surrogateescape`, i.e. bytes that were not UTF-8); they are no characters, cannot be encoded as
    UTF-8 and no tokenizer can take them, so a record holding one is a `bad_encoding` skip.
    """
    match = _SURROGATE.search(text)
    if match is None:
        return None
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"not UTF-8 text (byte 0x{code - 0xDC00:02x}, escaped as \\u{code:04x})"
    return f"not UTF-8 text (lone surrogate \\u{code:04x})"


def load_json(path: Path) -> Any:
    """Parse a whole JSON file (`mmloom.files.read_json`, any JSON type).

    Raises:
        JsonFileError: the file is not UTF-8 (reason ``bad_encoding``, the byte named) or is
            malformed JSON (reason ``bad_json``, line and column named).
        MmloomError: the file cannot be read.
    """
    return read_json(path, expect=None)


def iter_jsonl_lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, str | SkipRecord]]:
    """Yield (line number, text) per non-blank line of a jsonl file, unparsed (a BOM on the first
    line is dropped); a line that is not UTF-8 yields a ``SkipRecord("bad_encoding")`` as its text,
    and a line longer than `max_bytes` (None: no limit) a ``SkipRecord("line_too_long")``: it is
    passed over in blocks, never held in memory whole.

    Raises:
        MmloomError: the file cannot be opened or read.
    """
    try:
        with open(path, "rb") as fh:
            lineno = 0
            while True:
                raw = fh.readline() if max_bytes is None else fh.readline(max_bytes + 1)
                if not raw:
                    break
                lineno += 1
                if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    while raw and not raw.endswith(b"\n"):
                        raw = fh.readline(2**20)
                        size += len(raw)
                    yield lineno, SkipRecord("line_too_long", f"a line of {size:,} bytes (the limit is "
                                                              f"{max_bytes:,}); not read")
                    continue
                if lineno == 1:
                    raw = raw.removeprefix(BOM)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield lineno, SkipRecord("bad_encoding", f"not UTF-8 text ({err.reason}, byte "
                                                             f"0x{raw[err.start]:02x} at column {err.start + 1})")
                    continue
                if line.strip():
                    yield lineno, line
    except IsADirectoryError:
        raise MmloomError(f"{path}: is a folder, not a jsonl file") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror or err}") from None


def read_jsonl_objects(path: str | Path, what: str = "file") -> list[tuple[int, dict]]:
    """`(line number, object)` for each non-blank line of a jsonl file that must be all good
    (questions, answers, references): a leading BOM is ignored; raises MmloomError naming `what`
    and the file when it does not exist, and `file:line` for a line that is not UTF-8 or not a JSON
    object."""
    path = Path(path)
    if not path.exists():
        raise MmloomError(f"{what} {str(path)!r} not found")
    out = []
    for lineno, line in iter_jsonl_lines(path):
        record = line if isinstance(line, SkipRecord) else None
        if record is None:
            try:
                record = parse_json_line(line)
            except SkipRecord as skip:
                record = skip
        if isinstance(record, SkipRecord):
            raise MmloomError(f"{what} {path}:{lineno}: {record}")
        if not isinstance(record, dict):
            raise MmloomError(f"{what} {path}:{lineno}: expected a JSON object per line")
        out.append((lineno, record))
    return out


def parse_json_line(line: str) -> Any:
    """One jsonl line's value; raises ``SkipRecord("bad_json")`` naming the column, or saying the
    value is nested deeper than Python's JSON parser goes (a RecursionError otherwise)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise SkipRecord("bad_json", f"malformed JSON at column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise SkipRecord("bad_json", "JSON nested too deeply to read") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (``"file:line"``, record) per non-blank line of a jsonl file.

    A line that is not UTF-8 yields a ``SkipRecord("bad_encoding")`` and a line that is not valid
    JSON a ``SkipRecord("bad_json")`` in place of the record; a BOM on the first line is ignored.

    Raises:
        MmloomError: the file cannot be opened or read.
    """
    for lineno, line in iter_jsonl_lines(path):
        where = f"{path}:{lineno}"
        if isinstance(line, SkipRecord):
            yield where, line
            continue
        try:
            yield where, parse_json_line(line)
        except SkipRecord as skip:
            yield where, skip


def _list_items(path: Path, text: str, pos: int) -> Iterator[tuple[int, int, int, Any]]:
    """Decode the JSON list starting at ``text[pos] == "["`` one element at a time: (index, start, end, value)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        end = pos + 1
    else:
        index = 0
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise _malformed(path, err) from None
            except RecursionError:
                raise JsonFileError("bad_json", f"{path}: element {index} is JSON nested too deeply to read") from None
            yield index, pos, end, value
            index += 1
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                end = pos + 1
                break
            raise _malformed(path, json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos))
    rest = _WS.match(text, end).end()
    if rest != len(text):
        raise _malformed(path, json.JSONDecodeError("Extra data after the list", text, rest))


def iter_json_list(path: Path, key: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (``"file[index] line N"``, record) for each element of a JSON list file.

    With `key`, the list is the value under `key` of a JSON object (e.g. DocVQA's ``{"data": [...]}``);
    its elements are then named ``file[index]``. An element holding bytes that are not UTF-8 is
    yielded as a ``SkipRecord("bad_encoding")``; a leading BOM is ignored.

    Raises:
        MmloomError: unreadable file, malformed JSON (line and column named), or the file (or its
            `key`) is not a JSON list ("not a JSON list").
    """
    text = _decode(_read_bytes(path))
    if key is not None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise _malformed(path, err) from None
        except RecursionError:
            raise JsonFileError("bad_json", f"{path}: JSON nested too deeply to read") from None
        records = data.get(key) if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise MmloomError(f"{path}: expected a JSON object with a {key!r} list")
        has_escapes = _ESCAPED.search(text) is not None
        for index, record in enumerate(records):
            bad = _not_utf8(json.dumps(record, ensure_ascii=False)) if has_escapes else None
            yield f"{path}[{index}]", SkipRecord("bad_encoding", bad) if bad else record
        return
    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise MmloomError(f"{path}: not a JSON list ({_describe_start(text, pos)}); expected a JSON list of records")
    has_escapes = _ESCAPED.search(text) is not None
    line, counted = 1, 0
    for index, start, end, value in _list_items(path, text, pos):
        line += text.count("\n", counted, start)
        counted = start
        where = f"{path}[{index}] line {line}"
        bad = _ESCAPED.search(text, start, end) if has_escapes else None
        if bad is None:
            yield where, value
        else:
            bad_line = line + text.count("\n", start, bad.start())
            yield where, SkipRecord("bad_encoding", f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                                    f"on line {bad_line})")


def _describe_start(text: str, pos: int) -> str:
    if pos >= len(text):
        return "the file is empty"
    if text[pos] == "{":
        return "the file holds a JSON object"
    return f"the file starts with {text[pos:pos + 10]!r}"


def _first_line_is_json(path: Path) -> bool:
    """True when the first non-blank line of `path` is a complete JSON value on its own (jsonl-like)."""
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.removeprefix(BOM).decode("utf-8", errors="surrogateescape").strip()
            if line:
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return False
                except RecursionError:  # one deeply nested record: a line of jsonl, skipped as bad_json
                    return True
                return True
    return False


def detect_format(path: Path) -> Literal["json", "jsonl"]:
    """``"json"`` when the first non-blank character of `path` (after any BOM) is ``[``, else ``"jsonl"``."""
    try:
        with open(path, "rb") as fh:
            chunk = fh.read(4096).removeprefix(BOM)
            while chunk and not chunk.strip():
                chunk = fh.read(4096)
    except IsADirectoryError:
        raise MmloomError(f"{path}: is a folder, not a JSON or jsonl file") from None
    except OSError as err:
        raise MmloomError(f"cannot read {path}: {err.strerror or err}") from None
    return "json" if chunk.lstrip().startswith(b"[") else "jsonl"


def iter_records(path: Path, fmt: Literal["auto", "json", "jsonl"] = "auto") -> Iterator[tuple[str, Any]]:
    """Yield (where, record or :class:`SkipRecord`) for every record of a JSON list or jsonl file.

    ``fmt="auto"`` decides by content: a file whose first non-blank character is ``[`` is a JSON
    list; a file that is one JSON object as a whole (pretty-printed over many lines, or any ``.json``
    file holding a single object) is refused; anything else is jsonl (one record per line).
    ``"json"`` requires a JSON list, ``"jsonl"`` reads lines. `where` is ``file:line`` (jsonl) or
    ``file[index] line N`` (JSON list); it names the record in skip messages. Records are yielded
    as parsed (any JSON value); a line or element that cannot be used comes as a SkipRecord
    (``bad_json``, ``bad_encoding``) in the record's place.

    Raises:
        MmloomError: unreadable file, a JSON object instead of a list ("not a JSON list", the file
            named), or malformed JSON inside a JSON list.
    """
    path = Path(path)
    if fmt == "json":
        yield from iter_json_list(path)
        return
    if fmt == "jsonl":
        yield from iter_jsonl(path)
        return
    if detect_format(path) == "json":
        yield from iter_json_list(path)
        return
    if not _first_line_is_json(path) or path.suffix.lower() == ".json":
        # Possibly one JSON document (an object): a pretty-printed object's first line "{" is not JSON.
        try:
            data = json.loads(_decode(_read_bytes(path)))
        except (json.JSONDecodeError, RecursionError):
            data = None  # not one document: jsonl, with its bad lines counted
        if isinstance(data, dict):
            raise MmloomError(f"{path}: not a JSON list (the file holds one JSON object); "
                              "expected a JSON list of records or jsonl (one record per line)")
    yield from iter_jsonl(path)


def relative_media_path(value: Any, field: str = "image", reason: str = "bad_image_path") -> str:
    """A record's media path (`field`: its record key) as a relative POSIX path that stays under its
    root folder.

    Backslashes count as separators. Raises SkipRecord ``missing_field`` (empty), ``bad_field``
    (not a string) or `reason` (absolute, a drive letter, or a ``..`` part).
    """
    if value is None or value == "":
        raise SkipRecord("missing_field", f"{field} is empty")
    if not isinstance(value, str):
        raise SkipRecord("bad_field", f"{field} is not a path string: {str(value)[:80]!r}")
    posix = value.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or _DRIVE.match(posix) or ".." in parts:
        raise SkipRecord(reason, f"{field} {value!r} leaves the {field} root (absolute or '..')")
    name = "/".join(p for p in parts if p != ".")
    if not name:
        raise SkipRecord("missing_field", f"{field} {value!r} names no file")
    return name


def is_llava_jsonl(path: str | Path) -> bool:
    """Whether `path` is a jsonl file of LLaVA records (its first non-blank line a JSON object with a
    ``conversations`` list): what `mmloom data convert` / `json2jsonl` write, so what `--overwrite` may
    replace. Reads the first line only (up to 4 MiB)."""
    try:
        for _, line in iter_jsonl_lines(Path(path), 4 * 2**20):
            record = None if isinstance(line, SkipRecord) else parse_json_line(line)
            return isinstance(record, dict) and isinstance(record.get("conversations"), list)
    except MmloomError:
        return False
    return False
