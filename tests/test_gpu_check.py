"""bench/gpu_check.sh --dry-run: every stage of the GPU check runs on the CPU (tiny
sizes) and the result file is written, so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                           "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    record = json.loads((tmp_path / "gpu-dry-run-cpu.json").read_text())
    stages = record["stages"]
    assert record["ok"] and all(s["exit"] == 0 for s in stages.values())  # bitsandbytes:
    # a test dependency (zo2[quantized]), so stage 5 ran (exit 0), not skipped (None)

    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                str(ROOT / "tests" / "test_gpu.py")], capture_output=True,
                               text=True, cwd=ROOT).stdout
    ids = sorted(line.split("::", 1)[1] for line in collected.splitlines() if "::" in line)
    tests = stages["tests"]["report"]
    assert tests["runner"] == "shim"  # the no-pytest runner, as on a bare GPU machine
    assert sorted(r["test"].split("::", 1)[1] for r in tests["results"]) == ids
    assert {r["outcome"] for r in tests["results"]} == {"skipped"}  # no CUDA here

    assert set(stages["sync"]["report"]) == {"resident", "offloaded"}
    offload = stages["offload"]["report"]
    assert set(offload["table_from_configs"]) >= {"1.3b", "6.7b", "13b", "30b"}
    assert offload["table_from_configs"]["30b"]["layers"] == 48
    tiny = offload["sizes"]["tiny"]
    for mode in ("offload", "resident"):
        assert tiny[mode]["step_s"] > 0 and "error" not in tiny[mode]
    assert tiny["step_over_bound"] == tiny["step_s_offload"] / tiny["bound_s"]
    assert offload["balance"]["batch"] == 2 and offload["balance"]["step_s_offload"] > 0
    assert offload["settings"]["quantization"] == "none"

    four_bit = stages["quantized"]["report"]  # issue 18's GPU row: 4-bit decoder layers
    assert four_bit["settings"]["quantization"] == "nf4"
    tiny4 = four_bit["sizes"]["tiny"]
    for mode in ("offload", "resident"):  # 2 layers x (4 attention projections + 2 MLP)
        assert tiny4[mode]["quantized_layers"] == 12 and tiny4[mode]["step_s"] > 0
    # the codes lane crosses the bus up: half a byte a weight of the tiny shape's linears
    # (hidden 64, ffn 256: 4 x 64 x 64 + 2 x 64 x 256 = 49152 weights a layer, 2 layers)
    assert tiny4["offload"]["codes_up_per_step_gb"] == 2 * 49152 / 2 / 1e9
