"""`mmloom demo`: the whole pipeline, end to end, on synthetic scenes (what `make demo` runs)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the LLaVA pipeline end to end on synthetic scenes, sounds or clips (data, tokenizer, HDF5, 2 phases, "
        "eval)",
        description="Generates a synthetic dataset (scenes; with --modality audio sounds, with --modality video "
        "clips), trains a tokenizer, builds HDF5 data, trains phase 1 and phase 2, evaluates on the held-out split "
        "with and without the images (audio, video), and chats. Each step is a printed `mmloom` command. "
        "Everything is written under --out.",
    )
    parser.add_argument("--modality", choices=["vision", "audio", "video"], default="vision",
                        help="vision: scenes with a tiny CLIP (default); audio: sounds with a tiny Whisper encoder; "
                        "video: clips of moving shapes, frames through a tiny CLIP pooled per frame")
    parser.add_argument("--out", default=None,
                        help="output folder, cleared if a previous demo made it (default runs/demo, runs/demo-audio, "
                        "runs/demo-video)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for smoke tests)")
    parser.set_defaults(func=_demo)


def _demo(args) -> int:
    if args.modality == "video":
        from mmloom.demo.video_pipeline import run_video_demo

        run_video_demo(args.out or "runs/demo-video", quick=args.quick)
        return 0
    if args.modality == "audio":
        from mmloom.demo.audio_pipeline import run_audio_demo

        run_audio_demo(args.out or "runs/demo-audio", quick=args.quick)
        return 0
    from mmloom.demo.pipeline import run_demo

    run_demo(args.out or "runs/demo", quick=args.quick)
    return 0
