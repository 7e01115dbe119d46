#!/usr/bin/env bash
# The GPU run, in one go (under 8 minutes on an H100/H200: each step has a limit, 7.8 min in all): the CUDA tests, then `xent bench` on
# CUDA against torch eager, torch.compile, torch's chunked F.linear_cross_entropy, Liger-Kernel and
# cut-cross-entropy, then a small sweep of the Triton kernel's block/occupancy constants.
#
#   cross-entropy         N = 8192, V = 128256, bf16
#   linear cross-entropy  N = 8192, H = 4096, V = 128256, bf16
#
# Usage: bash benchmarks/run_gpu.sh [results-folder]     (default benchmarks/results)
#
# xent runs from this checkout's src/ (nothing is installed). The peers are installed from wheels
# in .whl/ when that folder exists, else skipped with a message; wheels for a machine that cannot
# reach a registry are fetched beforehand, elsewhere, with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# (both are pure Python and need only torch and triton). Every step has its own time limit and a
# failing step does not stop the next: what each one printed lands in the results folder, named
# after the GPU (at most 7 files: log, two JSON and two text tables, the sweep, one plot).
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
# torch.compile's artifacts are shared with the memory probes' subprocesses (compiled once).
scratch=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$scratch/inductor}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$scratch/peers" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$scratch/peers"
else
    echo "no .whl/ folder: Liger-Kernel and cut-cross-entropy are skipped"
fi

gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
    echo "no CUDA device visible to torch"
    exit 1
}
log="$out/$gpu-run.log"
step() {  # step SECONDS NAME COMMAND...: run with a limit, everything into the log
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step 30 environment bash -c "nvidia-smi; $py -c 'import sys, torch, triton; \
print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__); \
p = torch.cuda.get_device_properties(0); \
print(p.name, p.multi_processor_count, \"SMs\", p.L2_cache_size >> 20, \"MiB L2\")'"

step 150 "CUDA tests" "$py" -m pytest -q -p no:cacheprovider --durations=10 \
    tests/engine tests/test_fused.py

# Which peers are importable here (a missing one is left out, with a message).
variants() {
    "$py" - "$1" <<'EOF'
import importlib.util, sys
import torch.nn.functional as F
case = sys.argv[1]
have = {
    "liger": importlib.util.find_spec("liger_kernel") is not None,
    "cce": importlib.util.find_spec("cut_cross_entropy") is not None,
    "torch.chunked": hasattr(F, "linear_cross_entropy"),
}
wanted = {
    "ce": ["xent", "xent[torch]", "torch", "torch.compile", "liger"],
    "lce": ["xent", "torch", "torch.compile", "torch.chunked", "liger", "cce"],
}[case]
for v in wanted:
    if not have.get(v, True):
        print(f"skipping {v}: not installed here", file=sys.stderr)
print(",".join(v for v in wanted if have.get(v, True)))
EOF
}

ce="$gpu-ce-N8192-V128256-bf16"
step 120 "bench ce" "$py" -m xent bench ce -n 8192 -c 128256 --dtype bfloat16 --device cuda \
    --variants "$(variants ce)" --json "$out/$ce.json" --plot "$out/$ce.png"
sed -n '/^=== bench ce (/,/^=== bench ce: exit/p' "$log" >"$out/$ce.txt"

lce="$gpu-lce-N8192-H4096-V128256-bf16"
step 150 "bench lce" "$py" -m xent bench lce -n 8192 --hidden 4096 -c 128256 --dtype bfloat16 \
    --device cuda --variants "$(variants lce)" --json "$out/$lce.json"
sed -n '/^=== bench lce (/,/^=== bench lce: exit/p' "$log" >"$out/$lce.txt"

# The Triton kernel's constants, swept at the cross-entropy shape: forward+backward time and the
# bandwidth for the 4 bytes per logit a read-once design moves (bf16 read + bf16 gradient write).
step 45 "sweep" "$py" - "$out/$gpu-ce-sweep.txt" <<'EOF'
import sys
import torch, triton
import xent, xent._engine.triton_rows as k
n, v = 8192, 128256
x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
t = torch.randint(0, v, (n,), device="cuda")
lines = []
for max_block, warps, share, per_sm in [
    (4096, 16, 0.5, 4), (4096, 8, 0.5, 4), (8192, 16, 0.5, 4), (2048, 8, 0.5, 4),
    (4096, 16, 1.0, 4), (4096, 16, 4.0, 8), (4096, 16, 100.0, 16),
]:
    k.MAX_BLOCK, k.WARPS, k.L2_SHARE, k.PROGRAMS_PER_SM = max_block, {max_block: warps}, share, per_sm
    def step():
        x.grad = None
        xent.cross_entropy(x, t).backward()
    ms = triton.testing.do_bench(step, warmup=5, rep=40)
    line = (f"MAX_BLOCK={max_block} warps={warps} L2_SHARE={share} PROGRAMS_PER_SM={per_sm}: "
            f"{ms:.3f} ms, {4 * n * v / (ms * 1e-3) / 1e9:.0f} GB/s")
    print(line)
    lines.append(line)
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
echo "results in $out:"
ls -l "$out"
