"""Train a small classifier twice, with xent.cross_entropy and with torch's, and compare.

Both runs start from the same weights and see the same batches, so their losses must agree to
float rounding at every step. Run: ``python examples/train_classifier.py``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import xent


def make_data(n: int, classes: int, dim: int, gen: torch.Generator):
    """Gaussian blobs: one centre per class, unit noise around it."""
    centres = 3 * torch.randn(classes, dim, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen), labels


def train(model: nn.Module, loss_fn, data, labels, steps: int, batch: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        loss = loss_fn(model(data[idx]), labels[idx], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 200, batch: int = 256) -> None:
    gen = torch.Generator().manual_seed(0)
    data, labels = make_data(8192, classes=10, dim=32, gen=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 10))
    ours = train(copy.deepcopy(model), xent.cross_entropy, data, labels, steps, batch)
    theirs = train(copy.deepcopy(model), F.cross_entropy, data, labels, steps, batch)
    print(f"{'step':>5}  {'xent.cross_entropy':>18}  {'F.cross_entropy':>15}")
    for step in [*range(0, steps, steps // 10), steps - 1]:
        print(f"{step:>5}  {ours[step]:>18.6f}  {theirs[step]:>15.6f}")
    gap = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"largest difference between the two loss curves: {gap:.2e}")
    if not ours[-1] < 0.5 * ours[0] or gap > 1e-3:
        raise SystemExit("the loss did not fall, or the two curves disagree")


if __name__ == "__main__":
    main()
