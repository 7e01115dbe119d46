"""``xent bench``: time and memory of xent against its peers, measured in one run.

Every case builds its inputs once and offers several *variants* (xent and the peers) of the same
computation. Timings are taken with the variants interleaved, repetition by repetition, after a
warm-up, so that a machine that slows down or speeds up during the run affects all of them alike;
the table reports the minimum and the median of forward, backward and forward+backward. Peak
memory is measured for each variant in a fresh subprocess, so that one variant's cached memory
can never be charged to another. ``torch.compile`` variants are compiled during the warm-up and
their compile time is reported separately.

On CUDA, time comes from CUDA events and memory from ``torch.cuda.max_memory_allocated``; on the
CPU, from ``time.perf_counter`` and the process's peak resident memory (Linux's ``VmHWM``, reset
before the measured call).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import xent
from xent.tools._args import (
    UsageError,
    fraction,
    nonnegative_int,
    positive_int,
    writable_file,
)
from xent.tools._args import device as _device_type
from xent.tools._measure import PeakMemory, pyplot

Step = Callable[[], torch.Tensor]


@dataclass
class Config:
    """Everything that defines one benchmark run (shared by the parent and its subprocesses)."""

    case: str = "ce"
    n: int = 4096
    c: int = 32000
    h: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    reduction: str = "mean"
    ignore_frac: float = 0.0
    variants: list[str] = field(default_factory=list)
    repeat: int = 10
    warmup: int = 2
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Cases: inputs and variants
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A computation, its inputs, and the variants that perform it."""

    inputs: dict[str, torch.Tensor]
    variants: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]
    params: list[str]  # names of the inputs whose gradients backward computes
    bytes_moved: int  # minimum bytes a forward+backward must read and write (for bandwidth)
    flops: int = 0


def _targets(cfg: Config, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    target = torch.randint(0, num_classes, (cfg.n,), generator=gen)
    if cfg.ignore_frac > 0:
        drop = torch.rand(cfg.n, generator=gen) < cfg.ignore_frac
        target[drop] = -100
    return target.to(cfg.device)


def _ce_case(cfg: Config) -> Case:
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.n, cfg.c, generator=gen).to(device=cfg.device, dtype=dtype)
    x.requires_grad_(True)
    target = _targets(cfg, cfg.c, gen)
    red = cfg.reduction

    def compiled(inp):
        return _compiled(F.cross_entropy)(inp["x"], inp["target"], reduction=red)

    variants = {
        "xent": lambda inp: xent.cross_entropy(inp["x"], inp["target"], reduction=red),
        "xent[torch]": lambda inp: xent.cross_entropy(
            inp["x"], inp["target"], reduction=red, impl="torch"
        ),
        "torch": lambda inp: F.cross_entropy(inp["x"], inp["target"], reduction=red),
        "torch.compile": compiled,
        "liger": lambda inp: _liger().liger_cross_entropy(inp["x"], inp["target"], reduction=red),
    }
    # Reads the logits once and writes their gradient once.
    moved = 2 * x.numel() * x.element_size()
    return Case({"x": x, "target": target}, variants, ["x"], moved)


