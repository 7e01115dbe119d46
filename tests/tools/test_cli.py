"""The xent command line: --version, --help and a tiny `xent bench` run end to end."""

from __future__ import annotations

import csv
import json

from cli_helpers import run_cli, run_subprocess

import xent
from xent.tools import bench
from xent.tools.cli import build_parser


def test_version_and_help():
    out = run_subprocess("--version")  # the one run of the console entry point's process
    assert out.returncode == 0 and out.stdout.strip() == f"xent {xent.__version__}"
    out = run_cli("--help")
    assert out.returncode == 0 and "bench" in out.stdout


def test_bench_ce_tiny_writes_table_json_csv_and_plot(tmp_path):
    out = run_cli(
        "bench",
        "ce",
        "-n",
        "64",
        "-c",
        "100",
        "--repeat",
        "2",
        "--warmup",
        "1",
        "--variants",
        "xent,torch",
        "--json",
        str(tmp_path / "r.json"),
        "--csv",
        str(tmp_path / "r.csv"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert out.returncode == 0, out.stderr
    assert "xent bench ce" in out.stdout and "torch" in out.stdout
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in rows] == ["xent", "torch"]
    for r in rows:
        assert r["total_min_s"] > 0 and r["total_min_s"] <= r["total_median_s"]
        assert len(r) > 10 and r["shape"] == "N=64 C=100"
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
    assert rows[0]["speedup_of_xent"] == 1.0
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["xent", "torch"]
    assert float(table[1]["total_min_s"]) == rows[1]["total_min_s"]
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_lce_measures_without_memory_in_process(capsys):
    args = build_parser().parse_args(
        [
            "bench",
            "lce",
            "-n",
            "32",
            "--hidden",
            "8",
            "-c",
            "50",
            "--repeat",
            "1",
            "--warmup",
            "1",
            "--variants",
            "xent,torch",
            "--no-memory",
        ]
    )
    assert bench.run(args) == 0
    assert "xent bench lce" in capsys.readouterr().out


def test_memory_probe_sees_the_gradient():
    cfg = bench.Config(case="ce", n=512, c=4096, variants=["xent"], warmup=1)
    extra = bench._memory_in_subprocess(cfg, "xent")
    # One fp32 gradient of 512 × 4096 is 8 MiB; xent needs about that, not the 3× of eager.
    assert extra is not None and 7 * 2**20 <= extra <= 14 * 2**20
    eager = bench._memory_in_subprocess(cfg, "torch")
    assert eager is not None and eager > 2 * extra
