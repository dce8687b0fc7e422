"""Host memory of saving the final model under FSDP2: the streamed writer (`checkpoint.save_model`:
each tensor all-gathered in turn and written by the rank that owns its file) against gathering the
full state dict on rank 0 first (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`,
mmloom's writer before checkpoint format 2).

    torchrun --standalone --nproc_per_node=2 benchmarks/checkpoint_memory.py [--hidden 1024 --layers 8]
        [--streamed-first]   (each is measured in both orders: freed memory may stay resident)

Prints, per rank, the model's full size and the peak resident-memory increase (sampled every 2 ms
from /proc/self/statm) during each way of saving. CPU, gloo; random weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the value at entry, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def increase(self) -> int:
        return self.peak - self.base


def main() -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmloom.training.builder import build_model
    from mmloom.training.checkpoint import save_model
    from mmloom.training.config import load_train_config
    from mmloom.training.distributed import init_distributed, wrap_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--streamed-first", action="store_true", help="measure the streamed save first")
    args = parser.parse_args()
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "phase2.yaml"
    h = args.hidden
    cfg = load_train_config(config, [
        f"model.text_model.hidden_size={h}", f"model.text_model.intermediate_size={4 * h}",
        f"model.text_model.num_hidden_layers={args.layers}", f"model.text_model.vocab_size={args.vocab}",
        "model.text_model.num_attention_heads=8", "model.text_model.num_key_value_heads=8",
        "runconfig.distributed=fsdp", "model.freeze=[]"])
    ctx = init_distributed("fsdp")
    model = wrap_model(build_model(cfg, seed=0), ctx)
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensor: full shapes
    out = Path(tempfile.mkdtemp(prefix="mmloom-ckpt-mem-")) if ctx.is_main else None
    out = Path(ctx.broadcast_object(str(out)))
    def gather_then_write():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ctx.is_main:
            torch.save(state, out / "gathered.pt")

    def stream():
        save_model(out / "final_model", model, ctx)

    peaks = {}
    order = [("streamed", stream), ("gathered", gather_then_write)]
    for name, fn in order if args.streamed_first else order[::-1]:
        ctx.barrier()
        with PeakRss() as peak:
            fn()
        peaks[name] = peak
    ctx.barrier()
    gathered, streamed = peaks["gathered"], peaks["streamed"]
    rows = ctx.gather_objects((ctx.rank, gathered.increase, streamed.increase))
    if ctx.is_main:
        mib = 2**20
        print(f"model: {full / mib:,.0f} MiB (fp32), {ctx.world_size} ranks")
        for rank, g, s in rows:
            print(f"rank {rank}: peak RSS increase, gather on rank 0 then write: {g / mib:,.0f} MiB "
                  f"({g / full:.2f}x the model); streamed: {s / mib:,.0f} MiB ({s / full:.2f}x)")
        shutil.rmtree(out, ignore_errors=True)
    ctx.shutdown()


if __name__ == "__main__":
    main()
