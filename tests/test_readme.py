"""The README's quickstart runs as written, against tiny stand-ins for the real model folders."""

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

from mmloom.testing import SAMPLE_TEXTS, tiny_clip_vision, tiny_llama
from mmloom.tokenization import train_bpe_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip_dir, llm_dir = Path("path/to/clip-vit-large-patch14-336"), Path("path/to/vicuna-7b-v1.5")
    tiny_clip_vision().save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300, extra_special_tokens=())  # no <image> yet
    tokenizer.save_pretrained(llm_dir)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(llm_dir)
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save("photo.jpg")

    section = README.read_text().split("## Quickstart in code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["model"].dtype.is_floating_point and Path("runs/llava/config.json").exists()


# ------------------------------------------------------------------------ real-data section
REAL_DATA = "## Usage with real models and data: LLaVA-1.5"
# README commands that cannot run offline on tiny stand-ins, with the reason (each must still be in the README)
NOT_RUN = {
    "mmloom data convert chartqa": "needs the ChartQA download (tests/test_data_sources*.py cover the converters)",
    "mmloom data convert docvqa": "needs the DocVQA download",
    "mmloom data convert synthdog": "needs the SynthDoG parquet shards",
    "mmloom train configs/llava_v1p5/": "7B/13B configs: their paths are checked against the builds instead",
    "mmloom train CONFIG.yaml": "placeholder config",
    "torchrun": "several processes (tests/test_train_distributed.py)",
    "mmloom plot DIR": "placeholder run folder",
    "mmloom merge-lora DIR": "placeholder run folder (tests/test_train_loop.py covers it)",
    "mmloom chat runs/audio_llm": "audio model (tests/test_audio_train.py)",
    "mmloom chat runs/llava_v1p5_7b_video": "a trained video model (tests/test_video_train.py runs chat --video)",
    "mmloom generate runs/audio_llm": "audio model",
    "mmloom generate ... --silence-audio": "placeholder arguments",
    "llama-mtmd-cli": "llama.cpp's own program (tests/clients/test_llamacpp_client.py runs the export in llama.cpp)",
    "llama-server": "llama.cpp's own program (the client stage drives it through xllamacpp)",
    "ollama create": "Ollama is not installed here",
}


def readme_commands(section: str) -> list[str]:
    """The shell commands of the README section's bash blocks (continuations joined, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _readme_block_lines(prefix: str) -> list[str]:
    """The README's lines that start with `prefix` (its example records)."""
    return [line for line in README.read_text().splitlines() if line.startswith(prefix)]


def _stand_ins(root: Path) -> None:
    """Tiny models and data in the layouts the README and configs/ name (see the README's paths)."""
    import json

    from transformers import CLIPConfig, CLIPModel

    from tokenizer_families import LLAMA2_TOKENIZER_MODEL, stock_vicuna_folder

    assert LLAMA2_TOKENIZER_MODEL.is_file(), "CI has ../shared/assets/llama2-tokenizer"
    shutil.copytree(README.parent / "configs", root / "configs")
    rng = np.random.default_rng(0)

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(path)

    pretrain = root / "data" / "LLaVA-Pretrain"
    records = []
    for i in range(4):
        name = f"00000/{i:09d}.jpg"
        image(pretrain / "images" / name)
        records.append({"id": f"{i:09d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": f"a photo of {i} red squares on a table"}]})
    (pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    mix = root / "data" / "llava_v1_5_mix665k"
    records = [{"id": "sharegpt-0", "model": "", "conversations": [
        {"from": "human", "value": "Tell me a story about two triangles."}, {"from": "gpt", "value": "Once upon a time."}]}]
    for i in range(4):
        name = f"coco/train2017/{i:012d}.jpg"
        image(mix / "images" / name)
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "What colour is the square?\n<image>"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many are there?"}, {"from": "gpt", "value": str(i)}]})
    (mix / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    interleaved = root / "data" / "interleaved"  # several images per record (M4-Instruct / OneVision form)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        image(interleaved / "images" / name)
    records = [
        {"id": "1", "image": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat changed between the two photos?"},
            {"from": "gpt", "value": "The cup moved left."}]},
        {"id": "2", "image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A kitchen."},
            {"from": "human", "value": "<image> and <image>: which is later?"}, {"from": "gpt", "value": "The second."}]},
        {"id": "3", "image": "c.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cup."}]}]
    (interleaved / "train.json").write_text(json.dumps(records))
    video = root / "data" / "video"  # clips (LLaVA-Video-178K / OneVision form), written with PyAV
    from video_data import write_clip

    for name in ("clips/cooking.mp4", "a.mp4", "b.mp4"):
        write_clip(video / name, 12, "mpeg4", size=32)
    image(video / "still.jpg")
    records = json.loads("[" + ",".join(line for line in _readme_block_lines('{"id": "v')) + "]")
    (video / "jsonl").mkdir(parents=True)
    (video / "jsonl" / "video.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rlaif = root / "data" / "RLAIF-V"  # preference pairs with RLAIF-V's fields, images written to files
    (rlaif / "jsonl").mkdir(parents=True)
    pairs = []
    for i in range(3):
        image(rlaif / "images" / f"{i}.jpg")
        pairs.append({"ds_name": "stand-in", "image_path": f"{i}.jpg", "question": "What colour is the square?",
                      "chosen": "Red.", "rejected": "Blue, with a green circle.", "idx": str(i)})
    (rlaif / "jsonl" / "rlaif_v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))

    clip_config = CLIPConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99))
    clip_dir = root / "pretrained" / "clip-vit-large-patch14-336"
    CLIPModel(clip_config).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    vicuna = root / "pretrained" / "vicuna-7b-v1.5"
    stock_vicuna_folder(vicuna)  # the real Llama-2 tokenizer.model, as lmsys ships the folder
    tiny_llama(vocab_size=32000, hidden_size=16).save_pretrained(vicuna)
    image(root / "photo.jpg")
    image(root / "photo2.jpg")
    smollm2 = root / "pretrained" / "SmolLM2-135M-Instruct"  # a ChatML instruct LLM (tests/clients: the real one)
    from tokenizer_families import _byte_level

    _byte_level(smollm2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", pad="<|im_end|>")
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    config["chat_template"] = SMOLLM2_TEMPLATE
    (smollm2 / "tokenizer_config.json").write_text(json.dumps(config))
    tiny_llama(vocab_size=600, hidden_size=16, tie_word_embeddings=True).save_pretrained(smollm2)


def test_real_data_section_runs_offline(tmp_path, monkeypatch, capsys):
    """Every command of the README's real-data section that can run offline runs as written (in a
    folder laid out as the README says), and the training configs read what the builds wrote."""
    import io
    import json
    import shlex

    from mmloom.cli.main import main
    from mmloom.training.config import load_train_config

    monkeypatch.chdir(tmp_path)
    _stand_ins(tmp_path)
    section = README.read_text().split(REAL_DATA, 1)[1]
    commands = readme_commands(section)
    skipped = {key for key in NOT_RUN for c in commands if c.startswith(key)}
    assert skipped == set(NOT_RUN), f"README lines no longer present: {set(NOT_RUN) - skipped}"

    ran = []
    for command in commands:
        if any(command.startswith(key) for key in NOT_RUN):
            continue
        assert command.startswith("mmloom "), command
        argv = shlex.split(command)[1:]
        # setup.processes does not change the output; 2 cores here
        argv = [a.replace("setup.processes=16", "setup.processes=1") for a in argv]
        if argv[:2] == ["chat", "runs/llava_v1p5_7b_phase2/final_model"] and "--prompt" not in argv:
            monkeypatch.setattr("sys.stdin", io.StringIO("What is on the table?\n/quit\n"))
        if argv[0] == "chat" or argv[0] == "generate":
            argv += ["--max-new-tokens", "4"]
        if argv[0] == "generate":  # questions.jsonl as LLaVA's eval files hold them
            Path("questions.jsonl").write_text("".join(json.dumps(
                {"question_id": i, "image": "photo.jpg", "text": "What colour is it?"}) + "\n" for i in range(3)))
        if argv[0] == "score":  # refs.jsonl as the README describes it for vqa
            Path("refs.jsonl").write_text("".join(json.dumps(
                {"question_id": i, "answers": ["red"] * 10}) + "\n" for i in range(3)))
        if argv[0] == "chat" and not Path(argv[1]).exists():
            # stand-in for a trained 7B model: the composite `mmloom init` wrote (same folder format)
            shutil.copytree("pretrained/llava-7b-init", argv[1])
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"{command}\n{err}"
        ran.append(argv[0] if argv[0] != "data" else f"data {argv[1]}")
    assert ran.count("data build") == 6 and ran.count("init") == 2 and "chat" in ran and ran.count("convert") == 5
    # the chat model keeps its own template, in the model and in the data
    from mmloom import MultimodalProcessor

    assert MultimodalProcessor.from_pretrained("pretrained/smollm2-init").template.name == "tokenizer"
    smol_params = json.loads(Path("data/h5/smollm2_phase2_msl2048/data_params.json").read_text())
    assert smol_params["dataset"]["system_prompt_style"] == "tokenizer"
    assert {"data convert", "data json2jsonl", "data inspect", "generate", "score"} <= set(ran)
    interleaved = json.loads(Path("data/h5/interleaved_msl4096/data_params.json").read_text())
    assert interleaved["post-process"]["n_examples"] == 3 and interleaved["image_patch_info"]["images"] == 6
    assert interleaved["image_patch_info"]["samples"]["several_images"] == 2
    video = json.loads(Path("data/h5/video_msl4096/data_params.json").read_text())
    assert video["post-process"]["n_examples"] == 2 and video["modalities"]["video"]["clips"] == 3
    assert video["modalities"]["video"]["token_count"]["frame_tokens"] == 144  # 24 x 24 patches pooled 2 x 2

    # the training configs the README runs read the builds' outputs and the pretrained folders
    for config in ("pretrain_7b_phase1", "pretrain_7b_phase2", "7b_phase3_dpo"):
        cfg = load_train_config(f"configs/llava_v1p5/params_llava_v1p5_{config}_MSL2K.yaml", [])
        assert any(Path(cfg.train_input.data_dir).glob("data-*.h5")), cfg.train_input.data_dir
        assert Path(cfg.train_input.img_data_dir).is_dir()
        params = json.loads((Path(cfg.train_input.data_dir) / "data_params.json").read_text())
        assert Path(params["processor"]["tokenizer_type"]) == (tmp_path / "pretrained" / "vicuna-7b-v1.5").resolve()
        assert params["post-process"]["vocab_size"] == cfg.model.text_model["vocab_size"] == 32000
        assert params["post-process"]["image_token_id"] == cfg.model.image_token_id == 32000
        for part in (cfg.model.image_model, cfg.model.text_model):
            assert Path(part["pretrained"]).is_dir(), part["pretrained"]
    # the hf-llava export of a model trained with the stock (SentencePiece) tokenizer loads in transformers
    from transformers import AutoProcessor

    assert sorted(p.name for p in Path("exports/gguf").iterdir()) == [
        ".mmloom-output.json", "Modelfile", "llava-7b.gguf", "mmproj-llava-7b.gguf"]
    processor = AutoProcessor.from_pretrained("exports/llava-hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert processor.tokenizer("USER: hi", add_special_tokens=True).input_ids[:3] == [1, 3148, 1001]
