"""Vocabulary parallelism: an option of the engine, not a second implementation.

When the output layer is split along the vocabulary (tensor parallelism), rank ``r`` holds the
logits (or the weight rows) of classes ``[s_r, s_r + V_r)`` only. Every statistic the loss needs
over the *whole* vocabulary is a max or a sum over classes, so each rank reduces its own slice and
the ranks combine ``O(n)`` numbers per chunk of ``n`` tokens:

    m   = max_r  max_{c ∈ slice r} z_c                               (all-reduce MAX of n)
    s   = Σ_r    Σ_{c ∈ slice r} e^{z_c - m}                          (all-reduce SUM of 2n,
    T   = Σ_r    (1-ε) w_y (z_y - m) [y ∈ slice r]                     packed in one call)
               + (ε/C) Σ_{c ∈ slice r} w_c (z_c - m)

Then ``lse = m + log s`` and, per token (``A = (1-ε) w_y + (ε/C) Σ_c w_c`` over the global
vocabulary),

    l = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c) + ζ lse²  =  A log s - T + ζ lse²,

formed relative to the global max (no cancellation for logits far from 0). The gradient with
respect to rank ``r``'s slice, ``c (p_j A' - B_j)`` with ``p = e^{z - m} / s``, needs nothing
that rank lacks once ``(m, log s)`` is known: it is the single-process row kernel of either
backend, run on the slice with the global ``(m, log s)`` (:attr:`CEParams.sliced`). Backward
communicates nothing, except the input gradient of the fused version (every rank's slice
contributes to it). Logits never cross the network.

The layout (:class:`VocabParallel`) is gathered and checked once per group and slice size and
kept: no host read per call once built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from xent._engine.dispatch import row_pass
from xent._engine.options import CHUNK_BYTES, CEParams
from xent._numerics import compute_dtype, target_weights

# The backends whose one-pass kernel takes a vocabulary slice (CEParams.sliced).
_SLICED_BACKENDS = {"torch": True, "triton": True}


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice of a vocabulary split over ``group``: classes ``[start, start + size)``
    of ``vocab``. Build it with :func:`layout`."""

    group: dist.ProcessGroup
    start: int
    size: int
    vocab: int

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def cross_entropy_rows(
        self,
        z: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        coef: torch.Tensor | None,
        params: CEParams,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
        grad_out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cross-entropy row kernel on this rank's slice ``z`` (``(n, size)``).

        Without ``stats``: the global statistics (two all-reduces), the loss, ``m`` and
        ``log s``; with them (backward's recomputation) nothing is communicated. Then, if
        ``grad_out``, the backend's one-pass kernel writes the slice's gradient from the global
        ``(m, log s)``.
        """
        if z.shape[1] != self.size:
            raise ValueError(
                f"this rank's logits have {z.shape[1]} classes, but its slice of the "
                f"vocabulary was laid out with {self.size}"
            )
        if stats is None:
            loss, *stats = self._statistics(z, target, weight, params)
        else:
            loss = torch.zeros_like(stats[0])
        if grad_out is not None:
            sliced = replace(params, class_start=self.start, num_classes=self.vocab)
            if not _SLICED_BACKENDS.get(params.impl, False):
                sliced = replace(sliced, impl="torch")
            row_pass(sliced)(
                z, target, weight, coef, sliced, stats_in=tuple(stats), grad_out=grad_out
            )
        return loss, stats[0], stats[1]

    def _statistics(
        self, z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: CEParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, width = z.shape
        cdtype = compute_dtype(z.dtype)
        eps, zeta, cap = params.label_smoothing, params.z_loss, params.softcap
        w_full = None if weight is None else weight.to(device=z.device, dtype=cdtype)
        w = None if w_full is None else w_full[self.start : self.start + width]
        valid, safe, w_y = target_weights(target, w_full, params.ignore_index, cdtype)
        mine = valid & (safe >= self.start) & (safe < self.start + width)
        local_y = torch.where(mine, safe - self.start, 0)[:, None]

        # The global max of the (capped) logits: the cap is increasing, so max cap(z) = cap(max z).
        m = z.amax(dim=1).to(cdtype)
        if cap is not None:
            m = cap * torch.tanh(m / cap)
        self.all_reduce_max(m)
        m = torch.where(m == -torch.inf, torch.zeros_like(m), m)[:, None]

        # s and T of this slice, block by block in a cache-sized scratch (z is left untouched:
        # it may be the buffer the gradient is written over).
        sums = torch.zeros(2, n, dtype=cdtype, device=z.device)
        step = max(1, CHUNK_BYTES // (4 * max(width, 1)))
        scratch = torch.empty((min(step, n), width), dtype=cdtype, device=z.device)
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            d = scratch[: r1 - r0]
            if cap is not None:
                torch.div(z[r0:r1], cap, out=d)
                d.tanh_().mul_(cap)
                d.sub_(m[r0:r1])
            else:
                torch.sub(z[r0:r1], m[r0:r1], out=d)  # z - m ≤ 0
            d_y = torch.where(mine[r0:r1], d.gather(1, local_y[r0:r1]).squeeze(1), 0.0)
            t = (1.0 - eps) * w_y[r0:r1] * d_y
            if eps > 0.0:
                t = t + (eps / self.vocab) * (d.sum(dim=1) if w is None else d @ w)
            sums[1, r0:r1] = t
            sums[0, r0:r1] = d.exp_().sum(dim=1)
        self.all_reduce_sum(sums)

        log_s = sums[0].log()
        m = m.squeeze(1)
        lse = m + log_s  # the z-loss only
        w_total = float(self.vocab) if w_full is None else w_full.sum()
        a = (1.0 - eps) * w_y + (eps / self.vocab) * w_total
        loss = a * log_s - sums[1]
        if zeta != 0.0:
            loss = loss + zeta * lse * lse
        return torch.where(valid, loss, 0.0), m, log_s


_LAYOUTS: dict[tuple, VocabParallel] = {}


def layout(
    group: dist.ProcessGroup | None, size: int, vocab_start: int | None, device: torch.device
) -> VocabParallel:
    """This rank's :class:`VocabParallel`, gathered and checked once per group and slice.

    Every rank's ``(start, size)`` is all-gathered (one collective of two integers per rank) the
    first time; with ``vocab_start=None`` the slices are laid out in rank order. The slices must
    be non-empty, contiguous, disjoint and cover ``[0, V)`` in rank order; otherwise every rank
    raises the same ``ValueError`` naming the offending rank and slice. The result is kept, so
    later calls read nothing back from the device. Every rank must pass the same slice size from
    one call to the next (as a training job does): a rank whose size changes alone would gather
    while the others do not.
    """
    group = group if group is not None else dist.distributed_c10d._get_default_group()
    key = (group, int(size), vocab_start, device.type)
    found = _LAYOUTS.get(key)
    if found is not None:
        return found
    world = dist.get_world_size(group)
    mine = torch.tensor(
        [-1 if vocab_start is None else int(vocab_start), int(size)],
        dtype=torch.long,
        device=device,
    )
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    starts, sizes = zip(*(tuple(int(v) for v in g.tolist()) for g in gathered), strict=True)
    expected = 0
    for rank, (start, width) in enumerate(zip(starts, sizes, strict=True)):
        begin = expected if start < 0 else start
        if width <= 0:
            raise ValueError(
                f"vocabulary-parallel layout: rank {rank} holds an empty slice of the vocabulary "
                f"(slice sizes by rank: {list(sizes)}); every rank needs at least one class"
            )
        if begin != expected:
            what = "overlaps the slice before it" if begin < expected else "leaves a gap before it"
            raise ValueError(
                f"vocabulary-parallel layout: rank {rank}'s slice [{begin}, {begin + width}) "
                f"{what}; slices must be contiguous, disjoint and cover [0, V) in rank order "
                f"(expected it to start at {expected}; starts by rank: "
                f"{[None if s < 0 else s for s in starts]}, sizes: {list(sizes)})"
            )
        expected = begin + width
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    built = VocabParallel(group, start, int(size), expected)
    _LAYOUTS[key] = built
    return built


# --------------------------------------------------------------------------------------------
# DTensor: a vocabulary-sharded tensor takes the vocabulary-parallel path by itself
# --------------------------------------------------------------------------------------------


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch builds without distributed support
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def from_dtensor(
    t: torch.Tensor, vocab_dim: int, name: str
) -> tuple[torch.Tensor, VocabParallel | None]:
    """``(local tensor, layout)`` of a DTensor: sharded along ``vocab_dim`` on one mesh
    dimension (and replicated on the others) → its local shard and that mesh dimension's layout
    (shards in rank order, as ``torch.chunk`` lays them out); replicated → the local tensor and
    None. Any other placement is refused with its name."""
    from torch.distributed.tensor import Replicate, Shard

    vocab_dim = vocab_dim % t.dim()
    sharded = None
    for mesh_dim, placement in enumerate(t.placements):
        if (
            isinstance(placement, Shard)
            and placement.dim % t.dim() == vocab_dim
            and sharded is None
        ):
            sharded = mesh_dim
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"{name} is a DTensor with placements {tuple(t.placements)}: xent takes one "
                f"Shard({vocab_dim}) (the vocabulary) and Replicate() elsewhere"
            )
    local = t.to_local()
    if sharded is None:
        return local, None
    group = t.device_mesh.get_group(sharded)
    return local, layout(group, local.shape[vocab_dim], None, local.device)


def local_tensor(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A replicated DTensor's local tensor (any other placement is refused); other tensors as
    they are."""
    if t is None or not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in t.placements):
        raise NotImplementedError(
            f"{name} must be a replicated DTensor, got placements {tuple(t.placements)}"
        )
    return t.to_local()
