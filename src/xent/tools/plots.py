"""``xent plot``: the figures that explain the losses, drawn from xent's own numbers.

* ``neg_log.png``: the loss of one example, ``-log p`` of the probability given to the truth,
  with the seed texts' worked examples marked on the curve;
* ``coin_likelihood.png``: the likelihood of 60 heads in 100 flips as a function of
  ``θ = P(heads)``, and its maximum at 0.6 (where the cross-entropy is smallest);
* ``masking.png``: a batch's log-probability matrix with the entries the targets pick out
  highlighted, an ignored row greyed out, and their sum becoming the loss;
* ``label_smoothing.png``: what smoothing does to the target distribution, and to the loss and
  its optimum margin.
"""

from __future__ import annotations

import argparse
import os

import torch

import xent
from xent.tools._args import writable_folder
from xent.tools._measure import pyplot

FIGURES = ("neg_log.png", "coin_likelihood.png", "masking.png", "label_smoothing.png")


def plot_neg_log(path: str) -> None:
    plt = pyplot()
    p = torch.linspace(0.005, 1.0, 400, dtype=torch.float64)
    # -log p as the cross-entropy of a one-hot truth against (1 - p, p): xent's own number.
    loss = xent.binary_cross_entropy(p, torch.ones_like(p), reduction="none")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(p, loss, color="#4c72b0", lw=2, label="loss = -log p(truth)")
    examples = [  # (p, label, where the label goes relative to the point, in points)
        (0.4, "mastiff", (-60, 45)),
        (0.7, "credit card, customer 1", (-60, 75)),
        (0.78, "horse", (-20, 125)),
        (0.8, "credit card, customer 2", (15, 40)),
    ]
    for prob, label, offset in examples:
        value = xent.binary_cross_entropy(torch.tensor([prob]), torch.tensor([1.0])).item()
        ax.scatter([prob], [value], zorder=3, s=40)
        ax.annotate(
            f"{label}\np = {prob}, loss = {value:.4f}",
            (prob, value),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            arrowprops=dict(arrowstyle="-", color="grey", lw=0.8),
        )
    ax.set_xlabel("probability the model gives to the true class, p")
    ax.set_ylabel("cross-entropy of the example (nats)")
    ax.set_ylim(0, 5.5)
    ax.set_title("Cross-entropy punishes confident mistakes: -log p")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coin_likelihood(path: str) -> None:
    plt = pyplot()
    flips = torch.cat([torch.ones(60), torch.zeros(40)]).double()
    thetas = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)
    nll = torch.stack(
        [xent.binary_cross_entropy(t.expand(100), flips, reduction="sum") for t in thetas]
    )
    likelihood = (-nll).exp()
    best = thetas[nll.argmin()].item()
    fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(10, 4))
    ax_l.plot(thetas, likelihood, color="#55a868", lw=2)
    ax_l.axvline(best, color="k", ls="--", lw=1)
    ax_l.set_title(f"Likelihood of 60 heads in 100 flips (max at θ = {best:.2f})")
    ax_l.set_xlabel("θ = P(heads)")
    ax_l.set_ylabel("θ^60 (1-θ)^40")
    ax_n.plot(thetas, nll / 100, color="#c44e52", lw=2)
    ax_n.axvline(best, color="k", ls="--", lw=1)
    ax_n.set_title("…is the minimum of the mean binary cross-entropy")
    ax_n.set_xlabel("θ = P(heads)")
    ax_n.set_ylabel("binary_cross_entropy(θ, flips)")
    for ax in (ax_l, ax_n):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_masking(path: str) -> None:
    plt = pyplot()
    from matplotlib.patches import Rectangle

    gen = torch.Generator().manual_seed(3)
    logits = 1.5 * torch.randn(5, 6, generator=gen, dtype=torch.float64)
    target = torch.tensor([2, 0, -100, 5, 1])
    log_p = xent.log_softmax(logits, dim=1)
    loss = xent.cross_entropy(logits, target)
    per_row = xent.cross_entropy(logits, target, reduction="none")
    fig, ax = plt.subplots(figsize=(8, 4.4))
    im = ax.imshow(log_p, cmap="viridis", aspect="auto")
    for r in range(log_p.shape[0]):
        for c in range(log_p.shape[1]):
            ax.text(
                c,
                r,
                f"{log_p[r, c]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if log_p[r, c] < log_p.mean() else "black",
            )
        if target[r] == -100:
            ax.add_patch(Rectangle((-0.5, r - 0.5), 6, 1, color="grey", alpha=0.6))
            ax.text(5.6, r, "ignored", va="center", fontsize=8)
        else:
            ax.add_patch(Rectangle((target[r] - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
            ax.text(5.6, r, f"-log p = {per_row[r]:.3f}", va="center", fontsize=8)
    ax.set_xlabel("class")
    ax.set_ylabel("example (row)")
    ax.set_xticks(range(6))
    ax.set_title(
        "log-softmax of a batch; red: the entries the targets pick\n"
        f"loss = mean over the 4 counted rows = {loss.item():.4f}"
    )
    fig.colorbar(im, ax=ax, label="log p", pad=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_label_smoothing(path: str) -> None:
    plt = pyplot()
    classes = 5
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.25
    for i, eps in enumerate((0.0, 0.1, 0.3)):
        target = (1 - eps) * torch.nn.functional.one_hot(torch.tensor(1), classes).double()
        target = target + eps / classes
        ax_t.bar(torch.arange(classes) + (i - 1) * width, target, width, label=f"ε = {eps}")
    ax_t.set_xlabel("class (the truth is class 1)")
    ax_t.set_ylabel("target probability")
    ax_t.set_title("Label smoothing: (1 - ε)·one-hot + ε / C")
    ax_t.legend()
    margins = torch.linspace(-2, 10, 200, dtype=torch.float64)
    # Logits: the true class is `margin` above four others at 0.
    logits = torch.zeros(200, classes, dtype=torch.float64)
    logits[:, 1] = margins
    target = torch.ones(200, dtype=torch.long)
    for eps in (0.0, 0.1, 0.3):
        loss = xent.cross_entropy(logits, target, label_smoothing=eps, reduction="none")
        best = margins[loss.argmin()].item()
        ax_l.plot(
            margins,
            loss,
            lw=2,
            label=f"ε = {eps}" + (f", best margin {best:.2f}" if eps > 0 else ", no optimum"),
        )
    ax_l.set_xlabel("margin of the true logit over the others")
    ax_l.set_ylabel("cross-entropy")
    ax_l.set_title("Smoothing stops rewarding over-confidence")
    ax_l.legend()
    for ax in (ax_t, ax_l):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out_dir: str) -> list[str]:
    """Draw every figure into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    drawers = (plot_neg_log, plot_coin_likelihood, plot_masking, plot_label_smoothing)
    paths = []
    for name, draw in zip(FIGURES, drawers, strict=True):
        path = os.path.join(out_dir, name)
        draw(path)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="xent-figures", help="folder for the PNG files")


def run(args: argparse.Namespace) -> int:
    writable_folder("--out", args.out)
    for path in write_all(args.out):
        print(path)
    return 0
