"""The log-probability, divergence and policy-loss Triton kernels compiled ahead of time for real
GPUs, without one (as :mod:`test_triton_compile` does for the cross-entropy kernels).

Each variant is what a launcher of :mod:`xent._engine.triton_logprob` passes its kernel: the
launcher runs on empty CPU tensors with its kernels replaced by recorders, and the recorded
launch is compiled to a cubin for sm_80, sm_90a and sm_100a. The variants cover each constexpr
path (entropy, top-1, softcap, per-row temperature, the gradient, each divergence mode, the
policy loss's entropy bonus and old log-probabilities), every dtype, both warp counts and a
vocabulary divisible by 16. Asserted: it compiles, no register spills outside fp64, int64 row
offsets, fast ``ex2.approx`` exponentials, and 16-byte vector loads where the vocabulary and
the strides are divisible by 16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
# Skips where the installed Triton has no NVIDIA backend.
from test_triton_compile import (
    ARCHS,
    ROWS,
    compile_all,
    compile_facts,
    compile_in_fresh_process,
)

VOCAB = 50257  # odd: no divisibility to specialise on; 4096-column blocks over 8 warps
KERNELS = ("_logprob_fwd_kernel", "_logprob_bwd_kernel", "_policy_kernel", "_divergence_kernel")

ALL = dict(cap=True, ent=True, row_temp=True)
# (name, launcher, dtype, options)
VARIANTS = [
    ("lp-fp32", "log_prob_rows", torch.float32, {}),
    ("lp-bf16-all", "log_prob_rows", torch.bfloat16, dict(ALL, top=True)),
    ("lp-fp16-entropy-top1", "log_prob_rows", torch.float16, dict(ent=True, top=True)),
    ("lp-fp64-all", "log_prob_rows", torch.float64, dict(ALL, top=True)),
    ("lp-bf16-vocab1000", "log_prob_rows", torch.bfloat16, dict(ent=True, vocab=1000)),
    ("lpgrad-fp32", "log_prob_grad_rows", torch.float32, {}),
    ("lpgrad-bf16-all", "log_prob_grad_rows", torch.bfloat16, ALL),
    ("lpgrad-fp16-entropy", "log_prob_grad_rows", torch.float16, dict(ent=True)),
    ("lpgrad-fp64-all", "log_prob_grad_rows", torch.float64, ALL),
    # Vocabulary and strides divisible by 16: the specialisation that vectorises the loads.
    ("lpgrad-bf16-vocab151936", "log_prob_grad_rows", torch.bfloat16, dict(ALL, vocab=151936)),
    ("policy-fp32-grad", "policy_rows", torch.float32, dict(grad=True)),
    ("policy-bf16-all", "policy_rows", torch.bfloat16, dict(ALL, bonus=True, old=True, grad=True)),
    # The entropy reported, not in the loss.
    ("policy-fp16-entropy", "policy_rows", torch.float16, dict(ent=True, old=True, grad=True)),
    ("policy-bf16-forward-only", "policy_rows", torch.bfloat16, dict(ent=True, bonus=True)),
    ("policy-fp64-all", "policy_rows", torch.float64, dict(ALL, bonus=True, old=True, grad=True)),
    ("kl-bf16-grad", "divergence_rows", torch.bfloat16, dict(beta=0.0, valid=True, grad=True)),
    (
        "rkl-bf16-grad-caps",
        "divergence_rows",
        torch.bfloat16,
        dict(beta=1.0, cap=True, t_cap=True, row_temp=True, grad=True),
    ),
    # A bf16 student against an fp32 teacher (the linear form's teacher logits).
    (
        "jsd-bf16-grad-fp32-teacher",
        "divergence_rows",
        torch.bfloat16,
        dict(beta=0.5, valid=True, grad=True, teacher=torch.float32),
    ),
    ("jsd-fp16-forward-only", "divergence_rows", torch.float16, dict(beta=0.5)),
    ("jsd-fp32-all", "divergence_rows", torch.float32, dict(ALL, beta=0.3, t_cap=True, grad=True)),
    ("jsd-fp64-grad", "divergence_rows", torch.float64, dict(beta=0.5, valid=True, grad=True)),
]


def _call_launcher(launcher: str, dtype: torch.dtype, opts: dict) -> None:
    """Call ``launcher`` as the post-training losses do, on empty tensors of ``ROWS`` rows."""
    from xent._engine import triton_logprob as lp
    from xent._engine.options import DivergenceParams, LogProbParams, PolicyParams, Transform

    vocab = opts.get("vocab", VOCAB)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.empty(ROWS, vocab, dtype=dtype)
    rows = torch.empty(ROWS, dtype=acc)
    target = torch.empty(ROWS, dtype=torch.long)
    inv_temp = torch.empty(ROWS, dtype=acc) if opts.get("row_temp") else 0.5
    grad = torch.empty_like(x) if opts.get("grad") else None
    tf = Transform(2.0, 30.0 if opts.get("cap") else None)
    params = LogProbParams(tf, entropy=opts.get("ent", False), top1=opts.get("top", False))
    if launcher == "log_prob_rows":
        lp.log_prob_rows(x, target, inv_temp, params)
    elif launcher == "log_prob_grad_rows":
        c_ent = rows if params.entropy else None
        lp.log_prob_grad_rows(x, target, inv_temp, params, rows, rows, rows, rows, c_ent, x)
    elif launcher == "policy_rows":
        policy = PolicyParams(
            params,
            entropy_coef=0.01 if opts.get("bonus") else 0.0,
            off_policy=opts.get("old", False),
        )
        old = rows if policy.off_policy else None
        lp.policy_rows(
            x, target, inv_temp, policy, rows, old, rows if grad is not None else None, grad
        )
    else:
        teacher = Transform(1.0, 20.0 if opts.get("t_cap") else None)
        div = DivergenceParams(tf, teacher, opts["beta"])
        xt = torch.empty(ROWS, vocab, dtype=opts.get("teacher", dtype))
        valid = torch.empty(ROWS, dtype=torch.bool) if opts.get("valid") else None
        coef = rows if grad is not None else None
        lp.divergence_rows(x, xt, inv_temp, div, valid, coef, grad)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the arguments."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _launch(launcher: str, dtype: torch.dtype, opts: dict) -> tuple:
    """``(kernel, args, kwargs)``: the one launch ``launcher`` makes."""
    from xent._engine import triton_logprob as lp

    launches: list = []
    kernels = {name: getattr(lp, name) for name in KERNELS}
    for name, kernel in kernels.items():
        setattr(lp, name, _Recorder(kernel, launches))
    try:
        _call_launcher(launcher, dtype, opts)
    finally:
        for name, kernel in kernels.items():
            setattr(lp, name, kernel)
    assert len(launches) == 1, launches
    return launches[0]


def _compile_one(job: tuple[str, int], workdir: str) -> tuple[str, dict]:
    name, arch = job
    launcher, dtype, opts = next(v[1:] for v in VARIANTS if v[0] == name)
    kernel, args, kwargs = _launch(launcher, dtype, opts)
    facts = compile_facts(kernel, arch, args, kwargs, Path(workdir))
    dtypes = [str(a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args]
    return f"{name}-sm{arch}", {**facts, "launch": f"{kernel.__name__} {dtypes} {kwargs}"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every (variant, arch) compiled in a fresh process, with the interpreter off."""
    return compile_in_fresh_process(__file__, tmp_path_factory.mktemp("triton-logprob-compile"))


