"""xent.hf with distributed heads: FSDP2-sharded and tensor-parallel (gloo on CPU, 2 processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from hf_models import batch, build, fp64_causal_lm_loss  # noqa: E402

import xent.hf  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build("LlamaForCausalLM", torch.float64)
    fully_shard(model.lm_head, mesh=mesh)  # the head is its own FSDP unit
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    xent.hf.patch(model, chunk_size=7)
    sharded = isinstance(model.lm_head.weight, DTensor)
    out = model(**batch(seed=10 + rank))
    out.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(
        {"loss": out.loss.detach(), "grads": grads, "sharded": sharded, "logits": out.logits},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()  # no rank tears the group down while a peer still works
    dist.destroy_process_group()


def test_fsdp2_sharded_head_is_gathered(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    stock = build("LlamaForCausalLM", torch.float64)
    stock.loss_function = fp64_causal_lm_loss
    losses = []
    for rank in range(WORLD):
        loss = stock(**batch(seed=10 + rank)).loss
        loss.backward()
        losses.append(loss.detach())
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert res["sharded"] and res["logits"] is None
        torch.testing.assert_close(res["loss"], losses[rank], rtol=1e-12, atol=1e-12)
        # FSDP averages the ranks' gradients.
        for n, p in stock.named_parameters():
            torch.testing.assert_close(
                res["grads"][n], p.grad / WORLD, rtol=1e-10, atol=1e-12, msg=n
            )


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build("LlamaForCausalLM", torch.float64)
    # The head split along the vocabulary, as transformers' tensor-parallel plan does it.
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    weight = model.lm_head.weight
    sharded = isinstance(weight, DTensor) and weight.placements == (Shard(0),)
    xent.hf.patch(model, chunk_size=7)
    out = model(**batch())  # every rank the same batch: the backbone is replicated
    out.loss.backward()
    grads = {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }
    torch.save(
        {"loss": out.loss.detach(), "grads": grads, "sharded": sharded},
        os.path.join(out_dir, f"tp{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


def test_tensor_parallel_head_goes_through_xent_vocabulary_parallelism(tmp_path):
    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    stock = build("LlamaForCausalLM", torch.float64)
    stock.loss_function = fp64_causal_lm_loss
    loss = stock(**batch()).loss
    loss.backward()
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"tp{rank}.pt")
        assert res["sharded"]
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for n, p in stock.named_parameters():
            torch.testing.assert_close(res["grads"][n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
