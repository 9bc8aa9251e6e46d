"""``benchmarks/gpu_check.py`` passes on CPU (quick mode) and catches a broken outer update.

Most runs here skip ``outer_impl="compiled"`` (``--impls foreach per_tensor``): on this CPU its
graphs take 20-40 s to compile with a cold inductor cache. One slow test checks it alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

import torch_seqreptile._interpolate as interpolate
from benchmarks import gpu_check
from torch_seqreptile._interpolate import OUTER_IMPLS

EAGER = [impl for impl in OUTER_IMPLS if impl != "compiled"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


def run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], impls: list[str]
) -> tuple[int, str, Any]:
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--impls", *impls, "--out", str(out)])
    return code, capsys.readouterr().out, json.loads(out.read_text())


def test_every_path_passes_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, report = run(tmp_path, capsys, EAGER)
    failed = [(r["path"], r["dtype"], r["note"]) for r in report["checks"] if not r["ok"]]
    assert code == 0 and not failed, failed
    assert report["ok"] and "FAIL" not in out
    lines = out.splitlines()
    for case in gpu_check.cases(EAGER):
        dtype = f"{gpu_check.SHORT[case.dtype]}/{gpu_check.SHORT[case.phi_dtype]}"
        assert any(line.split()[:2] == [case.path, dtype] for line in lines), case
    bandwidth = [f"bandwidth/{name}" for name in ("_foreach_copy_", "foreach")]
    for path in ["sub-half-ulp kept", "sub-half-ulp lost", *bandwidth]:
        assert path in out
    assert len(report["checks"]) == len(gpu_check.cases(EAGER)) + 2
    assert "compiled" not in out
    assert all(row["fraction_of_copy"] > 0 for row in report["bandwidth"])


@pytest.mark.slow
def test_compiled_path_passes_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, report = run(tmp_path, capsys, ["compiled"])
    failed = [(r["path"], r["dtype"], r["note"]) for r in report["checks"] if not r["ok"]]
    assert code == 0 and not failed and "FAIL" not in out, failed
    assert sum("/compiled/" in r["path"] for r in report["checks"]) == len(
        gpu_check.cases(["compiled"])
    )


def _ignore_nesterov(original: Callable[..., None]) -> Callable[..., None]:
    def kernel(*args: Any) -> None:  # (slow, target, fast, buffers, lr, momentum, nesterov)
        original(*args[:6], False)

    return kernel


def _lr_off_by_1e4(original: Callable[..., None]) -> Callable[..., None]:
    def kernel(slow: list[Tensor], *args: Any) -> None:
        original(slow, *args[:3], args[3] * (1 + 1e-4), *args[4:])

    return kernel


def _nesterov_rows_of_per_tensor(row: dict[str, Any]) -> bool:
    # the per-tensor kernel: outer_impl="per_tensor", and fp32 phi of bf16/fp16 parameters
    uses_it = "/per_tensor/" in row["path"] or row["dtype"] in ("bf16/fp32", "fp16/fp32")
    return "/nesterov" in row["path"] and uses_it


def _fp32_foreach_rows(row: dict[str, Any]) -> bool:
    return "/foreach/" in row["path"] and row["dtype"] == "fp32/fp32"


def _foreach_rows(row: dict[str, Any]) -> bool:
    # bf16/fp16 phi may round a 1e-4 error of outer_lr away
    return "/foreach/" in row["path"] and row["dtype"] in ("fp32/fp32", "bf16/bf16", "fp16/fp16")


@pytest.mark.parametrize(
    "kernel, wrap, must_fail, may_fail",
    [
        ("_update_per_tensor", _ignore_nesterov, _nesterov_rows_of_per_tensor,
         _nesterov_rows_of_per_tensor),
        ("_update_foreach", _lr_off_by_1e4, _fp32_foreach_rows, _foreach_rows),
    ],
)  # fmt: skip
def test_a_broken_kernel_is_reported(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kernel: str,
    wrap: Callable[[Callable[..., None]], Callable[..., None]],
    must_fail: Callable[[dict[str, Any]], bool],
    may_fail: Callable[[dict[str, Any]], bool],
) -> None:
    """Exactly the rows whose path runs the broken kernel fail, and the exit status is 1."""
    monkeypatch.setattr(interpolate, kernel, wrap(getattr(interpolate, kernel)))
    code, out, report = run(tmp_path, capsys, EAGER)
    assert code == 1 and "FAIL" in out
    failed = {(r["path"], r["dtype"]) for r in report["checks"] if not r["ok"]}
    must = {(r["path"], r["dtype"]) for r in report["checks"] if must_fail(r)}
    may = {(r["path"], r["dtype"]) for r in report["checks"] if may_fail(r)}
    assert must and must <= failed <= may, out
