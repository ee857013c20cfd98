#!/usr/bin/env bash
# The GPU check: everything that needs a GPU, in one script, within 8 minutes on one H200.
#
#   bash bench/gpu_check.sh              # on a GPU machine
#   bash bench/gpu_check.sh --dry-run    # the same stages on the CPU (tiny sizes, to a
#                                        # temporary folder): keeps the script from rotting
#
# Needs a python with torch (CUDA), transformers, accelerate, safetensors, triton (and
# nvidia-ml-py for NVML readings); numba, pytest, hydra, wandb, ray and deepspeed may be
# missing, and there may be no network. PYTHON=... picks the interpreter (default: the
# first of python3, python, .venv/bin/python whose torch sees a GPU).
#
# Stages (each under its own timeout; a failed stage is recorded and the next one runs):
#   1. zo2 importable from this checkout: as it is, else `pip install --no-deps
#      --no-build-isolation --no-index -e .`, else a symlink tree on PYTHONPATH that maps
#      offload/ parallel/ launch/ configs/ to zo2.* as the package-dir mapping does;
#   2. tests/test_gpu.py: with pytest if installed, else bench/gpu_tests.py (no pytest);
#   3. bench/gpu_sync.py: host syncs per step, resident and offloaded (zo2's part: 0);
#   4. bench/gpu_offload.py: ZO2's memory table (OPT 1.3b..30b, 1 x 2048, fp16), tokens/s
#      offloaded and resident, the PCIe bound, step_s / max(pcie_bound_s, resident_step_s),
#      and a run at the token count where compute and transfer balance; in the time left
#      (60% of it when stage 5 runs);
#   5. bench/gpu_offload.py --quantization nf4 (issue 18's GPU row): the same sizes with
#      4-bit decoder layers, in the rest of the time; where bitsandbytes imports. The GPU
#      machine lacks it: bring its wheel (`pip download --no-deps --only-binary=:all:
#      --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl
#      bitsandbytes==0.50.2`, .whl/ git-ignored and carried) and it is installed from
#      .whl/ into a temporary folder, no network.
# Writes bench/results/gpu-<gpu name>.json (all stages); the exit status is 1 if a
# stage failed (stage 5 skipped for want of bitsandbytes is not a failure).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
START=$(date +%s)
BUDGET=${ZO2_CHECK_BUDGET_S:-480}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# ---- the interpreter ------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ $DRY == 1 ]]; then
    PY=$ROOT/.venv/bin/python
    [[ -x $PY ]] || PY=python3
else
    PY=""
    for candidate in python3 python "$ROOT/.venv/bin/python"; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
            2>/dev/null; then
            PY=$candidate
            break
        fi
    done
    if [[ -z $PY ]]; then
        echo "gpu_check: no python whose torch sees a GPU (set PYTHON=..., or --dry-run)" >&2
        exit 2
    fi
fi
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"

