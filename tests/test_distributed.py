"""Vocabulary-parallel losses on 2 and 3 CPU processes (gloo) against single-process xent."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xent
from xent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

N, H, V = 23, 6, 31
SPLITS = {2: [13, 18], 3: [7, 15, 9]}  # uneven slices of the 31 classes
OPTIONS = (
    [
        dict(reduction=r, label_smoothing=e, z_loss=z, ignore_index=i)
        for r, e, z, i in itertools.product(
            ["mean", "sum", "none"], [0.0, 0.2], [0.0, 0.01], [-100, 4]
        )
    ]
    + [
        # Class weights over the global vocabulary and soft-capping, with every other option.
        dict(reduction=r, label_smoothing=0.1, z_loss=0.01, softcap=2.5, weighted=True)
        for r in ("mean", "sum", "none")
    ]
    + [dict(reduction="mean", softcap=4.0), dict(reduction="sum", weighted=True, ignore_index=4)]
)


def _class_weight() -> torch.Tensor:
    return torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.2


def _options(opts: dict) -> dict:
    """The keyword arguments of one option set (``weighted`` becomes the class weights)."""
    opts = dict(opts)
    opts.setdefault("ignore_index", -100)
    if opts.pop("weighted", False):
        opts["weight"] = _class_weight()
    return opts


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=gen)
    t[::5] = -100
    t[1::7] = 4
    up = torch.randn(N, generator=gen, dtype=torch.float64)
    return x, w, b, t, up


def _target_for(t: torch.Tensor, opts: dict) -> torch.Tensor:
    """The problem's targets with its ignored ones spelled as this option set's ignore_index."""
    return torch.where(t == -100, opts["ignore_index"], t)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, w, b, t_base, up = _problem()
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    results = []
    for opts in map(_options, OPTIONS):
        upstream = up if opts["reduction"] == "none" else torch.tensor(0.7, dtype=torch.float64)
        t = _target_for(t_base, opts)
        logits = (x @ w.t() + b)[:, rows].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(logits, t, **opts)
        (g_logits,) = torch.autograd.grad(loss, logits, upstream, retain_graph=True)
        # A second backward through the retained graph forms the same gradient again.
        (g_again,) = torch.autograd.grad(loss, logits, upstream)
        assert torch.equal(g_again, g_logits)
        xi = x.clone().requires_grad_()
        wi = w[rows].clone().requires_grad_()
        bi = b[rows].clone().requires_grad_()
        # Explicit vocab_start on odd calls, derived from the slice sizes on even ones.
        vs = start if len(results) % 2 else None
        loss2 = vocab_parallel_linear_cross_entropy(
            xi, wi, t, linear_bias=bi, vocab_start=vs, chunk_size=5, **opts
        )
        grads = torch.autograd.grad(loss2, (xi, wi, bi), upstream)
        results.append((loss.detach(), g_logits, loss2.detach(), *grads))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while a peer still works
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    x, w, b, t_base, up = _problem()
    sizes = SPLITS[world]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for k, opts in enumerate(map(_options, OPTIONS)):
        upstream = up if opts["reduction"] == "none" else torch.tensor(0.7, dtype=torch.float64)
        t = _target_for(t_base, opts)
        logits = (x @ w.t() + b).requires_grad_()
        ref = xent.cross_entropy(logits, t, **opts)
        (g_ref,) = torch.autograd.grad(ref, logits, upstream)
        xr, wr, br = (p.clone().requires_grad_() for p in (x, w, b))
        ref2 = xent.linear_cross_entropy(xr, wr, t, linear_bias=br, **opts)
        gx, gw, gb = torch.autograd.grad(ref2, (xr, wr, br), upstream)
        for r in range(world):
            loss, g_logits, loss2, g_x, g_w, g_b = per_rank[r][k]
            rows = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            torch.testing.assert_close(loss, ref.detach(), atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(g_logits, g_ref[:, rows], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(loss2, ref2.detach(), atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(g_x, gx, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(g_w, gw[rows], atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(g_b, gb[rows], atol=1e-12, rtol=1e-12)


def _error_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    messages = []
    # The layout is gathered and checked the first time a group sees a slice size, so the
    # misplaced slices come first, before a good call has stored this group's layout.
    for call in (
        lambda: vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1])),
        lambda: vocab_parallel_cross_entropy(
            torch.randn(3, 4), torch.tensor([0, 1, 2]), vocab_start=7
        ),
        # Both ranks claim classes [0, 4): overlapping slices, detected on every rank.
        lambda: vocab_parallel_cross_entropy(
            torch.randn(3, 4), torch.tensor([0, 1, 2]), vocab_start=0
        ),
        # Rank 1 holds no class at all.
        lambda: vocab_parallel_cross_entropy(
            torch.randn(3, 4 if rank == 0 else 0), torch.tensor([0, 1, 2])
        ),
        # Slices out of rank order: rank 0 holds [4, 8), rank 1 [0, 4).
        lambda: vocab_parallel_linear_cross_entropy(
            torch.randn(3, 5), torch.randn(4, 5), torch.tensor([0, 1, 2]), vocab_start=4 - 4 * rank
        ),
        lambda: vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1])),
    ):
        try:
            call()
            messages.append("no error")
        except (IndexError, ValueError) as err:
            messages.append(f"{type(err).__name__}: {err}")
    # Every target ignored: the mean is NaN, and the gradients exactly zero (not NaN).
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    h = torch.randn(3, 5, requires_grad=True)
    ignored = torch.full((3,), -100)
    losses = [
        vocab_parallel_cross_entropy(x, ignored),
        vocab_parallel_linear_cross_entropy(h, w, ignored),
    ]
    grads = torch.autograd.grad(sum(losses), (x, w, h), allow_unused=False)
    messages.append([bool(torch.isnan(v)) for v in losses] + [bool((g == 0).all()) for g in grads])
    torch.save(messages, os.path.join(out_dir, f"err{rank}.pt"))
    dist.barrier()  # no rank tears the group down while a peer still works
    dist.destroy_process_group()


def test_errors_name_the_offending_values(tmp_path):
    mp.spawn(_error_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = torch.load(tmp_path / "err0.pt")
    assert messages[0].startswith("ValueError: target must have shape (3,), got (2,)")
    layout = "ValueError: vocabulary-parallel layout: "
    assert messages[1].startswith(layout + "rank 0's slice [7, 11) leaves a gap before it")
    assert messages[2].startswith(layout + "rank 1's slice [0, 4) overlaps the slice before it")
    assert messages[3].startswith(layout + "rank 1 holds an empty slice")
    assert messages[4].startswith(layout + "rank 0's slice [4, 8) leaves a gap before it")
    assert messages[5] == "IndexError: Target 9 is out of bounds."
    assert messages[6] == [True, True, True, True, True]
    # Every rank raises the same error (none of them hangs in a collective or computes on).
    assert torch.load(tmp_path / "err1.pt")[:6] == messages[:6]


def _dtensor_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    x, w, b, t_base, up = _problem()
    results = []
    for opts in map(_options, OPTIONS[-5:]):  # weights, softcap, smoothing, z-loss
        upstream = up if opts["reduction"] == "none" else torch.tensor(0.7, dtype=torch.float64)
        t = _target_for(t_base, opts)
        # A head sharded along the vocabulary (as ColwiseParallel shards it): uneven shards.
        w_dt = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        b_dt = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        xi = x.clone().requires_grad_()
        loss = xent.linear_cross_entropy(xi, w_dt, t, linear_bias=b_dt, chunk_size=6, **opts)
        g_x, g_w, g_b = torch.autograd.grad(loss, (xi, w_dt, b_dt), upstream)
        # Logits sharded along the classes, and a replicated DTensor (a local tensor to xent).
        logits = x @ w.t() + b
        z_dt = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
        loss_z = xent.cross_entropy(z_dt, t, **opts)
        (g_z,) = torch.autograd.grad(loss_z, z_dt, upstream)
        z_rep = distribute_tensor(logits, mesh, [Replicate()]).requires_grad_()
        loss_rep = xent.cross_entropy(z_rep, t, **opts)
        results.append(
            [v.detach() for v in (loss, loss_z, loss_rep)]
            + [g_x, g_w.full_tensor(), g_b.full_tensor(), g_z.full_tensor()]
        )
    torch.save(results, os.path.join(out_dir, f"dt{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_heads_and_logits_take_the_vocab_parallel_path(world, tmp_path):
    mp.spawn(_dtensor_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    x, w, b, t_base, up = _problem()
    for r in range(world):
        for k, opts in enumerate(map(_options, OPTIONS[-5:])):
            upstream = up if opts["reduction"] == "none" else torch.tensor(0.7, dtype=torch.float64)
            t = _target_for(t_base, opts)
            xr, wr, br = (p.clone().requires_grad_() for p in (x, w, b))
            ref = xent.linear_cross_entropy(xr, wr, t, linear_bias=br, **opts)
            grads = torch.autograd.grad(ref, (xr, wr, br), upstream)
            logits = (x @ w.t() + b).requires_grad_()
            ref_z = xent.cross_entropy(logits, t, **opts)
            (g_ref_z,) = torch.autograd.grad(ref_z, logits, upstream)
            loss, loss_z, loss_rep, *ours = torch.load(tmp_path / f"dt{r}.pt")[k]
            for a, e in zip(
                (loss, loss_z, loss_rep, *ours),
                (ref, ref_z, ref_z, *grads, g_ref_z),
                strict=True,
            ):
                torch.testing.assert_close(a, e.detach(), atol=1e-12, rtol=1e-12)


def test_torchrun_example_trains_and_agrees_with_single_process():
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).parents[1] / "examples" / "vocab_parallel_train.py"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={_free_port()}",
            str(example),
            "--steps",
            "4",
            "--vocab",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "step   3" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert "difference" in last and float(last.rsplit(" ", 1)[1]) < 1e-4


# Large logits: the global max, Σ e^{z - m} and the target and smoothing sums relative to it.
SHIFTS = [(torch.float32, 1e4), (torch.float32, 1e7), (torch.float64, 1e7)]
SHIFT_OPTIONS = [
    dict(),
    dict(label_smoothing=0.2, z_loss=1e-9, weighted=True),
    dict(label_smoothing=0.1, softcap=4e4),
]


def _shifted_problem(dtype, offset):
    """``fl(z + c)`` for standard-normal ``z``; the row max falls in either slice."""
    gen = torch.Generator().manual_seed(8)
    z = 2.0 * torch.randn(7, V, generator=gen, dtype=torch.float64)
    t = torch.randint(0, V, (7,), generator=gen)
    t[2] = -100
    up = torch.rand(7, generator=gen, dtype=torch.float64)
    return (z + offset).to(dtype), t, up


def _shift_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    start = sum(SPLITS[world][:rank])
    cols = slice(start, start + SPLITS[world][rank])
    results = []
    for dtype, offset in SHIFTS:
        x, t, up = _shifted_problem(dtype, offset)
        for opts in map(_options, SHIFT_OPTIONS):
            opts = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
            for reduction in ("none", "sum"):
                logits = x[:, cols].clone().requires_grad_()
                loss = vocab_parallel_cross_entropy(logits, t, reduction=reduction, **opts)
                g_up = up.to(dtype) if reduction == "none" else None
                (g,) = torch.autograd.grad(loss, logits, g_up)
                results.append((loss.detach(), g))
    torch.save(results, os.path.join(out_dir, f"shift{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_vocab_parallel_large_logits_are_shift_invariant(tmp_path):
    from oracles import relative_cross_entropy

    world = 2
    mp.spawn(_shift_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"shift{r}.pt") for r in range(world)]
    k = 0
    for dtype, offset in SHIFTS:
        x, t, up = _shifted_problem(dtype, offset)
        # Bounds that do not grow with the offset (tests/test_large_logits.py), but for the
        # z-loss, of the size of lse², and its gradient 2ζ lse p.
        tol = 5e-6 if dtype == torch.float32 else 1e-14
        for opts in map(_options, SHIFT_OPTIONS):
            x64 = x.double().requires_grad_()
            cap_dtype = dtype if "softcap" in opts else None
            ref = relative_cross_entropy(x64, t, cap_dtype=cap_dtype, **opts)
            (g_ref,) = torch.autograd.grad(ref, x64, up, retain_graph=True)
            (g_sum,) = torch.autograd.grad(ref.sum(), x64)
            scale = max(1.0, opts.get("z_loss", 0.0) * offset)
            for reduction in ("none", "sum"):
                for r in range(world):
                    loss, g = per_rank[r][k]
                    cols = slice(sum(SPLITS[world][:r]), sum(SPLITS[world][: r + 1]))
                    want = ref.detach() if reduction == "none" else ref.detach().sum()
                    want_g = (g_ref if reduction == "none" else g_sum)[:, cols]
                    atol = tol * scale * (1 if reduction == "none" else x.shape[0])
                    torch.testing.assert_close(loss.double(), want, atol=atol, rtol=tol)
                    torch.testing.assert_close(g.double(), want_g, atol=tol * scale, rtol=tol)
                k += 1
