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


# file name, y label, title, [(metrics key, legend label, line style)]
FIGURES = [
    ("loss.png", "loss", "loss", [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")]),
    ("lr.png", "learning rate", "learning rate", [("lr", "lr", "-"), ("projector_lr", "projector lr", "-")]),
]


def plot_metrics(model_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png (train and eval loss) and lr.png (lr and projector lr); returns the paths."""
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
    for filename, ylabel, title, curves in FIGURES:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label, style in curves:
            steps, values = _last_per_step(records, key)
            if steps:
                ax.plot(steps, values, style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model_dir.name}: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(out / filename)
    return written
