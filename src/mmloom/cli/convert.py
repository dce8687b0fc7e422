"""`mmloom convert` (checkpoint formats, both ways) and `mmloom init` (compose from HF folders)."""

from __future__ import annotations

import argparse

from mmloom.cli.options import existing_dir, positive_int


def _layer(value: str):
    """`-2` or `-2,-5` (several layers are concatenated)."""
    try:
        layers = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {value!r}") from None
    return layers[0] if len(layers) == 1 else layers


# Kept here as text (the CLI imports no torch to print --help); tests/test_templates.py checks it names every
# template of mmloom.processing.templates with its source.
TEMPLATE_HELP = (
    "conversation template saved with the processor: plain (LLaVA phase-1 captions), vicuna_v1 (LLaVA-1.5), "
    "llama2 (LLaVA's llava_llama_2), llama3 (Meta Llama-3 Instruct), zephyr (HuggingFaceH4 Zephyr), chatml "
    "(ChatML: Qwen, Hermes, SmolLM), mistral (Mistral Instruct v0.1), tokenizer (the LLM tokenizer's own "
    "chat_template, its default system prompt included). Default: tokenizer when the LLM's tokenizer has a "
    "chat_template, else vicuna_v1. What each renders: docs/templates.md"
)


def _add_compose_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("composing from HF folders (hf-components) / locating towers")
    group.add_argument("--image-model", metavar="DIR", type=existing_dir,
                       help="vision encoder folder: CLIP/SigLIP (CLIPVisionModel or CLIPModel), e.g. "
                       "pretrained/clip-vit-large-patch14-336 (default: none; init needs it or --audio-model)")
    group.add_argument("--text-model", metavar="DIR", type=existing_dir,
                       help="causal LM folder with its tokenizer, e.g. pretrained/vicuna-7b-v1.5 (no default: "
                       "required by hf-components / init)")
    group.add_argument("--audio-model", metavar="DIR", type=existing_dir, help="Whisper folder (its encoder is used; default: none)")
    group.add_argument("--audio-stride", type=positive_int, default=1, metavar="N",
                       help="audio: encoder positions per LLM token (AudioPool; Whisper gives 50 per second)")
    group.add_argument("--audio-pool-mode", choices=["mean", "stack"], default="mean",
                       help="audio: average (mean) or concatenate (stack) each group of --audio-stride positions")
    group.add_argument("--projector", default="mlp2x_gelu", help="projector type: linear, mlp, mlp{N}x_{act} (default mlp2x_gelu)")
    group.add_argument("--activation", default="gelu", help="activation of an 'mlp' projector (default gelu)")
    group.add_argument("--feature-layer", type=_layer, default=-2, help="vision hidden layer(s) to use (default -2)")
    group.add_argument("--feature-strategy", default=None, choices=["patch", "cls_patch", "default", "full"],
                       help="drop the first (CLS) position (patch = transformers' default) or keep every position "
                       "(cls_patch = full); default: patch for towers with a CLS token (CLIP), full for those "
                       "without (SigLIP), where patch is refused (it would drop a real patch)")
    group.add_argument("--pad-to-multiple-of", type=positive_int, default=None, metavar="N",
                       help="round the vocabulary (embedding rows) up to a multiple of N, e.g. 64 (default: "
                       "not rounded)")
    group.add_argument("--template", default=None, help=TEMPLATE_HELP)
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                       help="dtype of the written weights (default: as loaded)")


