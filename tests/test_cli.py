"""The ``fusedopt`` command: ``check`` and ``bench`` at tiny sizes (CPU: through the interpreter).

Most tests call ``fusedopt.__main__.main`` in this process (conftest has set
``TRITON_INTERPRET=1`` without a GPU, so nothing is re-run); the tests of the re-run itself, of
``--help`` and of importing fusedopt start a fresh Python without the variable.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedopt
from fusedopt import floors, testing
from fusedopt import functional as FF
from fusedopt.__main__ import main
from fusedopt.cli import bench, bench_amp, bench_losses, bench_optim, check
from fusedopt.optim import _quantize

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
# A 1-layer GPT-shaped param list (16 tensors, ~700 elements) and 5 x 37 loss inputs.
TINY = ["--steps", "2", "--width", "8", "--layers", "1", "--vocab", "13", "--rows", "5", "--classes", "37"]
TINY += ["--no-progress"]


def fresh_python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python args`` in a new process whose environment has no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# The command line ----------------------------------------------------------------------------


def test_help(capsys):
    run = fresh_python("-m", "fusedopt", "--help")
    assert run.returncode == 0, run.stderr
    assert "check" in run.stdout and "bench" in run.stdout and "TRITON_INTERPRET=1" in run.stdout
    for command, flags in (
        ("check", ["--optimizers", "--losses", "--dtypes", "--steps", "--width", "--no-progress"]),
        ("bench", ["--suites", "--layouts", "--dtypes", "--impls", "--smoke", "--out", "--budget"]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), text


def test_importing_fusedopt_leaves_the_environment_alone():
    code = (
        "import os, torch, triton\n"
        "before = dict(os.environ)\n"
        "import fusedopt, fusedopt.functional, fusedopt.nn, fusedopt.__main__\n"
        "import fusedopt.cli.check, fusedopt.cli.bench\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "assert 'TRITON_INTERPRET' not in os.environ\n"
        "from fusedopt import _multi_tensor\n"
        "assert not _multi_tensor.INTERPRET\n"
    )
    run = fresh_python("-c", code)
    assert run.returncode == 0, run.stderr


def test_check_command_reruns_itself_with_the_interpreter(tmp_path):
    argv = ["--optimizers", "adam", "--losses", "cross_entropy", "--out", str(tmp_path), *TINY]
    run = fresh_python("-m", "fusedopt", "check", *argv)
    assert run.returncode == 0, run.stdout + run.stderr
    if not CUDA:
        assert "re-running in a child process with TRITON_INTERPRET=1" in run.stdout
        assert "Triton kernels through the CPU interpreter" in run.stdout
    lines = [line for line in run.stdout.splitlines() if line.startswith(("FusedAdam ", "cross_entropy "))]
    adam = sum(c.group == "adam" for c in testing.OPTIM_CASES)
    cross_entropy = sum(c.name == "cross_entropy" for c in testing.LOSS_CASES)
    assert (adam, cross_entropy) == (7, 7)
    assert len(lines) == 2 * (adam + cross_entropy), run.stdout  # fp32 and bf16
    assert all(line.rstrip().endswith("PASS") for line in lines), run.stdout
    assert f"OK: all {2 * (adam + cross_entropy)} checks within tolerance" in run.stdout


# check: passes, and flags what is wrong ------------------------------------------------------


class DriftingSGD(fusedopt.FusedSGD):
    """FusedSGD whose params come out 1 % too large."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1.01)
        return loss


