#!/usr/bin/env bash
# The GPU benchmarks: cross-entropy and linear cross-entropy against torch eager, torch.compile,
# torch's chunked F.linear_cross_entropy, Liger-Kernel and cut-cross-entropy, at the shapes large
# language models train with. Needs a CUDA GPU, xent installed with the [gpu] extra, and the peers:
#     pip install liger-kernel cut-cross-entropy
# Usage: bash benchmarks/run_gpu.sh [results-folder]
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
xent bench ce -n 8192 -c 128256 --dtype bfloat16 --device cuda \
    --json "$out/$gpu-ce-N8192-V128256-bf16.json" --plot "$out/$gpu-ce-N8192-V128256-bf16.png"
xent bench lce -n 8192 --hidden 4096 -c 128256 --dtype bfloat16 --device cuda \
    --json "$out/$gpu-lce-N8192-H4096-V128256-bf16.json"
xent bench lce -n 8192 --hidden 2304 -c 256000 --dtype bfloat16 --device cuda \
    --json "$out/$gpu-lce-N8192-H2304-V256000-bf16.json"