# ---- 1. zo2 from this checkout --------------------------------------------------------
from_here() {
    "$PY" - "$ROOT" <<'EOF' 2>/dev/null
import os, sys
import zo2, zo2.offload, zo2.parallel
root = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(zo2.offload.__file__).startswith(root) else 1)
EOF
}
TREE=""
WORK=""
trap 'rm -rf "$TREE" "$WORK"' EXIT
symlink_tree() {  # the package-dir mapping of pyproject.toml, as links
    local tree
    tree=$(mktemp -d)
    TREE=$tree
    mkdir -p "$tree/zo2"
    for item in "$ROOT"/zo2/*; do ln -s "$item" "$tree/zo2/"; done
    for sub in offload parallel launch configs; do ln -s "$ROOT/$sub" "$tree/zo2/$sub"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
}
if [[ $DRY == 1 ]]; then
    symlink_tree  # the fallback path, checked on every dry run; installs nothing
elif ! from_here; then
    say "installing zo2 from $ROOT (no dependencies, no network)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" \
        || say "pip install failed: using a symlink tree instead"
    from_here || symlink_tree
fi
if ! from_here; then
    echo "gpu_check: cannot import zo2 from $ROOT" >&2
    exit 2
fi
# bench.common for the stages. They run as scripts, with $ROOT last on the path: from
# $ROOT, `python -m bench.<name>` would find $ROOT/zo2 (no zo2.offload) before a link tree
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"

if [[ $DRY == 1 ]]; then
    GPU=dry-run-cpu
    FLAG=(--dry-run)
    OUT=${OUT:-$(mktemp -d)}
else
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
    FLAG=()
    OUT=${OUT:-$ROOT/bench/results}
fi
SLUG=$(echo "$GPU" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//' | tr 'A-Z' 'a-z')
WORK=$(mktemp -d)
mkdir -p "$OUT"
say "device: $GPU; results: $OUT/gpu-$SLUG.json"

# ---- 2-4. the stages ------------------------------------------------------------------
declare -A RC
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    say "$name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tail -n 40
    RC[$name]=${PIPESTATUS[0]}
    say "$name: exit ${RC[$name]}"
}
SHIM=()
[[ $DRY == 1 ]] && SHIM=(--shim)  # the no-pytest runner, also where pytest exists
stage tests 200 "$PY" bench/gpu_tests.py tests/test_gpu.py --json "$WORK/tests.json" "${SHIM[@]}"
stage sync 90 "$PY" bench/gpu_sync.py --json "$WORK/sync.json" "${FLAG[@]}"
# bitsandbytes for stage 5: as installed, else from a carried wheel
if ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1 \
    && compgen -G "$ROOT/.whl/bitsandbytes-*.whl" >/dev/null; then
    say "installing bitsandbytes from $ROOT/.whl (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
        "$ROOT"/.whl/bitsandbytes-*.whl && export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
QUANT=0
"$PY" -c "import bitsandbytes" >/dev/null 2>&1 && QUANT=1
LEFT=$((BUDGET - ($(date +%s) - START) - 20))
[[ $LEFT -lt 60 ]] && LEFT=60
[[ $QUANT == 1 ]] && LEFT=$((LEFT * 6 / 10))
stage offload $((LEFT + 30)) "$PY" bench/gpu_offload.py --budget-s "$LEFT" --results "$WORK" \
    "${FLAG[@]}"
if [[ $QUANT == 1 ]]; then
    LEFT=$((BUDGET - ($(date +%s) - START) - 20))
    [[ $LEFT -lt 60 ]] && LEFT=60
    stage quantized $((LEFT + 30)) "$PY" bench/gpu_offload.py --quantization nf4 --no-balance \
        --budget-s "$LEFT" --results "$WORK" "${FLAG[@]}"
else
    say "quantized: skipped (bitsandbytes does not import; see the header)"
    RC[quantized]=skipped
fi

# ---- the result file ------------------------------------------------------------------
"$PY" - "$WORK" "$OUT/gpu-$SLUG.json" "$GPU" "$(($(date +%s) - START))" \
    "${RC[tests]}" "${RC[sync]}" "${RC[offload]}" "${RC[quantized]}" <<'EOF'
import glob, json, platform, sys, time
from pathlib import Path

import torch

work, path, gpu, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
codes = dict(zip(("tests", "sync", "offload"), map(int, sys.argv[5:8])))
quantized = None if sys.argv[8] == "skipped" else int(sys.argv[8])

def load(pattern, but=None):
    files = sorted(f for f in glob.glob(str(work / pattern)) if not (but and f.endswith(but)))
    return json.loads(Path(files[0]).read_text()) if files else None

def tail(name):
    log = work / f"{name}.log"
    return log.read_text()[-4000:] if log.exists() else ""

record = {
    "gpu": gpu, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": elapsed,
    "python": platform.python_version(), "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "ok": all(c == 0 for c in codes.values()) and quantized in (None, 0),
    "stages": {
        "tests": {"exit": codes["tests"], "report": load("tests.json"), "log": tail("tests")},
        "sync": {"exit": codes["sync"], "report": load("sync.json"), "log": tail("sync")},
        "offload": {"exit": codes["offload"],
                    "report": load("gpu_offload-*.json", but="-nf4.json"),
                    "log": tail("offload")},
        "quantized": {"exit": quantized, "skipped": quantized is None and
                      "bitsandbytes does not import", "report": load("gpu_offload-*-nf4.json"),
                      "log": tail("quantized")},
    },
}
path.write_text(json.dumps(record, indent=1, default=str) + "\n")
print(f"gpu_check ok={record['ok']} " + " ".join(f"{k}={v}" for k, v in codes.items())
      + f" quantized={'skipped' if quantized is None else quantized}"
      + f" elapsed_s={elapsed} results={path}")
EOF
for name in tests sync offload; do
    [[ ${RC[$name]} == 0 ]] || exit 1
done
[[ ${RC[quantized]} == 0 || ${RC[quantized]} == skipped ]] || exit 1
exit 0
