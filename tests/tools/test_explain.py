"""`xent explain` and `xent plot`: the printed numbers are xent's, the figures are real PNGs."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli, run_subprocess

import xent
from xent.tools import explain, plots


def test_seed_walkthrough_prints_the_worked_numbers():
    out = run_subprocess("explain")  # the one subprocess run of `xent explain`
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for number in (
        "0.289909",
        "0.356675",
        "0.223144",
        "0.916291",
        "0.248461",
        "0.090031, 0.244728, 0.665241",
        "most likely θ: 0.600000",
    ):
        assert number in text, number
    assert "\x1b[" not in text  # piped: no colour codes


def test_seed_walkthrough_json_matches_the_library():
    out = run_cli("explain", "--json")
    examples = json.loads(out.stdout)
    by_title = {e["title"].split(":")[0]: e["steps"] for e in examples}
    assert by_title["Credit card"]["log_loss"] == xent.log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]])
    assert math.isclose(by_title["Mastiff"]["loss"], -math.log(0.4), rel_tol=1e-15)
    horse = by_title["Horse"]
    assert math.isclose(horse["loss"], -math.log(0.78), rel_tol=1e-14)
    assert math.isclose(horse["KL(one-hot || p)"], horse["loss"], rel_tol=1e-14)
    kl = next(e["steps"] for e in examples if e["title"].startswith("KL"))
    assert math.isclose(kl["H(p, q) - H(p)"], kl["KL(p || q)"], rel_tol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_logits_steps_match_torch(reduction):
    logits = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]
    out = run_cli(
        "explain",
        "--logits",
        json.dumps(logits),
        "--target",
        "[2, 0, 1]",
        "--weight",
        "[1, 2, 0.5]",
        "--ignore-index",
        "1",
        "--label-smoothing",
        "0.1",
        "--reduction",
        reduction,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    steps = json.loads(out.stdout)[0]["steps"]
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([2, 0, 1])
    w = torch.tensor([1, 2, 0.5], dtype=torch.float64)
    ref = F.cross_entropy(x, t, w, ignore_index=1, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(torch.tensor(steps["loss"], dtype=torch.float64), ref.detach())
    (grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(torch.tensor(steps["gradient"], dtype=torch.float64), grad)
    torch.testing.assert_close(
        torch.tensor(steps["softmax"], dtype=torch.float64), torch.softmax(x.detach(), 1)
    )
    shifted = torch.tensor(steps["max subtracted"])
    assert (shifted.amax(1) == 0).all()
    assert steps["mask (target weights)"][2] == [0.0, 0.0, 0.0]  # the ignored row


def test_probabilities_binary_and_errors():
    out = run_cli("explain", "--probs", "[0.1, 0.12, 0.78]", "--target", "2", "--json")
    assert math.isclose(json.loads(out.stdout)[0]["steps"]["loss"], -math.log(0.78), rel_tol=1e-12)
    out = run_cli("explain", "--binary", "--logits", "[0.0, 2.0]", "--target", "[1, 0]", "--json")
    steps = json.loads(out.stdout)[0]["steps"]
    ref = F.binary_cross_entropy_with_logits(
        torch.tensor([0.0, 2.0]).double(), torch.tensor([1.0, 0.0]).double()
    )
    assert math.isclose(steps["loss"], ref.item(), rel_tol=1e-12)
    out = run_cli("explain", "--logits", "[[1, 2]]", "--target", "[5]")
    assert out.returncode != 0 and "Target 5 is out of bounds" in out.stderr
    out = run_cli("explain", "--logits", "[[1, 2", "--target", "[0]")
    assert out.returncode != 0 and "not a JSON list" in out.stderr


def test_steps_are_consistent_in_process():
    steps = explain.explain_cross_entropy(torch.tensor([[2.0, 1.0, 0.1]]), torch.tensor([0]))
    torch.testing.assert_close(steps["loss by definition (xent.reference)"], steps["loss"])
    torch.testing.assert_close(
        steps["softmax"], steps["exponentials"] / steps["exponentials"].sum()
    )
    torch.testing.assert_close(steps["per-row loss"], -steps["log-softmax"][:, 0])
    torch.testing.assert_close(steps["gradient"], steps["softmax"] - torch.tensor([[1.0, 0, 0]]))


def test_plot_writes_real_figures(tmp_path):
    out = run_cli("plot", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for name in plots.FIGURES:
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # not a blank canvas
