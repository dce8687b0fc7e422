"""`mmloom plot MODEL_DIR`: loss and learning-rate curves from metrics.jsonl as PNG files."""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.training.metrics import read_metrics


def _last_per_step(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    values: dict[int, float] = {}
    for r in records:
        if key in r and r.get(key) is not None and "step" in r:
            values[int(r["step"])] = float(r[key])
    steps = sorted(values)
    return steps, [values[s] for s in steps]


def plot_metrics(model_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png and lr.png (and eval_loss into loss.png when present); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = Path(model_dir)
    records = read_metrics(model_dir)
    if not records:
        raise MmloomError(f"no metrics.jsonl records in {model_dir}")
    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, loss = _last_per_step(records, "loss")
    ax.plot(steps, loss, label="train loss")
    esteps, eloss = _last_per_step(records, "eval_loss")
    if esteps:
        ax.plot(esteps, eloss, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{model_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, lr = _last_per_step(records, "lr")
    ax.plot(steps, lr, label="lr")
    psteps, plr = _last_per_step(records, "projector_lr")
    if psteps:
        ax.plot(psteps, plr, label="projector lr")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{model_dir.name}: learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr.png", dpi=100)
    plt.close(fig)
    written.append(out / "lr.png")
    return written
