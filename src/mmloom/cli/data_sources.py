"""`mmloom data convert` and `mmloom data json2jsonl` (the converters live in `mmloom.data.sources`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmloom.cli.options import HelpFormatter
from mmloom.errors import MmloomError

EPILOG = """\
image paths in the output:
  Each record's "image" is relative to --image-dir; give the same folder as the
  image root to `mmloom data build`. Without --image-dir, paths are relative to
  the dataset root (the --input folder, or the folder holding the --input file)
  for sources whose images are on disk, and relative to the output file's folder
  for arxivcap/synthdog, which write their images to --image-dir (default:
  <output folder>/images). Images are looked up where the dataset's layout
  keeps them, then under --image-dir by the record's path and by file name
  (e.g. the official spdocvqa_images/ folder). llava keeps its paths as they
  are and, given --image-dir, skips records whose image is missing there.

bad records are skipped and counted by reason (missing_field, bad_field,
bad_label, bad_json, bad_encoding, multi_figure, missing_image, bad_image,
image_too_large, bad_image_path, duplicate_image); --strict stops at the first one
instead.
A run that keeps no record fails (exit 2) with the reasons and writes nothing.

Images written by arxivcap/synthdog are never overwritten: an identical file is
reused, a different one stops the run. SynthDoG images are named
<parquet file name>/<row>.png, so shards and runs can share one image folder.
See docs/converters.md for each source's layout and the differences from
Cerebras' preprocess_dataset.py.

sources:
"""


def _convert(args: argparse.Namespace) -> int:
    from mmloom.data.records_io import is_llava_jsonl
    from mmloom.data.sources import SOURCES, Context, run_convert
    from mmloom.outputs import check_destination

    source = SOURCES[args.source]
    check_destination(args.output, "data convert", overwrite=args.overwrite, kind="file", recognise=is_llava_jsonl)
    ctx = Context(input=Path(args.input), output=Path(args.output),
                  image_dir=Path(args.image_dir) if args.image_dir else None,
                  split=args.split, strict=args.strict, options=args.options, prompts=args.prompts, seed=args.seed)
    try:
        stats = run_convert(source, ctx)
    except OSError as err:  # unreadable input, unwritable output or image folder
        raise MmloomError(f"{err.filename or args.output}: {err.strerror or err}") from None
    print(stats.summary(source.name, ctx.output))
    return 0


def _json2jsonl(args: argparse.Namespace) -> int:
    from mmloom.data.records_io import is_llava_jsonl
    from mmloom.data.sources import json_to_jsonl
    from mmloom.outputs import check_destination

    for path in sorted(Path(args.in_dir).glob("*.json")):  # every target claimed before any is written
        check_destination(Path(args.out_dir) / f"{path.stem}.jsonl", "data json2jsonl", overwrite=args.overwrite,
                          kind="file", recognise=is_llava_jsonl)
    try:
        results = json_to_jsonl(Path(args.in_dir), Path(args.out_dir))
    except OSError as err:
        raise MmloomError(f"{err.filename or args.out_dir}: {err.strerror or err}") from None
    for result in results:
        if result.error is None:
            skipped = sum(result.stats.skipped.values())
            print("\n".join([f"wrote {result.stats.written} records -> {result.target}"
                             + (f" ({skipped} skipped)" if skipped else ""), *result.stats.reasons()]))
    failed = [result.error for result in results if result.error is not None]
    if failed:
        raise MmloomError(f"{len(failed)} of {len(results)} file(s) not converted:\n" + "\n".join(failed))
    return 0


def register(data_subparsers) -> None:
    from mmloom.data.sources import SOURCES

    sources = "".join(f"  {name:<16}{source.help}\n" for name, source in SOURCES.items())
    parser = data_subparsers.add_parser(
        "convert", help="convert a public VLM dataset to LLaVA jsonl",
        description="Convert a public VLM dataset into LLaVA json records, one per line.",
        epilog=EPILOG + sources, formatter_class=HelpFormatter)
    parser.add_argument("source", choices=list(SOURCES), metavar="SOURCE", help="one of: " + ", ".join(SOURCES))
    parser.add_argument("--input", required=True, help="dataset file or folder (see sources below)")
    parser.add_argument("--output", required=True, help="jsonl file to write (new; an existing LLaVA jsonl is replaced "
                        "atomically with --overwrite, any other file never)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it is a LLaVA jsonl (an "
                        "earlier conversion)")
    parser.add_argument("--image-dir", metavar="DIR", help="image root that output image paths are relative to, also "
                        "searched for images; arxivcap/synthdog write their images here (default: see 'image paths' below)")
    parser.add_argument("--split", default=None,
                        help="split for chartqa (train/val/test), docvqa/infographicsvqa (train/val/test), dvqa "
                        "(train/val_easy/val_hard), synthdog (train/validation) (default: train)")
    parser.add_argument("--options", choices=["inline", "newline"], default="inline",
                        help="ai2d/arxivqa choices: 'Q a) x b) y' as Cerebras (inline, default) or one per line")
    parser.add_argument("--prompts", choices=["brief", "ocr"], default="brief",
                        help="synthdog questions: LLaVA's brief-description prompts as Cerebras (brief, default) "
                        "or reading prompts (ocr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthdog prompt draw (default 0)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.set_defaults(func=_convert)

    parser = data_subparsers.add_parser(
        "json2jsonl", help="convert every *.json list in a folder to jsonl",
        description="Write each IN_DIR/<name>.json (a JSON list of records) as OUT_DIR/<name>.jsonl. "
        "A record with bytes that are not UTF-8 is skipped and counted; a file that is not a JSON list or "
        "keeps no record is not written, and the command then exits 2 after converting the others.")
    parser.add_argument("in_dir", metavar="IN_DIR", help="folder of *.json files (JSON lists of LLaVA records)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the *.jsonl files (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/<name>.jsonl files that are LLaVA "
                        "jsonl (an earlier run); other files there are never replaced")
    parser.set_defaults(func=_json2jsonl)
