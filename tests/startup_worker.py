"""A torchrun worker for tests/test_train_startup.py: builds the starting model of a config under
FSDP2 and under DDP (`model_loading.build_base_model(..., wrap=True)`) and writes, per rank and mode,
the whole state (FSDP2 shards gathered), the random state and the frozen-weight fingerprint.

    torchrun --nproc_per_node=2 tests/startup_worker.py CONFIG.yaml OUT_DIR [--set key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmloom.training import model_loading
from mmloom.training.config import load_train_config
from mmloom.training.distributed import init_distributed, unwrap
from mmloom.training.run_folder import resolve_model_folder


def main(argv: list[str]) -> None:
    config, out = argv[0], Path(argv[1])
    sets = [argv[i + 1] for i in range(2, len(argv), 2) if argv[i] == "--set"]
    cfg = load_train_config(config, sets)
    start = resolve_model_folder(cfg.runconfig.checkpoint_path) if cfg.runconfig.checkpoint_path else None
    ctx = init_distributed("fsdp")
    for mode in ("fsdp", "ddp"):
        ctx = dataclasses.replace(ctx, mode=mode)
        model = unwrap(model_loading.build_base_model(cfg, start, ctx, wrap=True))
        rng = torch.get_rng_state()
        fingerprint = model_loading.frozen_fingerprint(model, ctx)
        state = {}
        for name, tensor in model.state_dict().items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = full.detach().cpu().clone().contiguous()
        shards = {name: list(t.to_local().shape) for name, t in model.state_dict().items() if hasattr(t, "to_local")}
        save_file(state, str(out / f"{mode}_{ctx.rank}.safetensors"))
        (out / f"{mode}_{ctx.rank}.json").write_text(json.dumps({
            "rng": rng.tolist(), "fingerprint": fingerprint, "shards": shards,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        }))
        del model
    ctx.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