class ForgetfulSGD(fusedopt.FusedSGD):
    """FusedSGD whose momentum buffers decay by 1 % more than they should, params untouched."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for state in self.state.values():
                state["momentum_buffer"].mul_(0.99)
        return loss


def wrong_grad_mse(input, target, **kwargs):
    """MSE with the right value and a gradient 1 % too large."""
    scaled = input * 1.01 - (input * 0.01).detach()
    return FF.mse_loss(scaled, target, **kwargs)


def run_check(
    monkeypatch, capsys, tmp_path, *argv: str, optim=(), losses=(), linear=(), distillation=()
) -> tuple[int, str]:
    monkeypatch.setattr(check, "OPTIM_CASES", [*check.OPTIM_CASES, *optim])
    monkeypatch.setattr(check, "LOSS_CASES", [*check.LOSS_CASES, *losses])
    monkeypatch.setattr(check, "LINEAR_CE_CASES", [*check.LINEAR_CE_CASES, *linear])
    monkeypatch.setattr(check, "DISTILLATION_CASES", [*check.DISTILLATION_CASES, *distillation])
    status = main(["check", *argv, *TINY, "--out", str(tmp_path)])
    return status, capsys.readouterr().out


def verdicts(out: str, name: str) -> list[str]:
    return [line.split()[-1] for line in out.splitlines() if line.startswith(name + " ")]


def test_check_passes(monkeypatch, capsys, tmp_path):
    status, out = run_check(
        monkeypatch,
        capsys,
        tmp_path,
        "--optimizers",
        "sgd",
        "adamw",
        "rmsprop",
        "adagrad",
        "--losses",
        "mean",
        "l1_loss",
    )
    assert status == 0, out
    by_group = {
        g: sum(c.group == g for c in testing.OPTIM_CASES) for g in ("sgd", "adamw", "rmsprop", "adagrad")
    }
    total = 2 * sum(by_group.values()) + 6  # fp32 and bf16; mean: 4 cases, l1_loss: 2
    for name, group in (("FusedSGD", "sgd"), ("FusedAdamW", "adamw"), ("FusedRMSprop", "rmsprop")):
        assert verdicts(out, name) == ["PASS"] * 2 * by_group[group]  # fp32 and bf16
    assert verdicts(out, "FusedAdagrad") == ["PASS"] * 2 * by_group["adagrad"]
    assert verdicts(out, "mean") == ["PASS"] * 4 and verdicts(out, "l1_loss") == ["PASS"] * 2
    assert "momentum_buffer" in out and "max_exp_avg_sq" in out and "err/tol" in out
    assert "square_avg" in out and "grad_avg" in out and "sum" in out
    assert "max_grad_norm=1.0" in out
    assert f"OK: all {total} checks within tolerance" in out
    (csv_path,) = tmp_path.glob("check_*.csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == total and {r["verdict"] for r in rows} == {"PASS"}
    assert {r["kind"] for r in rows} == {"optimizer", "loss"} and all(r["gpu"] and r["ratio"] for r in rows)
    assert rows[0]["param"] and rows[-1]["grad"] and any(r["momentum_buffer"] for r in rows)
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("wrong", [DriftingSGD, ForgetfulSGD])
def test_check_flags_a_wrong_optimizer(monkeypatch, capsys, tmp_path, wrong):
    case = testing.OptimCase(wrong, torch.optim.SGD, dict(lr=0.1, momentum=0.9), group="wrong")
    status, out = run_check(
        monkeypatch, capsys, tmp_path, "--optimizers", "wrong", "sgd", "--losses", optim=[case]
    )
    assert status == 1, out
    assert verdicts(out, wrong.__name__) == ["FAIL", "FAIL"]  # fp32 and bf16
    assert verdicts(out, "FusedSGD") == ["PASS"] * 16  # the real one, in the same run
    assert "FAILED: 2 of 18 checks" in out
    line = next(
        x for x in out.splitlines() if x.startswith(f"FAIL: {wrong.__name__} (lr=0.1 mom=0.9) fp32: worst")
    )
    where = line.split("worst ", 1)[1].split(":")[0]
    # Forgetful's buffers are off while its params are right; Drifting's params are off.
    assert ("state[momentum_buffer]" in where) is (wrong is ForgetfulSGD), line


def test_check_flags_a_wrong_loss_and_an_exception(monkeypatch, capsys, tmp_path):
    def raises(input, target, **kwargs):
        raise RuntimeError("kernel exploded")

    cases = [
        testing.LossCase("wrong_mse", wrong_grad_mse, F.mse_loss, "regression"),
        testing.LossCase("raising_mse", raises, F.mse_loss, "regression"),
    ]
    args = ["--optimizers", "--losses", "wrong_mse", "raising_mse", "mse_loss"]
    status, out = run_check(monkeypatch, capsys, tmp_path, *args, losses=cases)
    assert status == 1, out
    assert verdicts(out, "wrong_mse") == ["FAIL", "FAIL"]
    assert verdicts(out, "raising_mse") == ["ERROR", "ERROR"]
    assert verdicts(out, "mse_loss") == ["PASS"] * 6
    assert "ERROR: raising_mse (defaults) fp32: RuntimeError: kernel exploded" in out
    assert "FAIL: wrong_mse (defaults) bf16: worst grad" in out


def wrong_weight_grad_linear_ce(input, linear_weight, target, *args, **kwargs):
    """Linear cross-entropy with about the right value and a weight gradient 5 % too large."""
    scaled = linear_weight * 1.05 - (linear_weight * 0.05).detach()
    return FF.linear_cross_entropy(input, scaled, target, *args, **kwargs)


# 5 tokens x 8 features -> 37 classes in chunks of 2 rows: three chunks, the last of one row.
LINEAR_TINY = ["--hidden", "8", "--chunk-rows", "2"]


def test_check_linear_cross_entropy_passes(monkeypatch, capsys, tmp_path):
    argv = ["--optimizers", "--losses", "linear_cross_entropy", *LINEAR_TINY, "--dtypes", "fp32", "bf16"]
    status, out = run_check(monkeypatch, capsys, tmp_path, *argv)
    assert status == 0, out
    count = sum(case.name == "linear_cross_entropy" for case in testing.LINEAR_CE_CASES)
    assert count == 6 and verdicts(out, "linear_cross_entropy") == ["PASS"] * 2 * count
    assert "5 tokens x 8 features -> 37 classes in chunks of 2" in out
    assert "vocab/3" in out  # the case in the vocabulary order (blocks of 13 classes)
    assert "bf16: 2·max|torch in bf16 - torch| + 0.00391·max|torch|" in out
    assert f"OK: all {2 * count} checks within tolerance" in out
    (csv_path,) = tmp_path.glob("check_*.csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"linear_ce"} and {r["shape"] for r in rows} == {"5x8x37"}
    for r in rows:
        assert r["verdict"] == "PASS" and 0 <= float(r["ratio"]) <= 1, r
        # the bias gradient is compared where the case has a bias
        fields = ["value", "grad_input", "grad_weight", *(["grad_bias"] if "bias" in r["options"] else [])]
        assert all(r[k] != "" for k in fields), r
    lce = [case for case in testing.LINEAR_CE_CASES if case.name == "linear_cross_entropy"]
    assert {r["options"] for r in rows} == {case.options for case in lce}
    assert any(r["grad_bias"] == "" for r in rows) and any(r["grad_bias"] for r in rows)


def test_check_linear_log_probs_passes(monkeypatch, capsys, tmp_path):
    """The linear log-probs' rows (issue 21): log-probs and entropy stacked as the value, the
    gradients of input, weight (and bias) from random upstream grads of both."""
    argv = ["--optimizers", "--losses", "linear_log_probs", *LINEAR_TINY, "--dtypes", "fp32", "bf16"]
    status, out = run_check(monkeypatch, capsys, tmp_path, *argv)
    assert status == 0, out
    count = sum(case.name == "linear_log_probs" for case in testing.LINEAR_CE_CASES)
    assert count == 2 and verdicts(out, "linear_log_probs") == ["PASS"] * 2 * count
    assert f"linear heads: {count} cases x 2 dtypes" in out and "log_softmax(F.linear(...) / T)" in out
    (csv_path,) = tmp_path.glob("check_*.csv")
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["options"] for r in rows} == {"temperature=0.7 return_entropy bias", "defaults"}
    assert all(r["value"] != "" and r["grad_weight"] != "" and r["verdict"] == "PASS" for r in rows), rows


def test_check_flags_a_wrong_linear_cross_entropy(monkeypatch, capsys, tmp_path):
    def raises(*args, **kwargs):
        raise RuntimeError("chunk exploded")

    cases = [
        testing.LinearCECase("wrong_lce", fused=wrong_weight_grad_linear_ce),
        testing.LinearCECase("raising_lce", dict(reduction="none"), weighted=True, fused=raises),
    ]
    argv = ["--optimizers", "--losses", "wrong_lce", "raising_lce", *LINEAR_TINY, "--dtypes", "fp32", "bf16"]
    status, out = run_check(monkeypatch, capsys, tmp_path, *argv, linear=cases)
    assert status == 1, out
    assert verdicts(out, "wrong_lce") == ["FAIL", "FAIL"]  # fp32 and bf16
    assert verdicts(out, "raising_lce") == ["ERROR", "ERROR"]
    assert "FAIL: wrong_lce (bias) bf16: worst grad_weight[" in out
    assert "ERROR: raising_lce (reduction=none weight bias) fp32: RuntimeError: chunk exploded" in out
    assert "FAILED: 4 of 4 checks" in out


def test_check_linear_distillation_passes_and_flags_a_wrong_one(monkeypatch, capsys, tmp_path):
    """Issue 21: every distillation case (value and the student's gradients against the fp64
    composition) passes; one whose weight gradient is 5 % too large fails in both dtypes, and
    one that raises is an error."""

    def wrong(student_input, student_weight, *args, **kwargs):
        scaled = student_weight * 1.05 - (student_weight * 0.05).detach()
        return FF.linear_distillation_loss(student_input, scaled, *args, **kwargs)

    def raises(*args, **kwargs):
        raise RuntimeError("teacher exploded")

    cases = [
        testing.DistillationCase("wrong_distill", fused=wrong),
        testing.DistillationCase("raising_distill", dict(divergence="jsd"), fused=raises),
    ]
    names = ["linear_distillation_loss", "wrong_distill", "raising_distill"]
    argv = ["--optimizers", "--losses", *names, "--hidden", "8", "--dtypes", "fp32", "bf16"]
    status, out = run_check(monkeypatch, capsys, tmp_path, *argv, distillation=cases)
    assert status == 1, out
    count = len(testing.DISTILLATION_CASES)
    assert count == 4 and verdicts(out, "linear_distillation_loss") == ["PASS"] * 2 * count
    assert (
        verdicts(out, "wrong_distill") == ["FAIL", "FAIL"] and "FAIL: wrong_distill (bias) bf16: worst" in out
    )
    assert "ERROR: raising_distill (divergence=jsd bias) fp32: RuntimeError: teacher exploded" in out
    assert (
        f"linear distillation: {count + 2} cases x 2 dtypes, 5 tokens, a student of 8 and a teacher of 16"
        in out
    )
    assert f"FAILED: 4 of {2 * count + 4} checks" in out
    (csv_path,) = tmp_path.glob("check_*.csv")
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == "linear_distillation_loss"]
    assert {r["kind"] for r in rows} == {"distillation"} and {r["shape"] for r in rows} == {"5x8x37"}
    assert {r["options"] for r in rows} == {case.options for case in testing.DISTILLATION_CASES}


def test_check_compares_every_state_tensor():
    shapes = testing.gpt_shapes(width=8, layers=1, vocab=13)
    case = testing.OptimCase(fusedopt.FusedAdam, torch.optim.Adam, dict(lr=0.01, amsgrad=True))
    result = check.optimizer_result(case, torch.float32, "cuda" if CUDA else "cpu", shapes, steps=2)
    assert result.verdict == "PASS", result
    assert set(result.errors) == {"param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert not result.notes and result.ratio <= 1.0


def test_check_int8_cases_hold_8bit_state():
    """The check's ``state_dtype="int8"`` cases, at its CPU sizes (no GPT-shaped tensor reaches
    the 4,096 elements 8-bit state starts at), hold uint8 codes and their absmax after a step,
    and the check compares them."""
    cases = [c for c in check.OPTIM_CASES if c.kwargs.get("state_dtype") == "int8"]
    assert cases
    size = {flag: cpu for flag, (cpu, _, _) in check.SIZES.items()}
    shapes = testing.gpt_shapes(size["width"], size["layers"], size["vocab"])
    assert max(math.prod(s) for _, s in shapes) < _quantize.MIN_NUMEL  # else this tests nothing new
    created = []

    for case in cases:

        class Recorded(case.fused_cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                created.append(self)

        for dtype in (torch.float32, torch.bfloat16):
            recorded = dataclasses.replace(case, fused_cls=Recorded)
            result = check.optimizer_result(recorded, dtype, "cuda" if CUDA else "cpu", shapes, steps=1)
            assert result.verdict == "PASS", result.explain()
            state = created.pop().state
            codes = [(s, k) for s in state.values() for k, v in s.items() if v.dtype == torch.uint8]
            assert codes, f"{case.id} {dtype}: no 8-bit state"
            assert all(s[_quantize.absmax_key(k)].dtype == torch.float32 for s, k in codes)


# bench ----------------------------------------------------------------------------------------

EXPECTED_COLUMNS = ["gpu", "torch", "triton", "cuda", "timestamp_utc", "suite", "case", "impl", "layout"]
EXPECTED_COLUMNS += ["dtype", "tensors", "numel", "bytes_per_elt", "bytes", "ms", "ms_p20", "ms_p80", "gbps"]
EXPECTED_COLUMNS += [
    "copy_gbps",
    "pct_copy_bw",
    "fusedopt_speedup",
    "peak_extra_mib",
    "graph_ms",
    "graph_note",
    "impl_bytes_per_elt",
]
EXPECTED_COLUMNS += ["status", "note"]
BENCH_TINY = ["--optimizers", "sgd", "adam", "--losses", "mse-64m", "ce-8192x50257", "--dtypes", "fp32"]
BENCH_TINY += ["--no-progress"]


def outputs(folder: Path) -> tuple[list[dict], Path, Path]:
    (csv_path,) = folder.glob("bench_*.csv")
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert set(EXPECTED_COLUMNS) <= set(reader.fieldnames), reader.fieldnames
        rows = list(reader)
    png, md = csv_path.with_suffix(".png"), csv_path.with_suffix(".md")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows, png, md


def test_bench_suites_are_named_with_spaces_or_commas():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).suites == ["optim", "losses", "amp", "host"]
    assert parser.parse_args(["--suites", "optim,amp", "host"]).suites == ["optim", "amp", "host"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--suites", "optim,gpu"])


def test_bench_smoke_writes_csv_and_png(tmp_path, capsys):
    status = main(
        ["bench", "--smoke", "--out", str(tmp_path), "--suites", "optim,losses,amp,host", *BENCH_TINY]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    if not CUDA:
        assert "Timings need a CUDA GPU: nothing is timed here" in out
    assert "byte floor of one optimizer step" in out and "single64m" in out
    assert "bytes of the AMP optimizer phase" in out and "unscale_: grad -> grad + norm: grad" in out
    rows, _, md = outputs(tmp_path)
    suites = {name: [r for r in rows if r["suite"] == name] for name in ("optim", "losses", "amp", "host")}
    assert len(rows) == sum(map(len, suites.values()))
    assert {r["impl"] for r in suites["optim"]} == set(bench_optim.IMPLS)
    assert len(suites["optim"]) == 2 * 5 and len(suites["losses"]) == 2 * 3
    assert {r["impl"] for r in suites["losses"]} == set(bench_losses.IMPLS)
    host_impls = bench_optim.HOST_IMPLS if CUDA else ("fusedopt",)
    assert [(r["case"], r["impl"]) for r in suites["host"]] == [
        (name, impl) for name in ("FusedSGD(momentum=0.9)", "FusedAdam") for impl in host_impls
    ]
    for r in rows:
        assert r["status"] == "smoke", r
        assert r["ms"] == r["gbps"] == r["pct_copy_bw"] == "", r  # nothing timed, nothing claimed
        assert r["gpu"] and r["torch"] == torch.__version__ and r["timestamp_utc"]
        if r["suite"] == "host":
            assert r["bytes"] == r["bytes_per_elt"] == "", r  # host time moves no bytes
        else:
            assert int(r["bytes"]) == int(r["numel"]) * int(r["bytes_per_elt"])
    floor = {r["case"].split("(")[0]: int(r["bytes_per_elt"]) for r in suites["optim"]}
    assert floor == {"FusedSGD": 20, "FusedAdam": 28}  # read p, g, state; write p, state
    amp = {
        (r["case"], r["impl"]): (int(r["bytes_per_elt"]), int(r["impl_bytes_per_elt"])) for r in suites["amp"]
    }
    assert amp == {
        (bench_amp.SCALER, "fusedopt"): (32, 32),  # norm + step
        (bench_amp.SCALER, "fusedopt-recipe"): (32, 48),  # unscale_ + norm + clip + step
        (bench_amp.SCALER, "torch-foreach"): (32, 48),
        (bench_amp.SCALER, "torch-fused"): (32, 48),
        (bench_amp.GRAPH, "fusedopt"): (32, 32),
        (bench_amp.GRAPH, "torch-fused"): (32, 40),  # norm + clip + step
    }
    assert "no device timings" in md.read_text()


def test_bench_smoke_marks_what_torch_lacks_n_a(tmp_path, capsys):
    """torch has no fused RMSprop: its torch-fused row says n/a, not error; the others run."""
    argv = ["--optimizers", "rmsprop", "adagrad", "--dtypes", "fp32", "--impls", "fusedopt", "torch-fused"]
    status = main(["bench", "--smoke", "--suites", "optim", "--out", str(tmp_path), "--no-progress", *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, md = outputs(tmp_path)
    by_row = {(r["case"], r["impl"]): r for r in rows}
    assert set(by_row) == {
        (c, i) for c in ("FusedRMSprop", "FusedAdagrad") for i in ("fusedopt", "torch-fused")
    }
    rmsprop = by_row["FusedRMSprop", "torch-fused"]
    assert rmsprop["status"] == "n/a" and "RMSprop has no fused implementation" in rmsprop["note"], rmsprop
    assert {r["status"] for k, r in by_row.items() if r is not rmsprop} == {"smoke"}
    assert "error" not in out and "error" not in md.read_text()


def test_bench_host_suite_times_the_step_without_its_kernel(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_optim, "HOST_STEPS", 3)
    argv = ["--suites", "host", "--optimizers", "sgd", "--layouts", "many4k", "--dtypes", "fp32"]
    status = main(["bench", "--out", str(tmp_path), "--no-progress", *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, md = outputs(tmp_path)
    assert [r["impl"] for r in rows] == list(bench_optim.HOST_IMPLS if CUDA else ("fusedopt",))
    for r in rows:
        assert r["status"] == "timed" and r["layout"] == "many4k" and r["tensors"] == "1000", r
        assert 0 < float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"]), r
        assert r["gbps"] == r["bytes"] == "", r
        assert ("dry_run" in r["note"]) is not CUDA, r
    assert "## host: fusedopt and its speed-up" in md.read_text()


@pytest.mark.parametrize("cut", ["budget", "sigterm"])
def test_bench_cut_short_still_writes_the_report(tmp_path, capsys, monkeypatch, cut):
    if cut == "sigterm":
        monkeypatch.setattr(bench_optim, "time_step", lambda *key: os.kill(os.getpid(), signal.SIGTERM))
    argv = ["--suites", "optim", "--optimizers", "sgd", "--dtypes", "fp32", "--no-progress"]
    argv += ["--budget", "0"] if cut == "budget" else []
    status = main(["bench", "--smoke", "--out", str(tmp_path), *argv])
    out = capsys.readouterr().out
    note = "--budget 0s reached" if cut == "budget" else "stopped by SIGTERM"
    assert status == (0 if cut == "budget" else 1), out
    assert f"stopped early ({note}): the rows not run are marked skipped" in out
    rows, _, md = outputs(tmp_path)
    assert len(rows) == 5 and {(r["status"], r["note"]) for r in rows} == {("skipped", note)}
    assert "byte floor of one optimizer step" in md.read_text()


def on_a_fake_clock(monkeypatch, peak_mib: float) -> None:
    """bench's timed path with ``measure`` on a fake clock (1, 2, 3 ... ms a row, ``peak_mib``
    of peak memory): the timed report without a GPU."""
    clock = itertools.count(1)

    def fake_measure(ctx, fn, memory=True):
        fn()
        ms = float(next(clock))
        return {"ms": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms, "peak_extra_mib": peak_mib}

    context = bench.Context
    monkeypatch.setattr(context, "measure", fake_measure)
    monkeypatch.setattr(bench, "Context", lambda *a, **k: dataclasses.replace(context(*a, **k), timed=True))
    monkeypatch.setattr(bench, "COPY_NUMEL", 1000)


def test_bench_report_with_timings(tmp_path, capsys, monkeypatch):
    """The timed report (GB/s, % of copy, speed-ups, plot) on a fake clock: no GPU needed."""
    on_a_fake_clock(monkeypatch, peak_mib=0.0)
    argv = ["--suites", "optim", "--optimizers", "sgd", "--dtypes", "fp32", "--no-progress"]
    argv += ["--impls", "fusedopt", "torch-forloop", "torch-foreach"]
    status = main(["bench", "--smoke", "--out", str(tmp_path), *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, md = outputs(tmp_path)
    copy, ours, forloop, foreach = rows
    assert copy["suite"] == "copy" and float(copy["pct_copy_bw"]) == 100
    copy_gbps = 8 * 1000 / 1e-3 / 1e9  # read + write of 1000 fp32 elements in the first fake ms
    assert float(copy["gbps"]) == pytest.approx(copy_gbps)
    assert [r["impl"] for r in (ours, forloop, foreach)] == ["fusedopt", "torch-forloop", "torch-foreach"]
    for r in (ours, forloop, foreach):
        ms = float(r["ms"])
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (ms * 1e-3) / 1e9)
        assert float(r["pct_copy_bw"]) == pytest.approx(100 * float(r["gbps"]) / copy_gbps)
        assert float(r["fusedopt_speedup"]) == pytest.approx(ms / float(ours["ms"]))
        assert float(r["ms_p20"]) < ms < float(r["ms_p80"])
    assert float(foreach["fusedopt_speedup"]) > float(forloop["fusedopt_speedup"]) > 1
    text = md.read_text()
    assert "fusedopt and its speed-up over each other path" in text and "x vs foreach" in text


LINEAR_CE = ["lce-8192x4096x128256", "lce-8192x4096x128256-chunk2048", "lce-8192x4096x128256-vocab4096"]


def test_bench_smoke_linear_cross_entropy_rows(tmp_path, capsys, monkeypatch):
    """The fused linear cross-entropy's bf16 rows: fusedopt (default chunk, 16 rows in the smoke
    run of the chunk2048 row, blocks of 100 classes in the vocab4096 row's), the eager and the
    compiled composition; its byte floor.
    (One dtype: the compiled row is an inductor build on CUDA.)"""
    chunks = []

    def recording(*args, chunk_rows=None, chunk_classes=None, **kwargs):
        chunks.append((chunk_rows, chunk_classes))
        return FF.linear_cross_entropy(*args, chunk_rows=chunk_rows, chunk_classes=chunk_classes, **kwargs)

    monkeypatch.setattr(bench_losses, "FF", argparse.Namespace(linear_cross_entropy=recording))
    argv = ["--suites", "losses", "--losses", *LINEAR_CE, "--dtypes", "bf16", "--no-progress"]
    status = main(["bench", "--smoke", "--out", str(tmp_path), *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, _ = outputs(tmp_path)
    got = [(r["layout"], r["impl"]) for r in rows]
    default = [("64x32x257", impl) for impl in bench_losses.IMPLS]
    assert sorted(got) == sorted(
        [*default, ("64x32x257-chunk16", "fusedopt"), ("64x32x257-vocab100", "fusedopt")]
    )
    assert sorted(chunks, key=str) == sorted(
        [(16, None)] * 2 + [(None, None)] * 2 + [(None, 100)] * 2, key=str
    )
    for r in rows:
        assert r["case"] == "linear_cross_entropy" and r["status"] == "smoke" and r["dtype"] == "bf16", r
        assert int(r["numel"]) == (64 + 257) * 32 and r["tensors"] == "2", r  # input and weight
        assert int(r["bytes_per_elt"]) == 4, r  # each read, its gradient written
        assert int(r["bytes"]) == int(r["numel"]) * 4 and r["impl_bytes_per_elt"] == "", r
    assert floors.LOSSES["linear_cross_entropy"].bytes_per_element() == 8  # fp32
    assert "linear cross-entropy: read x, W, write dx, dW" in out
    assert "8192x4096x128256-chunk2048" in out and "558,891,008" in out  # the floor table: (N + V) H


def test_bench_linear_log_probs_rows(tmp_path, capsys, monkeypatch):
    """The linear log-probs' bf16 row (issue 21): fusedopt, the eager and the compiled
    composition, log-probs and entropy back-propagated with random grads; time, peak memory and
    TFLOP/s (6 N H V) on a fake clock; its byte floor (the linear cross-entropy's)."""
    on_a_fake_clock(monkeypatch, peak_mib=2.0)
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return FF.linear_log_probs(*args, **kwargs)

    monkeypatch.setattr(bench_losses, "FF", argparse.Namespace(linear_log_probs=recording))
    argv = ["--suites", "losses", "--losses", "llp-8192x4096x128256", "--dtypes", "bf16", "--no-progress"]
    status = main(["bench", "--smoke", "--out", str(tmp_path), *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, _ = outputs(tmp_path)
    by = {r["impl"]: r for r in rows if r["suite"] == "losses"}
    assert set(by) == set(bench_losses.IMPLS) and calls == [dict(temperature=0.7, return_entropy=True)] * 2
    flops = 6 * 64 * 32 * 257
    for r in by.values():
        assert r["case"] == "linear_log_probs" and r["layout"] == "64x32x257" and r["status"] == "timed", r
        assert int(r["numel"]) == (64 + 257) * 32 and int(r["bytes_per_elt"]) == 4, r
        assert float(r["peak_extra_mib"]) == 2.0 and r["note"].endswith(
            f"(6NHV = {flops / 1e12:.3g} TFLOP)"
        ), r
    assert floors.LOSSES["linear_log_probs"] is floors.LOSSES["linear_cross_entropy"]


def test_bench_linear_cross_entropy_timed_report(tmp_path, capsys, monkeypatch):
    """Timed rows (a fake clock) note the TFLOP/s of 6 N H V and fusedopt's speed-up."""
    on_a_fake_clock(monkeypatch, peak_mib=1.0)
    argv = ["--suites", "losses", "--losses", *LINEAR_CE, "--dtypes", "bf16", "--no-progress"]
    argv += ["--impls", "fusedopt", "torch-eager"]
    status = main(["bench", "--smoke", "--out", str(tmp_path), *argv])
    out = capsys.readouterr().out
    assert status == 0, out
    rows, _, md = outputs(tmp_path)
    by = {(r["layout"], r["impl"]): r for r in rows if r["suite"] == "losses"}
    assert len(by) == 4
    flops = 6 * 64 * 32 * 257
    for r in by.values():
        tflops = flops / (float(r["ms"]) * 1e-3) / 1e12
        assert r["note"] == f"{tflops:.3g} TFLOP/s (6NHV = {flops / 1e12:.3g} TFLOP)", r
        assert r["status"] == "timed" and float(r["peak_extra_mib"]) == 1.0, r
    ours, eager = by[("64x32x257", "fusedopt")], by[("64x32x257", "torch-eager")]
    assert float(eager["fusedopt_speedup"]) == pytest.approx(float(eager["ms"]) / float(ours["ms"]))
    for layout in ("64x32x257-chunk16", "64x32x257-vocab100"):
        assert by[(layout, "fusedopt")]["fusedopt_speedup"] == "1.0"
    assert "x vs eager" in md.read_text()


def test_bench_linear_distillation_rows(tmp_path, capsys, monkeypatch):
    """The distillation loss's bf16 rows (fusedopt, the eager and the compiled composition, a
    smoke run of each), then timed on a fake clock: the TFLOP/s of 8 N H V, the byte floor of
    both heads read and the student's gradients written."""
    argv = ["--suites", "losses", "--losses", "distill-8192x4096x128256", "--dtypes", "bf16", "--no-progress"]
    assert main(["bench", "--smoke", "--out", str(tmp_path / "smoke"), *argv]) == 0
    rows, _, _ = outputs(tmp_path / "smoke")
    assert sorted(r["impl"] for r in rows) == sorted(bench_losses.IMPLS)
    for r in rows:
        assert (
            r["case"] == "linear_distillation_loss" and r["layout"] == "64x32x257" and r["status"] == "smoke"
        ), r
        assert int(r["numel"]) == (64 + 257) * 32 and int(r["bytes_per_elt"]) == 6, r  # 3 tensors x 2 B
    assert floors.LOSSES["linear_distillation_loss"].bytes_per_element() == 12  # fp32
    on_a_fake_clock(monkeypatch, peak_mib=1.0)
    assert main(["bench", "--smoke", "--out", str(tmp_path / "timed"), *argv, "--impls", "fusedopt"]) == 0
    (row,) = [r for r in outputs(tmp_path / "timed")[0] if r["suite"] == "losses"]
    flops = 8 * 64 * 32 * 257
    tflops = flops / (float(row["ms"]) * 1e-3) / 1e12
    assert row["note"] == f"{tflops:.3g} TFLOP/s (8NHV = {flops / 1e12:.3g} TFLOP)", row
    assert "distillation: also read the teacher's x, W" in capsys.readouterr().out


# The docs say what the code has --------------------------------------------------------------


def python_block(path: str, after: str) -> str:
    """The first ```python block after the line holding ``after`` in ``path``."""
    text = (ROOT / path).read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(after) :], re.S)
    assert block, f"no python block after {after!r} in {path}"
    return block.group(1)


def test_docs_sample_check_output_counts_what_the_code_runs():
    """docs/testing.md's sample of ``fusedopt check`` (default flags, CPU) has the case counts,
    the param list and the total that ``make check`` runs now."""
    text = (ROOT / "docs/testing.md").read_text()
    size = {flag: cpu for flag, (cpu, _, _) in check.SIZES.items()}
    shapes = testing.gpt_shapes(size["width"], size["layers"], size["vocab"])
    numel = sum(math.prod(s) for _, s in shapes)
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    dtypes = len(parser.parse_args([]).dtypes)
    optim, losses, linear = len(check.OPTIM_CASES), len(check.LOSS_CASES), len(check.LINEAR_CE_CASES)
    muon, distillation = len(check.MUON_CASES), len(check.DISTILLATION_CASES)
    assert f"optimizers: {optim} option sets x {dtypes} dtypes" in text
    assert f"muon: {muon} option sets x {dtypes} dtypes" in text
    assert f"({len(shapes)} tensors, {numel:,} elements: d={size['width']}, {size['layers']} layers" in text
    assert f"losses: {losses} cases x {dtypes} dtypes" in text
    assert f"linear heads: {linear} cases x {dtypes} dtypes" in text
    assert f"linear distillation: {distillation} cases x {dtypes} dtypes" in text
    assert (
        f"OK: all {dtypes * (optim + muon + losses + linear + distillation)} checks within tolerance" in text
    )
    for case in check.OPTIM_CASES:  # each option set's extra tensors are named in the header
        for name, shape in case.extra_params:
            assert f"adds {name} {tuple(shape)}" in text


def test_docs_testing_snippet_runs_here():
    """The ``assert_optimizer_matches`` snippet of docs/testing.md runs on this machine (CPU:
    through the interpreter), not only on CUDA."""
    code = python_block("docs/testing.md", "## Testing your own options")
    exec(compile(code, "docs/testing.md", "exec"), {})


def test_supported_torch_versions_agree():
    """pyproject's torch range is the one README and docs/install.md state."""
    (spec,) = re.findall(r'"(torch[<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text())
    low = re.search(r">=\s*(\d+\.\d+)", spec).group(1)
    below = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert low and below, f"torch must have a lower and an upper bound: {spec}"
    high = f"{below.group(1)}.{int(below.group(2)) - 1}"
    for doc in ("README.md", "docs/install.md"):
        text = " ".join((ROOT / doc).read_text().split())
        assert f"Supported: torch {low} + triton" in text and f"up to torch {high}" in text, doc
