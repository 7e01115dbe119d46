"""Train a language-model head split along the vocabulary over several CPU processes.

    torchrun --nproc-per-node=2 examples/vocab_parallel_train.py

Every rank holds the same small model body (same seed) and one contiguous slice of the output
layer's rows (uneven slices are fine). Each step, every rank computes the hidden states of the
same batch, and `xent.distributed.vocab_parallel_linear_cross_entropy` returns the loss over the
whole vocabulary on every rank. The input gradient is all-reduced inside the loss, so the body's
gradients are identical on every rank and the replicas stay in sync with no further communication.
At the end, rank 0 gathers the head and checks the loss against single-process xent.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import xent
from xent.distributed import vocab_parallel_linear_cross_entropy
from xent.tools import demo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    ids, vocab = demo.build_corpus(args.vocab, max_files=200)
    torch.manual_seed(0)  # same body and same full head on every rank
    body = demo.ContextModel(len(vocab), context=4, embed=32, hidden=64)
    full_head = body.head.detach().clone()
    del body.head
    # Uneven slices: rank r gets a share proportional to r + 1.
    shares = [r + 1 for r in range(world)]
    sizes = [len(vocab) * s // sum(shares) for s in shares]
    sizes[-1] += len(vocab) - sum(sizes)
    start = sum(sizes[:rank])
    head = nn.Parameter(full_head[start : start + sizes[rank]].clone())
    opt = torch.optim.Adam([*body.parameters(), head], lr=3e-3)
    batches = demo.make_batches(ids, args.steps, args.batch, 4, seed=1, device=torch.device("cpu"))

    for step, (ctx, target) in enumerate(batches):
        loss = vocab_parallel_linear_cross_entropy(body(ctx), head, target, label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")

    # Check: the vocabulary-parallel loss equals single-process xent on the gathered head.
    with torch.no_grad():
        ctx, target = batches[-1]
        hidden = body(ctx)
        parallel = vocab_parallel_linear_cross_entropy(hidden, head, target, label_smoothing=0.05)
        # all_gather wants equal sizes: pad every slice to the largest, then trim.
        padded = torch.zeros(max(sizes), head.shape[1])
        padded[: sizes[rank]] = head.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        if rank == 0:
            full = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
            single = xent.linear_cross_entropy(hidden, full, target, label_smoothing=0.05)
            gap = abs(parallel.item() - single.item())
            print(
                f"ranks {world}, slices {sizes}: parallel {parallel.item():.6f}, "
                f"single-process {single.item():.6f}, difference {gap:.1e}"
            )
            if gap > 1e-4:
                raise SystemExit("vocabulary-parallel loss disagrees with single-process xent")
    # Every rank waits for rank 0's check: a rank that tears its group down while a peer is still
    # working can be aborted by gloo.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
