"""``xent demo``: train a small word-level language model twice, with xent and with PyTorch.

The text is the Python standard library's own source code, which every Python installation
ships: split into words and symbols, its 32 768 most frequent tokens form the vocabulary (the
rest map to ``<unk>``). The model reads the previous few tokens (an embedding per position,
concatenated, then a hidden layer) and its output layer scores the whole vocabulary.

The model is trained twice from the same initial weights on the same batches: once with
``xent.linear_cross_entropy`` (the output layer and the loss fused, logits never stored), once
with ``F.linear`` followed by ``F.cross_entropy``. The demo reports both loss curves, whether they
agree, the tokens per second and the peak memory of each, and draws the curves.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import sysconfig
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import xent
from xent.tools._args import device as device_arg
from xent.tools._args import nonnegative_int, positive_float, positive_int, writable_folder
from xent.tools._measure import PeakMemory, pyplot

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|[^\sA-Za-z_0-9]")
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def stdlib_sources(root: str | None = None) -> list[str]:
    """The standard library's ``.py`` files in a fixed order (its test suites left out)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def build_corpus(vocab_size: int, max_files: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Token ids of the standard library's source, and the vocabulary (``0`` is ``<unk>``)."""
    tokens: list[str] = []
    for path in stdlib_sources()[:max_files]:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens += _TOKEN.findall(f.read())
    counts = collections.Counter(tokens)
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.long)
    return ids, vocab


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ContextModel(nn.Module):
    """Previous ``context`` tokens → hidden state ``(N, H)``; the output layer is separate."""

    def __init__(self, vocab: int, context: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.mix = nn.Linear(context * embed, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Parameter(torch.randn(vocab, hidden) / hidden**0.5)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.mix(self.embed(ctx).flatten(1))))


def fused_loss(model: ContextModel, ctx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return xent.linear_cross_entropy(model(ctx), model.head, target)


def eager_loss(model: ContextModel, ctx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(model(ctx), model.head), target)


# --------------------------------------------------------------------------------------------
# Training and measuring
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    peak_extra_bytes: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(
    name: str,
    model: ContextModel,
    loss_fn,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    progress=None,
    task=None,
) -> RunResult:
    """Adam on ``loss_fn`` over ``batches``; returns the per-step losses and measurements."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    result = RunResult(name)
    device = next(model.parameters()).device
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for ctx, target in batches:
            loss = loss_fn(model, ctx, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.losses.append(loss.item())
            result.tokens += target.numel()
            if progress is not None:
                progress.update(task, advance=1, description=f"{name}: loss {loss.item():.3f}")
        result.seconds = time.perf_counter() - start
    result.peak_extra_bytes = peak.value
    return result


def make_batches(
    ids: torch.Tensor, steps: int, batch: int, context: int, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    windows = torch.arange(context)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=gen)
        ctx = ids[starts[:, None] + windows]
        target = ids[starts + context]
        out.append((ctx.to(device), target.to(device)))
    return out


def plot_curves(results: list[RunResult], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {0: dict(lw=3, alpha=0.5), 1: dict(lw=1.2, ls="--")}
    for i, r in enumerate(results):
        ax.plot(
            range(1, len(r.losses) + 1),
            r.losses,
            label=(f"{r.name}: {r.tokens_per_second:,.0f} tokens/s"),
            **styles.get(i, {}),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("A word-level language model on the Python standard library's source")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizer steps per run")
    parser.add_argument("--batch", type=positive_int, default=1024, help="tokens per step")
    parser.add_argument("--vocab", type=positive_int, default=32768, help="vocabulary size")
    parser.add_argument(
        "--context", type=positive_int, default=4, help="previous tokens the model reads"
    )
    parser.add_argument("--embed", type=positive_int, default=64)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument(
        "--max-files",
        type=positive_int,
        default=None,
        help="read only this many standard-library files (quicker, smaller)",
    )
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--out", default="xent-demo", help="folder for the plot and results")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    writable_folder("--out", args.out)  # before training, not after
    console = Console()
    device = torch.device(args.device)
    ids, vocab = build_corpus(args.vocab, args.max_files)
    console.print(
        f"corpus: {ids.numel():,} tokens of Python standard-library source; "
        f"vocabulary {len(vocab):,} words ({(ids == 0).float().mean().item():.1%} <unk>)"
    )
    torch.manual_seed(args.seed)
    model = ContextModel(len(vocab), args.context, args.embed, args.hidden).to(device)
    batches = make_batches(ids, args.steps, args.batch, args.context, args.seed, device)
    runs = [
        ("xent.linear_cross_entropy", fused_loss),
        ("F.linear + F.cross_entropy", eager_loss),
    ]
    results = []
    with Progress(console=console, transient=True) as progress:
        for name, loss_fn in runs:
            task = progress.add_task(name, total=args.steps)
            results.append(
                train(name, copy.deepcopy(model), loss_fn, batches, args.lr, progress, task)
            )
    ours, theirs = results
    every = max(1, args.steps // 8)
    table = Table(title="training loss")
    table.add_column("step", justify="right")
    for r in results:
        table.add_column(r.name, justify="right")
    for step in [*range(0, args.steps, every), args.steps - 1]:
        table.add_row(str(step + 1), *(f"{r.losses[step]:.4f}" for r in results))
    console.print(table)
    summary = Table(title="speed and memory")
    for col in ("", "tokens/s", "peak extra memory"):
        summary.add_column(col, justify="right")
    for r in results:
        mem = "?" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:,.0f} MiB"
        summary.add_row(r.name, f"{r.tokens_per_second:,.0f}", mem)
    console.print(summary)
    gap = max(abs(a - b) for a, b in zip(ours.losses, theirs.losses, strict=True))
    agree = gap <= 1e-3 * max(1.0, max(ours.losses))
    console.print(
        f"largest difference between the two loss curves: {gap:.2e} -> "
        + ("[green]they agree[/green]" if agree else "[red]they DISAGREE[/red]")
    )
    console.print(
        f"loss fell from {ours.losses[0]:.3f} to {ours.losses[-1]:.3f}; xent ran at "
        f"{ours.tokens_per_second / theirs.tokens_per_second:.2f}x the speed of torch"
    )
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "loss_curves.png")
    plot_curves(results, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([r.__dict__ | {"tokens_per_second": r.tokens_per_second} for r in results], f)
    console.print(f"loss curves drawn to {png}")
    return 0 if agree else 1
