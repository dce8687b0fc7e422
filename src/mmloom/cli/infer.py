"""`mmloom chat`, `mmloom generate` and `mmloom score`."""

from __future__ import annotations

import argparse

from mmloom.cli.options import HelpFormatter, existing_dir, existing_file, non_negative_float, positive_int


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="load the weights in this dtype (default: as saved)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps (default: cuda when available, else cpu); a device this "
                        "machine lacks is an error")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's, one per core; 1 is fastest for a small model on "
                        "cores other processes share)")


def _media():
    """The modalities' specs (`mmloom.processing.media.MEDIA`): each gives the media options."""
    from mmloom.processing.media import MEDIA

    return list(MEDIA.values())


def register(subparsers) -> None:
    media = _media()
    items = " and/or ".join(f"{'an' if m.item_noun[0] in 'aeiou' else 'a'} {m.item_noun}" for m in media)
    commands = ", ".join([*(f"/{m.noun} PATH" for m in media), "/reset", "/quit"])
    chat = subparsers.add_parser(
        "chat", help=f"chat with a saved model about {items}",
        description=f"One answer with --prompt, else an interactive session ({commands}).",
    )
    chat.add_argument("model_dir", metavar="MODEL_DIR", type=existing_dir,
                      help="mmloom model folder or checkpoint-N folder (with its processor files)")
    for m in media:
        chat.add_argument(f"--{m.noun}", metavar="PATH", type=existing_file, action="append",
                          help=m.cli_help["item"] + f"; repeat it for several (--{m.noun} A --{m.noun} B)")
    chat.add_argument("--prompt", help="ask one question and exit (default: an interactive session)")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                      help="longest answer, in tokens (at least 1)")
    chat.add_argument("--temperature", type=non_negative_float, default=0.0,
                      help="sampling temperature; 0 = greedy decoding (default 0)")
    chat.add_argument("--system", default=None,
                      help=f"system text, with or without {'/'.join(f'--{m.noun}' for m in media)} (default: the "
                      "template's; \"\" for none where the template allows)")
    _model_options(chat)
    chat.set_defaults(func=run_chat)

    keys = " and ".join(m.record_key for m in media)
    gen = subparsers.add_parser(
        "generate", help="answer a LLaVA-style question file (batched, resumable)",
        description=f"Answers QUESTIONS.jsonl (question_id, text, optional {keys}: a path or a list) into "
        "--output, greedy by default; question ids already in the output are skipped.",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", type=existing_dir,
                     help="mmloom model folder or checkpoint-N folder (with its processor files)")
    gen.add_argument("questions", metavar="QUESTIONS.jsonl", type=existing_file,
                     help=f"one JSON object per line: question_id, text, optional {' / '.join(m.record_key for m in media)} "
                     "(a path or a list)")
    gen.add_argument("--output", required=True, metavar="ANSWERS.jsonl",
                     help="answers file, appended to (question_id, prompt, text, model_id per line)")
    for m in media:
        gen.add_argument(f"--{m.noun}-dir", metavar="DIR", type=existing_dir, help=m.cli_help["dir"])
    gen.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="questions per forward pass")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                     help="longest answer, in tokens (at least 1)")
    gen.add_argument("--temperature", type=non_negative_float, default=0.0,
                     help="sampling temperature; 0 = greedy decoding (default 0)")
    gen.add_argument("--suffix", choices=["short", "choice", "none"], default="none",
                     help="answer-format instruction appended to each question")
    for m in media:
        gen.add_argument(f"--{m.baseline}", action="store_true", help=m.cli_help["baseline"])
    gen.add_argument("--model-id", default=None, help="model_id written with each answer (default: folder name)")
    gen.add_argument("--system", default=None,
                     help="system text of every prompt (default: the template's; \"\" for none where the template allows)")
    _model_options(gen)
    gen.set_defaults(func=run_generate)

    score = subparsers.add_parser(
        "score", help="score answers against references",
        formatter_class=HelpFormatter,
        description="""Score ANSWERS.jsonl (mmloom generate output: one JSON object per line with
question_id and text) against REFS.jsonl, matched by question_id; an id may
appear only once per file.

REFS.jsonl: one JSON object per line with question_id and, per --metric:
  exact   answer (string) or answers (list): normalised exact match (lowercase,
          punctuation and articles removed) against any of them
  vqa     answers: the human answers (strings or {"answer": ...}, as in VQAv2).
          Official VQA accuracy: VQA answer normalisation (punctuation, number
          words -> digits, articles, contractions), then the mean over the n
          leave-one-out subsets of min(#matches / 3, 1); with 10 answers,
          1 / 2 / 3 / 4+ matches score 0.3 / 0.6 / 0.9 / 1.0. Fewer than 10
          answers: the mean over the n subsets; at least 2 answers needed
  choice  label (else answer): the option letter; the first letter found in the
          answer counts (only the first len(options) letters if options is given)
  yesno   label (else answer): yes/no; answers read as POPE does; also reports
          precision, recall, F1 (positive = yes) and the yes ratio
Other reference fields can group the scores (--by). Scores are accuracies
(fraction correct, printed as %); answers without a reference and references
without an answer are counted and not scored.""",
    )
    score.add_argument("answers", metavar="ANSWERS.jsonl", help="answers: question_id, text per line")
    score.add_argument("--references", required=True, metavar="REFS.jsonl",
                       help="references: question_id + the metric's fields per line (see above)")
    score.add_argument("--metric", required=True, choices=["exact", "vqa", "choice", "yesno"],
                       help="how an answer is compared with its reference (see above)")
    score.add_argument("--by", metavar="FIELD",
                       help="also report per value of this reference (or answer) field, e.g. question_type "
                       "(default: overall only)")
    score.add_argument("--output-json", metavar="PATH", help="also write the scores as JSON (default: not written; "
                       "an existing file is replaced only when it is an earlier score output and --overwrite is given)")
    score.add_argument("--overwrite", action="store_true", help="replace the --output-json of an earlier `mmloom score`")
    score.set_defaults(func=run_score)