def _liger():
    """Liger-Kernel's functional API (a peer measured on CUDA; imported only when asked for)."""
    from liger_kernel.transformers import functional

    return functional


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _lce_case(cfg: Config) -> Case:
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.n, cfg.h, generator=gen).to(device=cfg.device, dtype=dtype)
    w = (torch.randn(cfg.c, cfg.h, generator=gen) / cfg.h**0.5).to(device=cfg.device, dtype=dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    target = _targets(cfg, cfg.c, gen)
    red = cfg.reduction

    def eager(inp):
        return F.cross_entropy(F.linear(inp["x"], inp["w"]), inp["target"], reduction=red)

    def torch_chunked(inp):
        return F.linear_cross_entropy(
            inp["x"],
            inp["w"],
            inp["target"],
            reduction=red,
            ignore_index=-100,
            options=torch.nn.LinearCrossEntropyOptions(),
        )

    def cce(inp):
        # cut-cross-entropy's exact mode (no gradient filtering), labels ignored at -100: its
        # "cce_exact" implementation where it has one, else (25.1.1) "cce" with no filter.
        from cut_cross_entropy import LinearCrossEntropyImpl
        from cut_cross_entropy import linear_cross_entropy as cce_lce

        if "CCE_EXACT" in LinearCrossEntropyImpl.__members__:
            kw = {"impl": "cce_exact"}
        else:
            kw = {"impl": "cce", "filter_eps": None}
        return cce_lce(inp["x"], inp["w"], inp["target"], reduction=red, **kw)

    variants = {
        "xent": lambda inp: xent.linear_cross_entropy(
            inp["x"], inp["w"], inp["target"], reduction=red
        ),
        "liger": lambda inp: _liger().liger_fused_linear_cross_entropy(
            inp["x"], inp["w"], inp["target"], reduction=red
        ),
        "cce": cce,
        "torch": eager,
        "torch.compile": lambda inp: _compiled(eager)(inp),
        "torch.chunked": torch_chunked,
    }
    flops = 6 * int((target != -100).sum()) * cfg.h * cfg.c
    moved = 2 * (x.numel() + w.numel()) * x.element_size()
    return Case({"x": x, "w": w, "target": target}, variants, ["x", "w"], moved, flops)


def _trl_kernels():
    """TRL's chunked post-training functions (a peer; imported only when asked for).

    ``ChunkedLogProbFunction`` is exported by ``trl.kernels``; ``ChunkedDivergenceFunction``
    lives in TRL's module ``trl.kernels.chunked_divergence`` (used by its distillation trainer)
    and is called here as that trainer calls it."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction, ChunkedDivergenceFunction


def _head_inputs(cfg: Config, gen: torch.Generator, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = getattr(torch, cfg.dtype)
    x = torch.randn(cfg.n, h, generator=gen).to(device=cfg.device, dtype=dtype)
    w = (torch.randn(cfg.c, h, generator=gen) / h**0.5).to(device=cfg.device, dtype=dtype)
    return x, w


def _logprobs_case(cfg: Config) -> Case:
    """A GRPO-style on-policy step: per-token log-probabilities and entropies of a sampled
    completion in the loss ``-mean(r·A) - 0.01·mean(H)``, ``r = exp(log p - log p.detach())``
    (1 in value; its gradient is ``A ∂log p``), the mean over the tokens that count.

    ``xent`` is the fused :func:`xent.linear_policy_loss` (gradients formed in the forward
    pass); ``xent log_probs`` computes the loss from :func:`xent.linear_log_probs`'s outputs."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x, w = _head_inputs(cfg, gen, cfg.h)
    x.requires_grad_(True)
    w.requires_grad_(True)
    target = _targets(cfg, cfg.c, gen)
    adv = torch.randn(cfg.n, generator=gen).to(cfg.device)
    mask = (target != -100).float()
    count = mask.sum().clamp(min=1)
    beta = 0.01

    def loss(lp, ent):
        ratio = torch.exp(lp - lp.detach())
        return -(adv * ratio * mask).sum() / count - beta * (ent * mask).sum() / count

    def eager(inp):
        log_p = F.log_softmax(F.linear(inp["x"], inp["w"]).float(), dim=-1)
        lp = log_p.gather(-1, inp["target"].clamp(min=0)[:, None])[:, 0]
        return loss(lp, -(log_p.exp() * log_p).sum(-1))

    def ours(inp):
        return xent.linear_policy_loss(inp["x"], inp["w"], inp["target"], adv, entropy_coef=beta)

    def ours_log_probs(inp):
        out = xent.linear_log_probs(inp["x"], inp["w"], inp["target"], return_entropy=True)
        return loss(out.log_probs, out.entropy)

    def trl(inp):
        chunked, _ = _trl_kernels()
        lp, ent, *_ = chunked.apply(
            inp["x"], inp["w"], None, inp["target"].clamp(min=0), 1.0, 32768, None, 1.0,
            ("entropy",),
        )  # fmt: skip
        return loss(lp, ent)

    variants = {
        "xent": ours,
        "xent log_probs": ours_log_probs,
        "torch": eager,
        "torch.compile": lambda inp: _compiled(eager)(inp),
        "trl": trl,
    }
    # The fused loss: forward logits, ∂input and ∂weight, all in the forward pass (the
    # log_probs variant and TRL form the logits again in backward: 8·N·H·V).
    flops = 6 * int(mask.sum()) * cfg.h * cfg.c
    moved = 2 * (x.numel() + w.numel()) * x.element_size()
    return Case({"x": x, "w": w, "target": target}, variants, ["x", "w"], moved, flops)


def _distill_case(cfg: Config) -> Case:
    """Distillation from hidden states: the generalised Jensen–Shannon divergence (β = 1/2)
    between a student head and a teacher head of the same size, mean over tokens."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x, w = _head_inputs(cfg, gen, cfg.h)
    tx, tw = _head_inputs(cfg, gen, cfg.h)
    x.requires_grad_(True)
    w.requires_grad_(True)
    target = _targets(cfg, cfg.c, gen)
    mask = (target != -100).float()
    count = mask.sum().clamp(min=1)
    beta = 0.5

    def eager(inp):
        ls = F.log_softmax(F.linear(inp["x"], inp["w"]).float(), dim=-1)
        with torch.no_grad():
            lt = F.log_softmax(F.linear(inp["tx"], inp["tw"]).float(), dim=-1)
        lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
        per = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
        return (per * mask).sum() / count

    def ours(inp):
        return xent.linear_distill_divergence(
            inp["x"], inp["w"], inp["target"], teacher_hidden=inp["tx"], teacher_weight=inp["tw"],
            beta=beta,
        )  # fmt: skip

    def trl(inp):
        _, chunked = _trl_kernels()
        per, _ = chunked.apply(
            inp["x"], inp["w"], None, inp["tx"], inp["tw"], None, beta, 1.0, 1.0, None, 1.0, None
        )
        return (per * mask).sum() / count

    variants = {
        "xent": ours,
        "torch": eager,
        "torch.compile": lambda inp: _compiled(eager)(inp),
        "trl": trl,
    }
    # Student and teacher logits, ∂input and ∂weight (xent's scalar loss needs no recompute).
    flops = 8 * int(mask.sum()) * cfg.h * cfg.c
    moved = 2 * (x.numel() + w.numel()) * x.element_size()
    inputs = {"x": x, "w": w, "tx": tx, "tw": tw, "target": target}
    return Case(inputs, variants, ["x", "w"], moved, flops)


CASES: dict[str, Callable[[Config], Case]] = {
    "ce": _ce_case,
    "lce": _lce_case,
    "logprobs": _logprobs_case,
    "distill": _distill_case,
}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


class _Clock:
    """Wall time on the CPU; CUDA events (no host sync between the two halves) on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def _zero_grads(case: Case) -> None:
    for name in case.params:
        case.inputs[name].grad = None


def _run_once(case: Case, variant: str, clock: _Clock) -> tuple[float, float]:
    _zero_grads(case)
    t0 = clock.mark()
    loss = case.variants[variant](case.inputs)
    t1 = clock.mark()
    loss.backward()
    t2 = clock.mark()
    return clock.seconds(t0, t1), clock.seconds(t1, t2)


def measure_times(cfg: Config, progress: Callable[[], None] | None = None) -> dict[str, dict]:
    """Interleaved timings of every variant: ``{variant: {"forward": [...], ...}}``."""
    torch.manual_seed(cfg.seed)
    case = CASES[cfg.case](cfg)
    clock = _Clock(cfg.device)
    results: dict[str, dict] = {}
    for variant in cfg.variants:
        t0 = time.perf_counter()
        _run_once(case, variant, clock)  # the first call compiles (torch.compile variants)
        first = time.perf_counter() - t0
        for _ in range(max(cfg.warmup - 1, 0)):
            _run_once(case, variant, clock)
        results[variant] = {"forward": [], "backward": [], "total": [], "first_call_s": first}
        if progress:
            progress()
    for _ in range(cfg.repeat):
        for variant in cfg.variants:
            fwd, bwd = _run_once(case, variant, clock)
            results[variant]["forward"].append(fwd)
            results[variant]["backward"].append(bwd)
            results[variant]["total"].append(fwd + bwd)
            if progress:
                progress()
    _zero_grads(case)
    results["_case"] = {"bytes_moved": case.bytes_moved, "flops": case.flops}
    return results


def measure_peak_memory(cfg: Config, variant: str) -> int:
    """Peak memory (bytes) one forward+backward of ``variant`` adds on top of its inputs.

    Runs in the calling process: ``xent bench`` calls it in a fresh subprocess per variant.
    """
    case = CASES[cfg.case](cfg)
    clock = _Clock(cfg.device)
    for _ in range(max(cfg.warmup, 1)):
        _run_once(case, variant, clock)
    _zero_grads(case)
    with PeakMemory(cfg.device) as peak:
        _run_once(case, variant, clock)
    if peak.value is None:
        raise OSError("peak memory is measured from CUDA statistics or Linux's /proc/self/status")
    return peak.value


def _memory_in_subprocess(cfg: Config, variant: str) -> int | None:
    spec = json.dumps({**dataclasses.asdict(cfg), "variants": [variant]})
    proc = subprocess.run(
        [sys.executable, "-m", "xent.tools.bench", spec],
        capture_output=True,
        text=True,
        # A fixed mmap threshold makes glibc return every freed block of 64 KiB or more to the
        # system at once, so resident memory follows the live tensors (with glibc's default,
        # freed blocks up to 32 MiB are kept for reuse and would hide in the baseline).
        env={**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    if proc.returncode != 0:
        sys.stderr.write(f"memory probe for {variant} failed:\n{proc.stderr[-2000:]}\n")
        return None
    return int(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def summarise(cfg: Config, times: dict[str, dict], memory: dict[str, int | None]) -> list[dict]:
    """One row per variant with min/median times, ratios to xent, and peak memory."""
    case_info = times["_case"]
    rows = []
    ref = times.get("xent")
    for variant in cfg.variants:
        t = times[variant]
        row = {
            "case": cfg.case,
            "variant": variant,
            "device": _device_name(cfg.device),
            "shape": _shape(cfg),
            "dtype": cfg.dtype,
            "reduction": cfg.reduction,
            "first_call_s": t["first_call_s"],
            "peak_extra_bytes": memory.get(variant),
        }
        for part in ("forward", "backward", "total"):
            row[f"{part}_min_s"] = min(t[part])
            row[f"{part}_median_s"] = statistics.median(t[part])
        if ref is not None:
            row["speedup_of_xent"] = statistics.median(t["total"]) / statistics.median(ref["total"])
        best = row["total_min_s"]
        row["bandwidth_gbs"] = case_info["bytes_moved"] / best / 1e9 if best else None
        if case_info["flops"]:
            row["tflops"] = case_info["flops"] / best / 1e12
        rows.append(row)
    if memory.get("xent"):
        for row in rows:
            if row["peak_extra_bytes"]:
                row["memory_ratio_xent"] = memory["xent"] / row["peak_extra_bytes"]
    return rows


def _shape(cfg: Config) -> str:
    if cfg.case == "ce":
        return f"N={cfg.n} C={cfg.c}"
    return f"N={cfg.n} H={cfg.h} V={cfg.c}"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"xent bench {rows[0]['case']}: {rows[0]['shape']} {rows[0]['dtype']} " + (
        f"{rows[0]['reduction']} on {rows[0]['device']}"
    )
    table = Table(title=title)
    for col in (
        "variant",
        "fwd ms (median)",
        "bwd ms (median)",
        "fwd+bwd ms (min)",
        "fwd+bwd ms (median)",
        "xent speed-up",
        "peak extra MiB",
        "first call s",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        mem = r["peak_extra_bytes"]
        table.add_row(
            r["variant"],
            f"{r['forward_median_s'] * 1e3:.1f}",
            f"{r['backward_median_s'] * 1e3:.1f}",
            f"{r['total_min_s'] * 1e3:.1f}",
            f"{r['total_median_s'] * 1e3:.1f}",
            f"{r['speedup_of_xent']:.2f}x" if "speedup_of_xent" in r else "",
            "?" if mem is None else f"{mem / 2**20:.0f}",
            f"{r['first_call_s']:.1f}",
        )
    console = Console()
    if not console.is_terminal:  # piped or redirected: wide enough for every column
        console = Console(width=120)
    console.print(table)


def write_outputs(rows: list[dict], json_path: str | None, csv_path: str | None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    if csv_path:
        import csv

        keys = sorted({k for r in rows for k in r})
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot()

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["variant"] for r in rows]
    fwd = [r["forward_median_s"] * 1e3 for r in rows]
    bwd = [r["backward_median_s"] * 1e3 for r in rows]
    ax_t.barh(names, fwd, label="forward", color="#4c72b0")
    ax_t.barh(names, bwd, left=fwd, label="backward", color="#dd8452")
    ax_t.set_xlabel("median time (ms), lower is better")
    ax_t.invert_yaxis()
    ax_t.legend(loc="lower right")
    mem = [(r["peak_extra_bytes"] or 0) / 2**20 for r in rows]
    ax_m.barh(names, mem, color="#55a868")
    ax_m.set_xlabel("peak extra memory (MiB), lower is better")
    ax_m.invert_yaxis()
    r0 = rows[0]
    fig.suptitle(f"xent bench {r0['case']}: {r0['shape']} {r0['dtype']} on {r0['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# TRL's chunked functions join the post-training cases wherever TRL is installed.
_TRL = ["trl"] if importlib.util.find_spec("trl") is not None else []
DEFAULT_VARIANTS = {
    "ce": ["xent", "torch", "torch.compile"],
    "lce": ["xent", "torch", "torch.compile", "torch.chunked"],
    "logprobs": ["xent", "xent log_probs", "torch", "torch.compile", *_TRL],
    "distill": ["xent", "torch", "torch.compile", *_TRL],
}
# On CUDA the peers that only run there join, and xent's torch kernel is shown beside Triton's.
CUDA_VARIANTS = {
    "ce": ["xent", "xent[torch]", "torch", "torch.compile", "liger"],
    "lce": ["xent", "torch", "torch.compile", "torch.chunked", "liger", "cce"],
    "logprobs": ["xent", "xent log_probs", "torch", "torch.compile", *_TRL],
    "distill": ["xent", "torch", "torch.compile", *_TRL],
}

# Every variant a case defines (some run only on CUDA or with an optional package).
VARIANTS = {
    case: sorted(
        {
            *DEFAULT_VARIANTS[case],
            *CUDA_VARIANTS[case],
            *(["trl"] if case in ("logprobs", "distill") else []),
        }
    )
    for case in DEFAULT_VARIANTS
}


def _device(text: str) -> str:
    """A device this machine has, kept as its text (the measurements take strings)."""
    _device_type(text)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "case", nargs="?", default="ce", help="what to measure: " + ", ".join(sorted(CASES))
    )
    parser.add_argument("-n", "--n", type=positive_int, default=4096, help="rows (tokens)")
    parser.add_argument(
        "-c",
        "--classes",
        "--vocab",
        dest="c",
        type=positive_int,
        default=32000,
        help="classes (vocabulary size)",
    )
    parser.add_argument(
        "--hidden", dest="h", type=positive_int, default=512, help="hidden size (lce)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"]
    )
    parser.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"])
    parser.add_argument(
        "--ignore-frac", type=fraction, default=0.0, help="fraction of targets set to ignore_index"
    )
    parser.add_argument("--variants", help="comma-separated subset of the case's variants")
    parser.add_argument("--repeat", type=positive_int, default=10)
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--csv", help="write the results to this CSV file")
    parser.add_argument("--plot", help="draw time and memory to this PNG file")


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    if args.case not in CASES:
        raise SystemExit(f"unknown case {args.case!r}; choose one of {', '.join(sorted(CASES))}")
    defaults = CUDA_VARIANTS if args.device.startswith("cuda") else DEFAULT_VARIANTS
    variants = args.variants.split(",") if args.variants else defaults[args.case]
    unknown = [v for v in variants if v not in VARIANTS[args.case]]
    if unknown:
        raise UsageError(
            f"--variants: unknown variant {unknown[0]!r} for {args.case}; choose from "
            + ", ".join(VARIANTS[args.case])
        )
    for option, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        writable_file(option, path)
    cfg = Config(
        args.case,
        args.n,
        args.c,
        args.h,
        args.dtype,
        args.device,
        args.reduction,
        args.ignore_frac,
        variants,
        args.repeat,
        args.warmup,
    )
    steps = len(variants) * (cfg.repeat + 1 + (0 if args.no_memory else 1))
    memory: dict[str, int | None] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"xent bench {cfg.case}", total=steps)
        times = measure_times(cfg, lambda: progress.advance(task))
        if not args.no_memory:
            for variant in variants:
                memory[variant] = _memory_in_subprocess(cfg, variant)
                progress.advance(task)
    rows = summarise(cfg, times, memory)
    print_table(rows)
    write_outputs(rows, args.json, args.csv)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":  # the memory probe: `python -m xent.tools.bench '{"case": ...}'`
    probe = Config(**json.loads(sys.argv[1]))
    print(measure_peak_memory(probe, probe.variants[0]))
