"""`make gpu-check` (bench/gpu_check.py) runs where a GPU is lent, rarely and on a clock, so its
plumbing is exercised here at toy sizes on CPU: every check runs (the CUDA-only ones skip), the
table and the JSON come out, and a failing check makes the exit status 1 without stopping the
others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(tmp_path, *args):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_every_check_runs_on_cpu(tmp_path, gpu_check):
    proc, result = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = {r["name"]: r["status"] for r in result["results"]}
    assert list(status) == [name for name, _, _ in gpu_check.CHECKS]
    assert status.pop("env") == "INFO"
    assert status.pop("nccl-1rank") == status.pop("tp2-nccl") == "SKIP"  # CUDA only
    assert set(status.values()) == {"PASS"}, status
    for name in status:
        assert f"[PASS] {name}" in proc.stdout  # a line per check as it ends, then the table
    assert "checks in" in proc.stdout and "0 failed" in proc.stdout


def test_parity_with_the_triton_kernels_under_the_interpreter(tmp_path):
    """The CUDA kernels, end to end against transformers (float32 and bfloat16)."""
    proc, result = _run(tmp_path, "--kernels", "triton", "--only", "parity-fp32-llama,parity-bf16-gpt2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["status"] for r in result["results"]] == ["PASS", "PASS"]


def test_a_failing_check_fails_the_run_and_the_rest_still_run(monkeypatch, capsys, gpu_check):
    module = gpu_check

    def broken(self):
        raise RuntimeError("kernel exploded")

    def failing(self):
        module.require(False, "logits differ")

    monkeypatch.setattr(module.Checks, "kernels", broken)
    monkeypatch.setattr(module.Checks, "engine", failing)
    assert module.main(["--device", "cpu", "--quick", "--only", "kernels,engine,env"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] kernels" in out and "RuntimeError: kernel exploded" in out
    assert "[FAIL] engine" in out and "logits differ" in out
    assert "[INFO] env" in out and "2 failed (kernels, engine)" in out
