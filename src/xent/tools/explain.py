"""``xent explain``: every step of a loss, for the seed texts' examples or your own numbers.

Cross-entropy on logits ``x`` with target ``y`` is a short pipeline, and each stage is shown:

1. subtract the row max (``x - max x``: nothing can overflow),
2. exponentiate, 3. normalise (softmax), 4. take the log (log-softmax),
5. pick the target entries (the mask), weighted and smoothed, 6. per-row loss,
7. reduce (``mean`` divides by the summed weights of the rows that count),
8. the gradient with respect to the logits (``softmax - onehot``, scaled by the reduction).

Every number is computed by xent's own functions; the tables are plain text when piped.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

import xent
from xent.reference import cross_entropy_reference
from xent.tools._args import fraction

Steps = dict[str, Any]


def _tolist(t: torch.Tensor) -> Any:
    return t.detach().to(torch.float64).tolist() if t.is_floating_point() else t.tolist()


# --------------------------------------------------------------------------------------------
# The computations
# --------------------------------------------------------------------------------------------


def explain_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Steps:
    """The stages of ``xent.cross_entropy(logits, target, ...)`` for ``(N, C)`` logits.

    ``target`` holds class indices ``(N)`` or probabilities ``(N, C)``. Returns a dict of named
    stages (tensors) in float64, ending with ``loss`` and ``gradient``.
    """
    x = logits.to(torch.float64).detach().requires_grad_()
    eps = label_smoothing
    # The library's own numbers first: this also validates the target (range, shape).
    per_row = xent.cross_entropy(
        x, target, weight, ignore_index=ignore_index, label_smoothing=eps, reduction="none"
    )
    loss = xent.cross_entropy(
        x, target, weight, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction
    )
    # The same loss by its plain-PyTorch definition, materialised (xent.reference): the kernel
    # and the definition side by side.
    definition = cross_entropy_reference(
        x.detach(), target, weight, ignore_index, reduction, label_smoothing=eps
    )
    probs_target = target.dim() == 2
    num_classes = x.shape[1]
    shifted = x - x.amax(dim=1, keepdim=True)
    exps = shifted.exp()
    softmax = xent.softmax(x, dim=1)
    log_softmax = xent.log_softmax(x, dim=1)
    w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    if probs_target:
        q = target.to(torch.float64)
        mask = (1 - eps) * q + eps / num_classes
        counted = torch.ones(x.shape[0], dtype=torch.bool)
    else:
        counted = target != ignore_index
        one_hot = torch.zeros_like(x).scatter(
            1, torch.where(counted, target, 0)[:, None].long(), 1.0
        )
        mask = ((1 - eps) * one_hot + eps / num_classes) * counted[:, None]
    weighted_mask = mask * w
    (gradient,) = torch.autograd.grad(loss.sum(), x)
    if probs_target or reduction != "mean":
        denominator = torch.tensor(float(x.shape[0]) if reduction == "mean" else 1.0)
    else:
        safe = torch.where(counted, target, 0).long()
        denominator = (w[safe] * counted).sum()
    return {
        "logits": x.detach(),
        "max subtracted": shifted.detach(),
        "exponentials": exps.detach(),
        "softmax": softmax.detach(),
        "log-softmax": log_softmax.detach(),
        "mask (target weights)": weighted_mask,
        "per-row loss": per_row.detach(),
        "reduction": reduction,
        "denominator": denominator,
        "loss": loss.detach(),
        "loss by definition (xent.reference)": definition,
        "gradient": gradient,
    }


def explain_binary(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> Steps:
    """The stages of ``xent.binary_cross_entropy_with_logits`` (the sigmoid case)."""
    z = logits.to(torch.float64).detach().requires_grad_()
    y = target.to(torch.float64)
    p = torch.sigmoid(z.detach())
    per_elem = xent.binary_cross_entropy_with_logits(z, y, weight, reduction="none")
    loss = xent.binary_cross_entropy_with_logits(z, y, weight, reduction=reduction)
    (gradient,) = torch.autograd.grad(loss.sum(), z)
    return {
        "logits": z.detach(),
        "sigmoid p": p,
        "target y": y,
        "-(y log p + (1-y) log(1-p))": per_elem.detach(),
        "reduction": reduction,
        "loss": loss.detach(),
        "gradient": gradient,
    }


def seed_examples() -> list[tuple[str, str, Steps]]:
    """The worked examples of the texts xent grew from, each recomputed by xent."""
    examples = []
    p = torch.tensor([0.7, 0.2], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    per = xent.binary_cross_entropy(p, y, reduction="none")
    examples.append(
        (
            "Credit card: two customers, P(default) = 0.7 (defaulted) and 0.2 (did not)",
            "log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]]) = binary_cross_entropy([0.7, 0.2], [1, 0])",
            {
                "P(default)": p,
                "defaulted": y,
                "-(y log p + (1-y) log(1-p))": per,
                "binary_cross_entropy (mean)": xent.binary_cross_entropy(p, y),
                "log_loss": torch.tensor(
                    xent.log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]]), dtype=torch.float64
                ),
            },
        )
    )
    mastiff = explain_cross_entropy(
        torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64).log(), torch.tensor([1])
    )
    examples.append(
        (
            "Mastiff: predicted (cat, dog, horse) = (0.4, 0.4, 0.2); it is a dog",
            "cross_entropy(log([0.4, 0.4, 0.2]), 1) = -log 0.4",
            mastiff,
        )
    )
    horse_p = torch.tensor([[0.1, 0.12, 0.78]], dtype=torch.float64)
    horse = explain_cross_entropy(horse_p.log(), torch.tensor([2]))
    one_hot = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    horse["KL(one-hot || p)"] = xent.kl_div(horse_p.log(), one_hot, reduction="sum")
    horse["entropy of one-hot"] = xent.entropy(one_hot)
    examples.append(
        (
            "Horse: predicted (0.1, 0.12, 0.78); it is a horse",
            "cross_entropy = -log 0.78; KL from the one-hot truth is the same (its entropy is 0)",
            horse,
        )
    )
    examples.append(
        (
            "Softmax of [1, 2, 3]",
            "exp(x - max) / sum",
            {
                "x": torch.tensor([1.0, 2.0, 3.0]),
                "softmax": xent.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0),
            },
        )
    )
    thetas = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)[1:-1]
    flips = torch.cat([torch.ones(60), torch.zeros(40)]).double()
    nll = torch.stack(
        [xent.binary_cross_entropy(t.expand(100), flips, reduction="sum") for t in thetas]
    )
    examples.append(
        (
            "Coin: 60 heads in 100 flips; which θ = P(heads) makes them most likely?",
            "likelihood θ^60 (1-θ)^40 = exp(-Σ BCE(θ, flips)); its maximum is at θ = 0.6",
            {
                "θ": thetas,
                "negative log-likelihood": nll,
                "likelihood": (-nll).exp(),
                "most likely θ": thetas[nll.argmin()],
            },
        )
    )
    p_dist = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q_dist = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    cross = xent.cross_entropy(q_dist.log(), p_dist)
    ent = xent.entropy(p_dist)
    examples.append(
        (
            "KL divergence = cross-entropy - entropy, for p = (0.5, 0.3, 0.2), q = (0.2, 0.5, 0.3)",
            "KL(p || q) = H(p, q) - H(p)",
            {
                "H(p, q)": cross,
                "H(p)": ent,
                "H(p, q) - H(p)": cross - ent,
                "KL(p || q)": xent.kl_div(q_dist.log(), p_dist, reduction="sum"),
            },
        )
    )
    return examples


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.6f}" if abs(v) < 1e5 else f"{v:.4g}"


def render(title: str, subtitle: str, steps: Steps, console) -> None:
    """Print one explanation: a table per matrix, a line per vector or number."""
    from rich.panel import Panel
    from rich.table import Table

    console.print(Panel(f"[bold]{title}[/bold]\n{subtitle}", expand=False))
    for name, value in steps.items():
        if isinstance(value, str):
            console.print(f"  [cyan]{name}[/cyan]: {value}")
            continue
        t = value.detach().to(torch.float64) if value.is_floating_point() else value
        if t.dim() == 2 and t.numel() > 1:
            table = Table(title=name, title_justify="left", show_edge=False)
            table.add_column("row", justify="right", style="dim")
            for c in range(t.shape[1]):
                table.add_column(f"c{c}", justify="right")
            for r in range(t.shape[0]):
                table.add_row(str(r), *(_fmt(float(v)) for v in t[r]))
            console.print(table)
        elif t.dim() == 1:
            console.print(f"  [cyan]{name}[/cyan]: [" + ", ".join(_fmt(float(v)) for v in t) + "]")
        else:
            console.print(f"  [cyan]{name}[/cyan]: [bold]{_fmt(float(t))}[/bold]")
    console.print()


def to_json(examples: list[tuple[str, str, Steps]]) -> str:
    out = []
    for title, subtitle, steps in examples:
        out.append(
            {
                "title": title,
                "subtitle": subtitle,
                "steps": {k: v if isinstance(v, str) else _tolist(v) for k, v in steps.items()},
            }
        )
    return json.dumps(out, indent=2)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--logits", help="JSON list (one row) or list of rows, e.g. '[[1, 2, 3]]'")
    parser.add_argument("--probs", help="predicted probabilities instead of logits (log is taken)")
    parser.add_argument("--target", help="class indices, e.g. '[2]', or probability rows")
    parser.add_argument(
        "--binary",
        action="store_true",
        help="the sigmoid case: one logit per element, targets in [0, 1]",
    )
    parser.add_argument("--weight", help="class weights (JSON list)")
    parser.add_argument("--ignore-index", type=int, default=-100)
    parser.add_argument("--label-smoothing", type=fraction, default=0.0)
    parser.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"])
    parser.add_argument("--json", action="store_true", help="print the steps as JSON")


def _is_numbers(value: Any) -> bool:
    """A number, or a (nested) list of numbers; booleans and strings are not numbers."""
    if isinstance(value, list):
        return all(_is_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(text: str, what: str) -> torch.Tensor:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"xent explain: {what} is not a JSON list: {text!r} ({err})") from None
    if not _is_numbers(value):
        raise SystemExit(f"xent explain: {what} must be a JSON list of numbers, got {text!r}")
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError) as err:  # ragged rows
        raise SystemExit(
            f"xent explain: {what} {text!r} is not a rectangular list ({err})"
        ) from None
    if t.numel() == 0:
        raise SystemExit(f"xent explain: {what} holds no numbers: {text!r}")
    return torch.tensor(value, dtype=torch.float64) if t.is_floating_point() else t


def build_examples(args: argparse.Namespace) -> list[tuple[str, str, Steps]]:
    if args.logits is None and args.probs is None:
        if args.target is not None:
            raise SystemExit("xent explain: --target needs --logits or --probs")
        return seed_examples()
    if args.target is None:
        raise SystemExit("xent explain: give --target with --logits/--probs")
    given = _parse(args.logits if args.logits is not None else args.probs, "--logits/--probs")
    scores = given.double() if args.logits is not None else given.double().log()
    target = _parse(args.target, "--target")
    weight = None if args.weight is None else _parse(args.weight, "--weight").double()
    if args.binary:
        steps = explain_binary(scores, target, weight=weight, reduction=args.reduction)
        return [
            ("Binary cross-entropy with logits", "sigmoid, then -(y log p + (1-y) log(1-p))", steps)
        ]
    if scores.dim() == 1:
        scores = scores[None, :]
        if target.dim() == 0 or (target.dim() == 1 and target.is_floating_point()):
            target = target[None] if target.dim() == 0 else target[None, :]
    if target.is_floating_point() and target.shape != scores.shape:
        raise SystemExit(
            f"xent explain: probability targets need shape {tuple(scores.shape)}, "
            f"got {tuple(target.shape)}"
        )
    steps = explain_cross_entropy(
        scores,
        target if target.is_floating_point() else target.long(),
        weight=weight,
        ignore_index=args.ignore_index,
        label_smoothing=args.label_smoothing,
        reduction=args.reduction,
    )
    return [("Cross-entropy, step by step", "softmax -> log -> mask -> reduce -> gradient", steps)]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        examples = build_examples(args)
    except (IndexError, ValueError, RuntimeError, TypeError) as err:
        raise SystemExit(f"xent explain: {err}") from None
    if args.json:
        print(to_json(examples))
        return 0
    console = Console()
    for title, subtitle, steps in examples:
        render(title, subtitle, steps, console)
    return 0
