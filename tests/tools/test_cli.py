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


def _bad_calls(tmp_path):
    """``(arguments, words the one error line must hold)`` for every kind of mistake."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    under_a_file = str(a_file / "sub")
    ok = ("--logits", "[[1, 2, 3]]")
    return [
        (("explain", "--logits", '"abc"', "--target", "[0]"), ["--logits", '"abc"']),
        (("explain", "--logits", "[1, 2", "--target", "[0]"), ["not a JSON list", "[1, 2"]),
        (("explain", "--logits", "[[1, 2], [3]]", "--target", "[0, 1]"), ["[[1, 2], [3]]"]),
        (("explain", "--logits", "[]", "--target", "[]"), ["no numbers", "[]"]),
        (("explain", *ok, "--target", "[true]"), ["--target", "[true]"]),
        (("explain", *ok, "--target", "[5]"), ["Target 5"]),
        (("explain", *ok, "--target", "[0, 1]"), ["batch_size (2)"]),
        (("explain", *ok, "--target", "[[0.5, 0.5]]"), ["(1, 2)"]),
        (("explain", *ok, "--target", "[0]", "--weight", "[1, 2]"), ["shape: [2]"]),
        (("explain", *ok, "--target", "[0]", "--weight", '{"a": 1}'), ["--weight"]),
        (("explain", *ok, "--target", "[0]", "--label-smoothing", "2"), ["'2'"]),
        (("explain", *ok, "--target", "[0]", "--label-smoothing", "x"), ["'x'"]),
        (("explain", *ok, "--target", "[0]", "--ignore-index", "x"), ["'x'"]),
        (("explain", "--logits", "1", "--target", "0"), ["0-d"]),
        (("explain", "--binary", "--logits", "[1, 2, 3]", "--target", "[0, 1]"), ["(2,)"]),
        (("explain", "--target", "[0]"), ["--logits"]),
        (("explain", "--reduction", "avg"), ["'avg'"]),
        (("plot", "--out", under_a_file), [under_a_file]),
        (("plot", "--out", str(a_file)), [str(a_file)]),
        (("bench", "nope"), ["'nope'"]),
        (("bench", "ce", "-n", "0"), ["-n", "'0'"]),
        (("bench", "ce", "-n", "x"), ["'x'"]),
        (("bench", "ce", "-c", "-3"), ["'-3'"]),
        (("bench", "ce", "--hidden", "1.5"), ["'1.5'"]),
        (("bench", "ce", "--repeat", "0"), ["--repeat", "'0'"]),
        (("bench", "ce", "--warmup", "-1"), ["--warmup", "'-1'"]),
        (("bench", "ce", "--ignore-frac", "1.5"), ["'1.5'"]),
        (("bench", "ce", "--ignore-frac", "nan"), ["'nan'"]),
        (("bench", "ce", "--dtype", "int8"), ["'int8'"]),
        (("bench", "ce", "--device", "gpu"), ["'gpu'"]),
        (("bench", "ce", "--variants", "xent,foo"), ["'foo'"]),
        (("bench", "ce", "--json", under_a_file + "/r.json"), ["--json", under_a_file]),
        (("bench", "ce", "--csv", str(tmp_path)), ["--csv", str(tmp_path)]),
        (("bench", "ce", "--plot", under_a_file + "/r.png"), ["--plot", under_a_file]),
        (("demo", "--steps", "0"), ["--steps", "'0'"]),
        (("demo", "--batch", "-2"), ["--batch", "'-2'"]),
        (("demo", "--vocab", "abc"), ["--vocab", "'abc'"]),
        (("demo", "--lr", "nan"), ["--lr", "'nan'"]),
        (("demo", "--lr", "-1"), ["--lr", "'-1'"]),
        (("demo", "--max-files", "0"), ["--max-files", "'0'"]),
        (("demo", "--device", "tpu9"), ["'tpu9'"]),
        (("demo", "--out", under_a_file), ["--out", under_a_file]),
        (("nosuch",), ["'nosuch'"]),
    ]


def test_every_command_line_error_is_one_line_naming_the_value(tmp_path):
    calls = _bad_calls(tmp_path)
    for args, words in calls:
        out = run_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode not in (0, None), (args, out.stdout)
        assert len(lines) == 1 and "Traceback" not in out.stderr, (args, out.stderr)
        prefix = "xent: error:" if args[0] == "nosuch" else f"xent {args[0]}: error:"
        assert lines[0].startswith(prefix), (args, lines[0])
        for word in words:
            assert word in lines[0], (args, word, lines[0])
    assert len(calls) > 40


def test_an_unexpected_failure_is_one_line_too(monkeypatch):
    def broken(args):
        raise KeyError("a\nb")

    monkeypatch.setattr(bench, "run", broken)
    out = run_cli("bench")
    assert out.returncode == 1 and out.stderr == "xent bench: error: KeyError: 'a\\nb'\n"
