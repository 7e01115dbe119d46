"""Row kernels in the engine's contract (see :mod:`xent._engine.walker`).

A row kernel turns logits into per-row results and, when asked, writes their gradient. The
cross-entropy one wraps the one-pass kernels of both backends (:func:`dispatch.row_pass`), and,
with vocabulary parallelism, their global statistics (:mod:`xent._engine.parallel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xent._engine.dispatch import row_pass
from xent._engine.options import CEParams

if TYPE_CHECKING:
    from xent._engine.parallel import VocabParallel


class CrossEntropyRows:
    """Cross-entropy rows: ``(loss, m, log s)`` per row and ``Σ_i c_i ∂l_i/∂z``.

    Built per call with the ``(M)`` targets (or ``(M, C)`` probabilities), the class weights,
    the coefficients ``c_i = ∂L/∂l_i`` (None when no gradient is formed), optionally the saved
    statistics ``(m, log s)``, each ``(M)`` (the row max and ``log Σ_c e^{z_c - m}``; backward's
    recomputation: they are not formed again, and with vocabulary parallelism nothing is
    communicated), a ``(M, C)`` buffer for the probability target's gradient, and the
    vocabulary-parallel layout. The log-sum-exp is ``m + log s``; it is kept as the pair so that
    nothing downstream subtracts it from a logit (:mod:`xent._engine.torch_rows`).
    """

    num_outputs = 3

    def __init__(
        self,
        params: CEParams,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        coef: torch.Tensor | None,
        *,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        grad_target: torch.Tensor | None = None,
        parallel: VocabParallel | None = None,
    ) -> None:
        self.params, self.target, self.weight, self.coef = params, target, weight, coef
        self.stats, self.grad_target, self.parallel = stats, grad_target, parallel

    def __call__(
        self, z: torch.Tensor, rows: slice | torch.Tensor, grad_out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = self.target[rows]
        coef = None if self.coef is None else self.coef[rows]
        stats = None if self.stats is None else (self.stats[0][rows], self.stats[1][rows])
        if self.parallel is not None:
            return self.parallel.cross_entropy_rows(
                z, target, self.weight, coef, self.params, stats, grad_out
            )
        return row_pass(self.params)(
            z,
            target,
            self.weight,
            coef,
            self.params,
            stats_in=stats,
            grad_out=grad_out,
            grad_target_out=None if self.grad_target is None else self.grad_target[rows],
        )
