"""The torch device a command runs on, checked before anything is loaded onto it, and its CPU threads."""

from __future__ import annotations

from mmloom.errors import MmloomError


def resolve_device(device: str | None = None, what: str = "--device"):
    """The `torch.device` named by `device` (`cpu`, `cuda`, `cuda:1`, `mps`, ...); None gives
    `cuda` when a CUDA device is visible, else `cpu`.

    Raises `MmloomError` (one line naming `what`, the setting the value came from) when the name
    is not a torch device, or names a device this machine or this torch build does not have
    (`cuda` on a CPU-only build or without a visible GPU, `cuda:N` beyond the visible GPUs,
    `mps` without Apple's Metal backend).
    """
    import torch

    if device is None or str(device).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise MmloomError(f"{what} {device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise MmloomError(f"{what} {device}: this torch build ({torch.__version__}) has no CUDA support; "
                              "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise MmloomError(f"{what} {device}: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and "
                              "the driver); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise MmloomError(f"{what} {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MmloomError(f"{what} {device}: the MPS (Apple Metal) backend is not available here")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise MmloomError(f"{what} {device}: mmloom runs on cpu, cuda or mps devices")
    return dev


def set_cpu_threads(num_threads: int | None, num_interop_threads: int | None = None,
                    what: tuple[str, str] = ("--threads", "--interop-threads")) -> None:
    """Set torch's intra-op and inter-op CPU thread counts of this process (None: leave torch's).
    Inter-op threads can be set once per process, before any parallel work: a later different value
    raises MmloomError naming `what[1]`, the setting it came from."""
    import torch

    if num_threads is not None and num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
    if num_interop_threads is not None and num_interop_threads != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(num_interop_threads)
        except RuntimeError:
            raise MmloomError(
                f"{what[1]} {num_interop_threads}: this process already runs with "
                f"{torch.get_num_interop_threads()} inter-op threads (torch sets them once per process)"
            ) from None
