"""The Triton kernels compiled ahead of time for real GPUs, without one.

Triton's wheel carries NVIDIA's assembler, so each variant the launchers produce is compiled
here to a cubin for sm_80 (A100), sm_90a (H100/H200) and sm_100a (B200), and its code is read:
no register spills outside fp64, int64 row offsets, fast ``ex2.approx`` exponentials and 16-byte
vector loads in the mask-free main loop. Also: the variant a launch picks does not depend on
pointer alignment or integer values (so chunk slices reuse one compiled kernel). Skips only
where the installed Triton has no NVIDIA backend.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if "nvidia" not in __import__("triton.backends", fromlist=["backends"]).backends:
    pytest.skip("the installed Triton has no NVIDIA backend", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

ARCHS = [80, 90, 100]  # sm_80, sm_90a, sm_100a (Triton adds the "a" from 90 on)
ROWS = 8


def _specialise(kernel, target, args, kwargs):
    """What a launch of ``kernel(*args, **kwargs)`` would compile: the launcher's own binder."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return backend, bound, specialization, options


def _compile(kernel, arch, args, kwargs):
    target = GPUTarget("cuda", arch, 32)
    backend, bound, spec, options = _specialise(kernel, target, args, kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _facts(compiled, workdir: Path) -> dict:
    """What the tests assert on: resource usage from the cubin, features of the PTX."""
    path = workdir / f"{compiled.metadata.hash}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    tool = triton.knobs.nvidia.cuobjdump.path
    out = subprocess.run(
        [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    ptx = compiled.asm["ptx"]
    return {
        **{k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)},
        "int64_offsets": "mul.lo.s64" in ptx or "mul.wide.s32" in ptx,
        "ex2_approx": "ex2.approx" in ptx,
        # The widest global load, in bytes (v4.b32 and v2.b64 are 16-byte vectors).
        "widest_load": max(
            [int(n) * int(b) // 8 for n, b in re.findall(r"ld\.global[\w.:]*\.v(\d)\.b(\d+)", ptx)]
            or [0]
        ),
        "f32_compare": bool(re.search(r"setp\.\w+\.f32", ptx)),
        # The vector tail: masked, yet whole vectors (the mask is constant per vector).
        "masked_vector_loads": bool(re.search(r"@%p\d+ ld\.global[\w.:]*\.v(2|4)\.b", ptx)),
        # Pass 1 keeps the row in L2 for pass 2; pass 2 and the gradient stream through.
        "evict_last_loads": bool(re.search(r"ld\.global\.L1::evict_last", ptx)),
        "evict_first_stores": bool(re.search(r"st\.global\.L1::evict_first", ptx)),
    }


def compile_facts(kernel, arch: int, args, kwargs, workdir: Path) -> dict:
    """:func:`_facts` of ``kernel(*args, **kwargs)`` compiled for ``arch``, or the error."""
    try:
        compiled = _compile(kernel, arch, args, kwargs)
    except Exception as e:  # recorded, and asserted on by the test of this variant
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    return _facts(compiled, workdir)


def compile_all(compile_one, jobs: list, workdir: Path) -> dict:
    """``dict(compile_one(job, workdir) for job in jobs)``, in two worker processes."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(partial(compile_one, workdir=str(workdir)), jobs))


def compile_in_fresh_process(script: str, workdir: Path) -> dict:
    """Run ``script`` (a test module whose ``__main__`` compiles its variants and writes their
    facts as JSON to the path it is given) in a fresh process and return the facts. With the
    interpreter on (as the other test modules need it without a GPU) Triton's own library
    functions cannot be compiled, so the compiles run with it off, into an empty cache so that
    each one is real."""
    import json
    import sys

    import xent  # an import error fails here, never skips

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(workdir / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    src = str(Path(xent.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = workdir / "facts.json"
    proc = subprocess.run(
        [sys.executable, script, str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _warps(block: int) -> int:
    """The warps the launcher runs ``block`` columns with."""
    import xent._engine.triton_rows as kernels

    return next(w for limit, w in sorted(kernels.WARPS.items()) if block <= limit)


def _ce_args(
    dtype,
    *,
    grad_dtype=None,
    vocab=50257,
    weight=False,
    softcap=False,
    smooth=False,
    lse=False,
    grad=True,
    block=4096,
    n_rows=ROWS,
):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.empty(ROWS, vocab, dtype=dtype)
    g = torch.empty(ROWS, vocab, dtype=grad_dtype or dtype)
    f = torch.empty(ROWS, dtype=acc)
    w = torch.empty(vocab, dtype=acc)
    args = (
        x,
        vocab,
        torch.empty(ROWS, dtype=torch.long),
        w if weight else x,
        w if weight else x,
        f[:1] if weight else x,
        f,
        f,
        f,
        f,
        g if grad else None,
        vocab,
        torch.empty(3, dtype=acc),
        n_rows,
        vocab,
        -100,
        0,
        vocab,
    )
    kwargs = dict(
        HAS_WEIGHT=weight,
        HAS_SOFTCAP=softcap,
        SMOOTH=smooth,
        HAS_STATS=lse,
        WRITE_GRAD=grad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK=block,
        HEAD=16 // x.element_size(),
        num_warps=_warps(block),
    )
    return args, kwargs


def _prob_args(dtype, *, weight=False, softcap=False, lse=False, grad=True, qgrad=False):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vocab = 50257
    x = torch.empty(ROWS, vocab, dtype=dtype)
    f = torch.empty(ROWS, dtype=acc)
    args = (
        x,
        vocab,
        torch.empty_like(x),
        vocab,
        torch.empty(vocab, dtype=acc) if weight else x,
        f,
        f,
        f,
        f,
        torch.empty_like(x) if grad else None,
        vocab,
        torch.empty_like(x) if qgrad else None,
        vocab,
        torch.empty(3, dtype=acc),
        ROWS,
        vocab,
    )
    kwargs = dict(
        HAS_WEIGHT=weight,
        HAS_SOFTCAP=softcap,
        HAS_STATS=lse,
        WRITE_GRAD=grad,
        WRITE_QGRAD=qgrad,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK=2048,
        HEAD=16 // x.element_size(),
        num_warps=_warps(2048),
    )
    return args, kwargs


ALL_ON = dict(weight=True, softcap=True, smooth=True)
# (name, kernel, dtype, options): every dtype, every flag, both kernels, both block sizes.
VARIANTS = [
    ("ce-fp32-grad", "_ce_row_kernel", torch.float32, {}),
    ("ce-bf16-grad", "_ce_row_kernel", torch.bfloat16, {}),
    ("ce-fp16-grad", "_ce_row_kernel", torch.float16, {}),
    ("ce-fp64-grad", "_ce_row_kernel", torch.float64, {}),
    ("ce-fp8e4m3-grad", "_ce_row_kernel", torch.float8_e4m3fn, {}),
    ("ce-fp8e5m2-grad", "_ce_row_kernel", torch.float8_e5m2, {}),
    ("ce-bf16-forward-only", "_ce_row_kernel", torch.bfloat16, dict(grad=False)),
    ("ce-bf16-all-options", "_ce_row_kernel", torch.bfloat16, ALL_ON),
    ("ce-fp32-all-options", "_ce_row_kernel", torch.float32, ALL_ON),
    ("ce-bf16-backward-from-lse", "_ce_row_kernel", torch.bfloat16, dict(lse=True, smooth=True)),
    ("ce-bf16-block1024", "_ce_row_kernel", torch.bfloat16, dict(block=1024, vocab=1000)),
    # More rows than int32 holds: the row loop runs in int64.
    ("ce-bf16-rows-past-2-31", "_ce_row_kernel", torch.bfloat16, dict(n_rows=2**31 + 1)),
    ("ce-fp32-logits-bf16-grad", "_ce_row_kernel", torch.float32, dict(grad_dtype=torch.bfloat16)),
    ("prob-fp32-both-grads", "_ce_prob_row_kernel", torch.float32, dict(qgrad=True)),
    (
        "prob-bf16-all-options",
        "_ce_prob_row_kernel",
        torch.bfloat16,
        dict(weight=True, softcap=True, qgrad=True),
    ),
    ("prob-fp64-backward-from-lse", "_ce_prob_row_kernel", torch.float64, dict(lse=True)),
    ("scale-bf16", "_scale_kernel", torch.bfloat16, {}),
    ("scale-fp32", "_scale_kernel", torch.float32, {}),
]


def _variant_args(kernel_name, dtype, opts):
    if kernel_name == "_ce_row_kernel":
        return _ce_args(dtype, **opts)
    if kernel_name == "_ce_prob_row_kernel":
        return _prob_args(dtype, **opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.empty(ROWS * 1001, dtype=dtype)
    return (g, torch.empty(1, dtype=acc), g.numel()), dict(ACC=tl.float32, BLOCK=4096, num_warps=4)


def _compile_one(job: tuple[str, str, int], workdir: str) -> tuple[str, dict]:
    import xent._engine.triton_rows as kernels  # in the worker: compiled, not interpreted

    name, kernel_name, arch = job
    _, dtype, opts = next(v[1:] for v in VARIANTS if v[0] == name)
    args, kwargs = _variant_args(kernel_name, dtype, opts)
    return f"{name}-sm{arch}", compile_facts(
        getattr(kernels, kernel_name), arch, args, kwargs, Path(workdir)
    )


def _alignment_facts() -> dict:
    """Specialisation keys of launches on differently aligned and sized slices."""
    import xent._engine.triton_rows as kernels

    target = GPUTarget("cuda", 90, 32)
    base = torch.empty(64, 50257, dtype=torch.bfloat16)
    t, f = torch.empty(64, dtype=torch.long), torch.empty(64)
    opts = torch.empty(3)
    kw = dict(
        HAS_WEIGHT=False,
        HAS_SOFTCAP=False,
        SMOOTH=False,
        HAS_STATS=False,
        WRITE_GRAD=True,
        ACC=tl.float32,
        BLOCK=4096,
        HEAD=8,
    )

    def key(kernel, rows, vocab):
        x = base[rows, :vocab]
        args = (
            x,
            x.stride(0),
            t[rows],
            x,
            x,
            x,
            f[rows],
            f[rows],
            f[rows],
            f[rows],
            x,
            x.stride(0),
            opts,
            rows.stop - rows.start,
            vocab,
            -100,
            0,
            vocab,
        )
        return str(_specialise(kernel, target, args, dict(kw, num_warps=8))[2])

    ours = kernels._ce_row_kernel
    plain = triton.JITFunction(ours.fn)  # the same kernel with Triton's default specialisation
    return {
        "ours": [key(ours, r, v) for r, v in CASES],
        "plain": [key(plain, r, v) for r, v in CASES],
    }


# Row slices and vocabulary sizes: aligned; off 16-byte alignment; V divisible by 16; one row.
CASES = [(slice(0, 16), 50257), (slice(3, 16), 50257), (slice(1, 17), 50256), (slice(0, 1), 50257)]


def _worker(out: str) -> None:
    """Compile every (variant, arch) in two processes; write the facts as JSON to ``out``."""
    import json

    jobs = [(v[0], v[1], arch) for v in VARIANTS for arch in ARCHS]
    results = compile_all(_compile_one, jobs, Path(out).parent)
    results["alignment"] = _alignment_facts()
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every variant compiled in a fresh process (:func:`compile_in_fresh_process`)."""
    return compile_in_fresh_process(__file__, tmp_path_factory.mktemp("triton-compile"))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize(
    ("name", "kernel_name", "dtype", "opts"), VARIANTS, ids=[v[0] for v in VARIANTS]
)
def test_kernel_compiles_for_gpu(compiled, arch, name, kernel_name, dtype, opts):
    facts = compiled[f"{name}-sm{arch}"]
    if dtype == torch.float8_e4m3fn and arch < 89:
        # What the launcher refuses with a clear TypeError (see test_triton_rows.py).
        assert "fp8e4nv not supported" in facts.get("error", ""), facts
        return
    assert "error" not in facts, facts.get("error")
    assert facts["REG"] > 0
    if dtype != torch.float64:
        assert facts["LOCAL"] == 0 and facts["STACK"] == 0, facts  # no register spills
    if kernel_name == "_scale_kernel":
        assert facts["f32_compare"]  # the early return when the factor is 1
        return
    assert facts["int64_offsets"]
    assert facts["evict_last_loads"] or opts.get("lse"), facts  # from a given lse: no pass 1
    assert facts["evict_first_stores"] or not opts.get("grad", True), facts
    if dtype != torch.float64:
        assert facts["ex2_approx"]
    # The mask-free main loop loads whole vectors: 16 bytes, or all a thread's elements of a
    # block when they are fewer (fp8: 8 of them).
    args, kwargs = _variant_args(kernel_name, dtype, opts)
    per_thread = kwargs["BLOCK"] // (32 * kwargs["num_warps"]) * args[0].element_size()
    assert facts["widest_load"] >= min(16, per_thread), facts
    assert facts["masked_vector_loads"], facts


def test_variants_do_not_depend_on_alignment_or_sizes(compiled):
    """Chunk slices at any offset, any row count and any vocabulary size reuse one variant,
    where Triton's default specialisation would compile a new one for each."""
    ours, plain = compiled["alignment"]["ours"], compiled["alignment"]["plain"]
    assert len(set(ours)) == 1, ours
    assert len(set(plain)) == len(plain), plain


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1])