# Spills ptxas makes today, each a strict xfail: it fails the day the spill goes.
KNOWN_SPILLS = {
    ("kl-bf16-grad", 100): "ptxas for sm_100a (with Triton's --regAllocOptLevel=2) holds the "
    "forward KL's gradient pass to 80 registers and spills 8 bytes",
}
CASES = [
    pytest.param(
        *v,
        arch,
        id=f"{v[0]}-sm{arch}",
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_SPILLS[v[0], arch])]
        if (v[0], arch) in KNOWN_SPILLS
        else [],
    )
    for v in VARIANTS
    for arch in ARCHS
]


@pytest.mark.parametrize(("name", "launcher", "dtype", "opts", "arch"), CASES)
def test_kernel_compiles_for_gpu(compiled, name, launcher, dtype, opts, arch):
    facts = compiled[f"{name}-sm{arch}"]
    assert "error" not in facts, facts.get("error")
    assert facts["REG"] > 0
    if dtype != torch.float64:
        assert facts["LOCAL"] == 0 and facts["STACK"] == 0, facts  # no register spills
        assert facts["ex2_approx"], facts
    assert facts["int64_offsets"], facts
    if opts.get("vocab", VOCAB) % 16 == 0:  # Triton's specialisation proves whole vectors
        assert facts["widest_load"] == 16, facts


def test_variants_are_distinct(compiled):
    """Each variant is its own compile: no two record the same launch of the same kernel."""
    seen = {f["launch"] for key, f in compiled.items() if key.endswith("-sm90")}
    assert len(seen) == len(VARIANTS), seen


if __name__ == "__main__":
    import json
    import sys

    jobs = [(v[0], arch) for v in VARIANTS for arch in ARCHS]
    out = Path(sys.argv[1])
    out.write_text(json.dumps(compile_all(_compile_one, jobs, out.parent)))
