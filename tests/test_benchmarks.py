import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["versions"]) >= {"python", "torch", "transformers", "safetensors", "tokenizers", "pytest"}
    eager, compiled = result["training"]["tiny"]  # a CPU dry run does not compile
    assert not eager["compiled"] and not compiled["compiled"] and eager["tokens_per_s"] > 0 and eager["tflops"] >= 0
    budgets = {(r["budget"], r["batch"]) for r in result["decode"]["tiny"]}
    assert budgets == {(b, n) for b in ("1.0", "0.75", "0.5") for n in (1, 8)}
    assert all(r["bytes_ratio"] >= 1 for r in result["decode"]["tiny"])
    assert "GPU: **none**" in run.stdout