def register(subparsers) -> None:
    from mmloom.interop.formats import FORMATS

    names = list(FORMATS)
    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints between mmloom, hf-llava, original LLaVA and HF component folders, and export "
        "to llama.cpp / Ollama (gguf)",
        description="Convert a checkpoint: mmloom convert --from FORMAT --to FORMAT SRC DST "
        "(hf-components takes no SRC: --image-model DIR --text-model DIR). DST must be new or an empty folder: "
        "an existing one is replaced only when it is an earlier `mmloom convert` output and --overwrite is given, "
        "never when it holds or lies inside SRC. Writes are atomic: an interrupted conversion leaves DST as it was.",
    )
    convert.add_argument("paths", nargs="*", metavar="SRC DST", help="source and destination (DST only for hf-components)")
    convert.add_argument("--from", dest="src_format", choices=names, help="format of SRC (required unless --list; no default)")
    convert.add_argument("--to", dest="dst_format", choices=names, help="format of DST (required unless --list; no default)")
    convert.add_argument("--list", action="store_true", help="list formats and supported conversions, and exit")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace DST when it is an earlier `mmloom convert` / `mmloom init` output")
    convert.add_argument("--base", metavar="DIR", type=existing_dir, help="llava-projector: the mmloom model to import into (default DST)")
    convert.add_argument("--mm-vision-tower", metavar="PATH",
                         help="llava: value written as mm_vision_tower (default: absolute path of DST/image_model; "
                         "the original code resolves a relative PATH against its working directory, e.g. "
                         "'image_model' when run in DST)")
    convert.add_argument("--text-folder", default=None,
                         help="llava: name of the LLM folder (must contain 'llava'; default text_model_llava, "
                         "text_model_llava_mistral for a Mistral LLM)")
    convert.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                         help="gguf: type of the written weights (default f16; q8_0 quantizes the language model, "
                         "norms and biases stay f32)")
    convert.add_argument("--name", default=None,
                         help="gguf: file name stem, DST/NAME.gguf and DST/mmproj-NAME.gguf (default: DST's folder name)")
    _add_compose_options(convert)
    convert.set_defaults(func=run_convert)

    init = subparsers.add_parser(
        "init",
        help="compose a new model from HF folders (fresh projector), ready for phase 1",
        description="mmloom init --image-model DIR --text-model DIR [--projector mlp2x_gelu] --out DIR",
    )
    init.add_argument("--out", required=True, metavar="DIR",
                      help="the new mmloom model folder (new or empty; written atomically)")
    init.add_argument("--overwrite", action="store_true",
                      help="replace --out when it is an earlier `mmloom init` / `mmloom convert` output")
    _add_compose_options(init)
    init.set_defaults(func=run_init)


def _options(args) -> dict:
    keys = ("image_model", "text_model", "audio_model", "audio_stride", "audio_pool_mode", "projector", "activation", "feature_layer",
            "feature_strategy", "pad_to_multiple_of", "template", "dtype", "base", "mm_vision_tower", "text_folder",
            "outtype", "name")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _report(bundle, src_format: str, dst_format: str, dst) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    model = bundle.model
    console.print(f"[green]converted[/] {src_format} -> {dst_format}: {escape(str(dst))}")
    lines = [f"  encoders {model.encoder_names}, placeholders {model.placeholder_token_ids}, template {bundle.template}"]
    for line in lines + [f"  {note}" for note in bundle.notes]:
        console.print(line, markup=False)


def run_convert(args) -> int:
    from mmloom.errors import MmloomError
    from mmloom.interop.formats import convert, pairs_table

    if args.list:
        print(pairs_table())
        return 0
    if not args.src_format or not args.dst_format:
        raise MmloomError("give --from FORMAT and --to FORMAT (or --list)")
    options = _options(args)
    if args.dst_format != "gguf" and (args.outtype or args.name):
        raise MmloomError("--outtype and --name apply to --to gguf only")
    if args.dst_format == "gguf" and args.dtype:
        raise MmloomError("--to gguf writes the type --outtype names (f32, f16, bf16, q8_0); --dtype does not apply")
    if args.src_format == "hf-components":
        if len(args.paths) != 1:
            raise MmloomError("--from hf-components takes only DST (the sources are --image-model/--text-model)")
        src, dst = None, args.paths[0]
    else:
        if len(args.paths) != 2:
            raise MmloomError(f"expected SRC and DST, got {len(args.paths)} path(s)")
        src, dst = args.paths
    if args.src_format == "llava-projector" and options.get("base") is None:
        options["base"] = dst
    bundle = convert(args.src_format, args.dst_format, src, dst, overwrite=args.overwrite, **options)
    _report(bundle, args.src_format, args.dst_format, dst)
    return 0


def run_init(args) -> int:
    from mmloom.errors import MmloomError
    from mmloom.interop.formats import convert

    if not args.image_model and not args.audio_model:
        raise MmloomError("init needs --image-model DIR (and/or --audio-model DIR) and --text-model DIR")
    bundle = convert("hf-components", "mmloom", None, args.out, overwrite=args.overwrite, **_options(args))
    _report(bundle, "hf-components", "mmloom", args.out)
    return 0
