"""The worked examples of the texts xent grew from, reproduced by xent's own functions."""

from __future__ import annotations

import math

import torch

import xent


def test_credit_card_example_log_loss_and_bce():
    # Two customers: the first defaults (1) with predicted P = 0.7, the second does not (0)
    # with P(default) = 0.2.
    assert xent.log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]]) == 0.2899092476264711
    assert xent.log_loss([[0, 1], [1, 0]], [[0.3, 0.7], [0.8, 0.2]]) == 0.2899092476264711
    assert abs(-(math.log(0.7) + math.log(0.8)) / 2 - 0.2899092476264711) < 1e-16
    p = torch.tensor([0.7, 0.2], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert abs(xent.binary_cross_entropy(p, y).item() - 0.2899092476264711) < 1e-15
    per_customer = xent.binary_cross_entropy(p, y, reduction="none")
    assert [round(v, 6) for v in per_customer.tolist()] == [0.356675, 0.223144]
    assert round(xent.binary_cross_entropy(p.float(), y.float()).item(), 4) == 0.2899


def test_mastiff_example():
    # Predicted [0.4, 0.4, 0.2] for (cat, dog, horse); the picture is a dog (class 1).
    logits = torch.tensor([[math.log(0.4), math.log(0.4), math.log(0.2)]], dtype=torch.float64)
    loss = xent.cross_entropy(logits, torch.tensor([1]))
    assert abs(loss.item() - 0.916290731874155) < 1e-15
    assert xent.log_loss([[0, 1, 0]], [[0.4, 0.4, 0.2]]) == 0.916290731874155
    assert round(xent.cross_entropy(logits.float(), torch.tensor([1])).item(), 4) == 0.9163


def test_horse_example_and_kl_from_one_hot():
    probs = torch.tensor([[0.1, 0.12, 0.78]], dtype=torch.float64)
    loss = xent.nll_loss(probs.log(), torch.tensor([2]))
    assert abs(loss.item() + math.log(0.78)) < 1e-15
    assert round(loss.item(), 4) == 0.2485
    one_hot = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    kl = xent.kl_div(probs.log(), one_hot, reduction="sum")
    assert xent.entropy(one_hot).item() == 0.0
    assert abs(kl.item() - loss.item()) < 1e-15


def test_softmax_of_one_two_three():
    out = xent.softmax(torch.tensor([1.0, 2.0, 3.0]), dim=0)
    assert [round(v, 4) for v in out.tolist()] == [0.0900, 0.2447, 0.6652]


def test_coin_flip_likelihood_peaks_at_sixty_percent():
    # 60 heads in 100 flips: the negative log-likelihood of θ is the BCE of θ against the flips,
    # and it is smallest (the likelihood largest) at θ = 0.6.
    flips = torch.cat([torch.ones(60), torch.zeros(40)]).double()
    thetas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    nll = torch.stack([xent.binary_cross_entropy(t.expand(100), flips) for t in thetas])
    assert abs(thetas[nll.argmin()].item() - 0.6) < 1e-12
    # The same maximum from the logits form, by gradient descent from θ = 0.5.
    z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(200):
        loss = xent.binary_cross_entropy_with_logits(z.expand(100), flips)
        (g,) = torch.autograd.grad(loss, z)
        z = (z - 2.0 * g).detach().requires_grad_()
    assert abs(torch.sigmoid(z).item() - 0.6) < 1e-9


def test_kl_equals_cross_entropy_minus_entropy():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    cross = xent.cross_entropy(q.log(), p)  # H(p, q) = -Σ p log q
    kl = xent.kl_div(q.log(), p, reduction="sum")
    assert abs(kl.item() - (cross.item() - xent.entropy(p).item())) < 1e-15


def test_hand_written_cross_entropy_loss_of_the_seed_text():
    # The text's own [B, C, N] implementation with weights and ignore_index, against xent.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 6), generator=gen)
    weights = torch.rand(5, generator=gen, dtype=torch.float64)
    ignore_index = 2
    log_prob = (logits.exp() / logits.exp().sum(dim=1, keepdim=True)).log()
    weight = weights.view(1, 5, 1).repeat(4, 1, 6)
    log_prob = log_prob * weight
    weight[:, ignore_index] = 0
    w_y = torch.gather(weight, 1, labels.unsqueeze(1))
    log_prob[:, ignore_index] = 0
    expected = -torch.gather(log_prob, 1, labels.unsqueeze(1)).sum() / w_y.sum()
    ours = xent.cross_entropy(logits, labels, weights, ignore_index=ignore_index)
    assert abs(ours.item() - expected.item()) < 1e-12
