#!/usr/bin/env bash
# Set up everything the workflow and its tests need on a fresh Debian/Ubuntu machine:
# system tools (graphviz for the DAG picture, a C++ compiler and cmake to build llama-cpp-python,
# chromium for the report test, Slurm for the cluster test, when run as root), then a virtual
# environment .venv with the pinned requirements.
# Usage: bash setup.sh            (then: .venv/bin/snakemake --cores all)
# On a GPU machine, first install a CUDA build of requirements.txt's torch into .venv
# (python3 -m venv .venv && .venv/bin/pip install torch==<that version>): DeepSpeed is built against it.
set -euo pipefail
cd "$(dirname "$0")"

packages=(graphviz g++ cmake)
[[ "${IVR_SETUP_TEST_TOOLS:-0}" == 1 ]] && packages+=(chromium slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${packages[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (needed for the DAG picture, llama-cpp-python and some tests)" >&2
  fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Everything but the two sdists first. llama-cpp-python is built for any AVX2 CPU, not just this one, as
# requirements.txt says, and without pip's wheel cache, which would hand back a build made with other
# CMAKE_ARGS; DeepSpeed is then built against the torch just installed, with no ops compiled ahead (they
# are built when first needed).
"${pip[@]}" -r <(grep -v -e '^deepspeed==' -e '^llama-cpp-python==' requirements.txt)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" --no-cache-dir "$(grep '^llama-cpp-python==' requirements.txt)"
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation "$(grep '^deepspeed==' requirements.txt)"
echo "setup: ready (.venv/bin/snakemake, .venv/bin/python -m pytest)"
