"""Peak memory and step time of a small Llama-shaped model: stock forward against xent.hf.patch.

    python benchmarks/hf_step.py                      # 32k and 128k vocabularies, CPU
    python benchmarks/hf_step.py --vocab 32000 --repeats 5

One training step is a forward with labels and a backward (no optimizer), float32. Each
(vocabulary, variant) pair runs in a fresh subprocess, so that one variant's freed memory never
hides in another's baseline: the child builds the model (fixed seed), runs one warm-up step,
resets the peak resident size (Linux's VmHWM), runs one step and reports the peak above its
resident size before that step, then times ``--repeats`` further steps. Gradients are dropped
(``set_to_none``) before each step, so every step allocates them afresh and the peak includes
them, for both variants alike. Results go to ``benchmarks/results/`` as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def child(spec: dict) -> dict:
    """Measure one variant in this process (called in a fresh subprocess)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    import xent.hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=4 * spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=spec["seq"],
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if spec["variant"] == "xent":
        xent.hf.patch(model, chunk_size=spec["chunk_size"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return time.perf_counter() - start, loss.item()

    step()  # warm-up: first-call costs and lazily allocated buffers
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_kib("VmRSS")
    _, loss = step()
    peak = (_rss_kib("VmHWM") - base) * 1024
    times = [step()[0] for _ in range(spec["repeats"])]
    return {
        **spec,
        "loss": loss,
        "peak_bytes": peak,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        # glibc then returns every freed block of 64 KiB or more to the system at once, so the
        # resident size follows the live tensors.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _name(row: dict) -> str:
    if row["variant"] == "stock":
        return "stock"
    chunk = row["chunk_size"]
    return "xent.hf.patch" + ("" if chunk is None else f" (chunk_size={chunk})")


def table(rows: list[dict]) -> str:
    lines = [
        "| vocabulary | variant | peak memory (MiB) | step time (s, min / median) | loss |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {_name(r)} | {r['peak_bytes'] / 2**20:,.0f} | "
            f"{r['step_s_min']:.2f} / {r['step_s_median']:.2f} | {r['loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-size",
        type=lambda v: None if v == "auto" else int(v),
        nargs="+",
        default=[None],
        help="tokens per chunk of xent's loss, or auto (xent's own choice, the default)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    for vocab in args.vocab:
        for variant, chunk in [("stock", None)] + [("xent", c) for c in args.chunk_size]:
            spec = {
                "vocab": vocab,
                "variant": variant,
                "chunk_size": chunk,
                "hidden": args.hidden,
                "layers": args.layers,
                "seq": args.seq,
                "batch": args.batch,
                "repeats": args.repeats,
            }
            rows.append(run(spec))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    name = f"cpu-hf-step-llama-H{args.hidden}-L{args.layers}-T{args.seq}-B{args.batch}"
    machine = f"{platform.machine()} {os.cpu_count()} cores, {rows[0]['threads']} threads"
    header = (
        f"Llama-shaped model (hidden {args.hidden}, {args.layers} layers, batch {args.batch} × "
        f"{args.seq} tokens, float32), one forward+backward, on CPU ({machine}); torch "
        f"{rows[0]['torch']}, transformers {rows[0]['transformers']}."
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(header + "\n\n" + table(rows) + "\n")
    print(header)
    print(table(rows))


if __name__ == "__main__":
    main()
