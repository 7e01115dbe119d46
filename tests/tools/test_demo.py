"""`xent demo` at a tiny size: both runs agree, the plot and the results are written."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image

from xent.tools import demo


def test_corpus_is_the_standard_library():
    ids, vocab = demo.build_corpus(500, max_files=5)
    assert vocab[0] == "<unk>" and len(vocab) == 500
    assert ids.dtype.is_floating_point is False and ids.numel() > 1000
    assert "def" in vocab and "import" in vocab


def test_tiny_demo_runs_and_curves_agree(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xent",
            "demo",
            "--steps",
            "4",
            "--batch",
            "64",
            "--vocab",
            "3000",
            "--max-files",
            "30",
            "--embed",
            "8",
            "--hidden",
            "16",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "they agree" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    fused, eager = results
    assert len(fused["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(fused["losses"], eager["losses"], strict=True)) < 1e-4
    assert fused["losses"][-1] < fused["losses"][0]
    assert fused["tokens_per_second"] > 0 and eager["tokens_per_second"] > 0
    image = matplotlib.image.imread(tmp_path / "loss_curves.png")
    assert image.shape[1] > 600 and image[..., :3].std() > 0.05
