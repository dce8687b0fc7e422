"""`mmloom chat`, `mmloom generate` and `mmloom score`."""

from __future__ import annotations

import argparse


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="load the weights in this dtype (default: as saved)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")


def register(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat", help="chat with a saved model about an image",
        description="One answer with --prompt, else an interactive session (/image PATH, /reset, /quit).",
    )
    chat.add_argument("model_dir", metavar="MODEL_DIR", help="mmloom model folder (with its processor)")
    chat.add_argument("--image", metavar="PATH", help="the image to talk about")
    chat.add_argument("--prompt", help="ask one question and exit")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--system", default=None, help="system text (default: the template's)")
    _model_options(chat)
    chat.set_defaults(func=run_chat)

    gen = subparsers.add_parser(
        "generate", help="answer a LLaVA-style question file (batched, resumable)",
        description="Answers QUESTIONS.jsonl (question_id, image, text) into --output, greedy by default; "
        "question ids already in the output are skipped.",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    gen.add_argument("questions", metavar="QUESTIONS.jsonl")
    gen.add_argument("--output", required=True, metavar="ANSWERS.jsonl")
    gen.add_argument("--image-dir", metavar="DIR", help="root of the question images (default: the file's folder)")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--suffix", choices=["short", "choice", "none"], default="none",
                     help="answer-format instruction appended to each question")
    gen.add_argument("--blank-images", action="store_true",
                     help="replace every image by its mean colour (checks that answers come from the image)")
    gen.add_argument("--model-id", default=None, help="model_id written with each answer (default: folder name)")
    _model_options(gen)
    gen.set_defaults(func=run_generate)

    score = subparsers.add_parser("score", help="score answers against references")
    score.add_argument("answers", metavar="ANSWERS.jsonl")
    score.add_argument("--references", required=True, metavar="REFS.jsonl")
    score.add_argument("--metric", required=True, choices=["exact", "vqa", "choice", "yesno"])
    score.add_argument("--by", metavar="FIELD", help="also report per value of this field (e.g. question_type)")
    score.add_argument("--output-json", metavar="PATH", help="write the scores as JSON")
    score.set_defaults(func=run_score)


def run_chat(args) -> int:
    from mmloom.inference.chat import chat

    return chat(args.model_dir, image=args.image, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, dtype=args.dtype, device=args.device, system=args.system)


def run_generate(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from mmloom.inference.generate import generate_answers, load_model_and_processor

    model, processor = load_model_and_processor(args.model_dir, args.dtype, args.device)
    counts = generate_answers(
        model, processor, args.questions, args.output, image_dir=args.image_dir, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, suffix=args.suffix, blank_images=args.blank_images,
        temperature=args.temperature, model_id=args.model_id or Path(args.model_dir).resolve().name,
    )
    Console(stderr=True).print(
        f"{counts['answered']} answered, {counts['skipped']} already in {args.output} ({counts['total']} questions)"
    )
    return 0


def run_score(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from mmloom.inference.generate import read_jsonl
    from mmloom.inference.score import format_table, score_answers

    result = score_answers(read_jsonl(args.answers, "answers file"), read_jsonl(args.references, "references file"),
                           args.metric, by=args.by)
    console = Console()
    console.print(format_table(result))
    if result["missing"] or result["unmatched"]:
        console.print(f"{result['missing']} reference(s) without an answer, "
                      f"{result['unmatched']} answer(s) without a reference (not scored)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return 0
