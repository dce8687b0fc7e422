"""`mmloom plot MODEL_DIR`: loss and learning-rate curves (and a preference run's rewards) from metrics.jsonl as
PNG files."""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.files import atomic_file
from mmloom.outputs import check_destination
from mmloom.training.metrics import read_metrics
from mmloom.training.run_folder import METRICS

SOFTWARE = "mmloom plot"  # the PNG `Software` text of the figures, by which a re-plot recognises them


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
# preference runs (`preference` section): rewards and log-probabilities of the chosen and rejected answers
PREFERENCE_FIGURES = [
    ("rewards.png", "reward (beta x log-ratio)", "preference rewards",
     [("rewards/chosen", "chosen", "-"), ("rewards/rejected", "rejected", "-"), ("rewards/margins", "margin", "--"),
      ("rewards/accuracies", "accuracy", ":"), ("eval_rewards/accuracies", "eval accuracy", "o:")]),
    ("logps.png", "log-probability (sum over the answer)", "preference log-probabilities",
     [("logps/chosen", "chosen", "-"), ("logps/rejected", "rejected", "-")]),
]


def figures(records: list[dict]) -> list[tuple[str, str, str, list[tuple[str, str, str]]]]:
    """The figures of a run's records: loss and lr (every part's lr recorded as `NAME_lr`), and with
    preference metrics the rewards and log-probabilities."""
    part_lrs = sorted({k for r in records for k in r if k.endswith("_lr") and k not in ("lr", "projector_lr")})
    out = [FIGURES[0], (*FIGURES[1][:3], [*FIGURES[1][3], *((k, k.replace("_", " "), "-") for k in part_lrs)])]
    if any("rewards/margins" in r for r in records):
        out += PREFERENCE_FIGURES
    return out


def is_plot(path: Path) -> bool:
    """Whether `path` is a PNG figure written by `mmloom plot`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def plot_metrics(model_dir: str | Path, out_dir: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write loss.png (train and eval loss) and lr.png (lr and each part's lr) into `out_dir` (default
    `model_dir`), with rewards.png and logps.png for a preference run, each atomically; returns the paths. Raises MmloomError when there are no metrics,
    and before writing anything when a figure's path holds a file other than an earlier `mmloom plot`
    figure, or one without `overwrite`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_dir = Path(model_dir)
    records = read_metrics(model_dir)
    if not records:
        raise MmloomError(f"no {METRICS} records in {model_dir}")
    out = Path(out_dir) if out_dir is not None else model_dir
    chosen = figures(records)
    for filename, *_ in chosen:
        check_destination(out / filename, "plot", overwrite=overwrite, kind="file", recognise=is_plot)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, ylabel, title, curves in chosen:
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
        with atomic_file(out / filename) as tmp:
            fig.savefig(tmp, dpi=100, format="png", metadata={"Software": SOFTWARE})
        plt.close(fig)
        written.append(out / filename)
    return written