def run_chat(args) -> int:
    from mmloom.devices import set_cpu_threads
    from mmloom.inference.chat import chat

    set_cpu_threads(args.threads)

    return chat(args.model_dir, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, dtype=args.dtype, device=args.device, system=args.system,
                items={m.noun: getattr(args, m.noun) for m in _media()})


def run_generate(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from mmloom.devices import set_cpu_threads
    from mmloom.inference.generate import generate_answers, load_model_and_processor

    set_cpu_threads(args.threads)
    model, processor = load_model_and_processor(args.model_dir, args.dtype, args.device)
    media = _media()
    counts = generate_answers(
        model, processor, args.questions, args.output, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, suffix=args.suffix, temperature=args.temperature,
        model_id=args.model_id or Path(args.model_dir).resolve().name, system=args.system,
        media_dirs={m.noun: getattr(args, f"{m.noun}_dir") for m in media},
        baselines={m.noun for m in media if getattr(args, m.baseline.replace("-", "_"))},
    )
    Console(stderr=True).print(
        f"{counts['answered']} answered, {counts['skipped']} already in {args.output} ({counts['total']} questions)"
    )
    return 0


def run_score(args) -> int:
    import json

    from rich.console import Console

    from mmloom.files import atomic_open
    from mmloom.inference.score import format_table, is_score_output, score_files
    from mmloom.outputs import check_destination

    if args.output_json:
        check_destination(args.output_json, "score", overwrite=args.overwrite, kind="file",
                          recognise=is_score_output, sources=[args.answers, args.references])
    result = score_files(args.answers, args.references, args.metric, by=args.by)
    console = Console()
    console.print(format_table(result))
    if result["missing"] or result["unmatched"]:
        console.print(f"{result['missing']} reference(s) without an answer, "
                      f"{result['unmatched']} answer(s) without a reference (not scored)")
    if args.output_json:
        with atomic_open(args.output_json) as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0
