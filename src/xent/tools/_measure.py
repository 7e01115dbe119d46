"""What the command-line tools share: peak-memory measurement and the matplotlib set-up."""

from __future__ import annotations

import gc
import os

import torch


def status_kib(field_name: str) -> int:
    """A ``kB`` field of Linux's ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(field_name)


class PeakMemory:
    """Peak memory above the starting point, in bytes (``value``; None where unmeasurable).

    CUDA: the caching allocator's peak statistics. CPU: Linux's peak resident size ``VmHWM``,
    reset to the current size on entry by writing 5 to ``/proc/self/clear_refs``. For resident
    memory to follow the live tensors, run the measured code in a process started with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns freed blocks at once).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.value: int | None = None
        self.base: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.value = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.value = status_kib("VmHWM") * 1024 - self.base


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "xent: drawing figures needs matplotlib: pip install 'xent[tools]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
