#!/usr/bin/env bash
# One GPU session on the lent H200 (no network there): the default experiment of config/gpu.yaml from a
# clean results/, its settings chosen on the dev split first, plus the throughput and DeepSpeed checks.
# docs/DEVELOPING.md ("The GPU machine") says how the assets and wheels travel; each step below is one
# short call of the device tool, and `run` leaves the long work to a background process, so that the
# machine's time goes to the work and not to waiting for the next call.
#
#   bash bench/gpu_session.sh install     wheels from .whl/ into /tmp/site; GGUF parts and corpora aside
#   bash bench/gpu_session.sh stash       later calls: move the carried parts aside
#   bash bench/gpu_session.sh run         assemble the GGUF, then in the background: the throughput
#                                         benchmark (cores 0-3) beside the CPU stages (cores 4-15); the
#                                         tuning on the dev split and the DeepSpeed check; the default run
#                                         with the chosen settings; the IVR model at equal compute and
#                                         after one pass
#   bash bench/gpu_session.sh status      what has finished, the tail of the logs
# A follow-up session skips what an earlier one settled: IVR_SESSION_TUNE=0 (no tuning: config/gpu.yaml
# carries the settings chosen on the dev split), IVR_SESSION_DEEPSPEED=0, IVR_SESSION_EXTRAS="one_pass"
# (which of equal_compute and one_pass follow the default run), IVR_SESSION_BENCH="--no-extras".
#   bash bench/gpu_session.sh collect     reports, logs and tables into $OUT/session.tar.gz
set -uo pipefail
cd "$(dirname "$0")/.."
STATE=${IVR_SESSION_STATE:-/tmp/ivr-session}
PARTS=$STATE/parts
mkdir -p "$STATE" "$PARTS"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IVR_NO_PROGRESS=1
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
# A rehearsal on CPU in a copy of the tiny workflow: IVR_SESSION_CONFIGS="config/gpu.yaml tests/config/tiny.yaml ..."
read -r -a CONFIGS <<<"${IVR_SESSION_CONFIGS:-config/gpu.yaml}"
BASE=${IVR_SESSION_BASE:-resources/models/SmolLM2-135M-Instruct.Q4_1}
REHEARSAL=${IVR_SESSION_REHEARSAL:-0}
GGUF=resources/assets/smollm2_gguf/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# targets first: --configfile takes several values and would swallow a target written after it
SNAKE_OPTS=(--cores "${IVR_SESSION_CORES:-12}" --resources gpu=1 --scheduler greedy --configfile "${CONFIGS[@]}")
say() { echo "[$(date +%T)] $*" | tee -a "$STATE/session.log"; }

stash() {
  for part in .devcarry/*/*; do [[ -e $part ]] && mv -f "$part" "$PARTS/"; done
  for name in korean_bills python_docs konlpy_corpus; do
    [[ -d resources/assets/$name ]] && say "asset $name here"
  done
  ls -la "$PARTS"
}

install() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  "$PY" -c "import torch, transformers, accelerate, snakemake, jsonschema, gguf, deepspeed, tensorboard
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'snakemake', snakemake.__version__, 'deepspeed', deepspeed.__version__)"
  stash
}

stage() {  # stage NAME COMMAND...: run it, log it, mark it done or failed
  local name=$1; shift
  say "start $name"
  if "$@" >"$STATE/$name.log" 2>&1; then touch "$STATE/$name.done"; say "done $name"; else
    touch "$STATE/$name.failed"; say "FAILED $name (see $STATE/$name.log)"; return 1; fi
}

extra_run() {  # extra_run NAME SETTING: the IVR model again with one setting changed, and its report
  local name=$1 setting=$2 settings
  settings=$("$PY" - "$setting" "${CONFIGS[@]}" <<'PY'
import json, os, sys
sys.path.insert(0, "scripts")
from ivr.config import read_configs
chosen = "results/tuning/chosen.yaml"
training = read_configs([*sys.argv[2:], *([chosen] if os.path.exists(chosen) else [])])["training"]
training.pop("control_lr")
key, value = sys.argv[1].split("=")
training[key] = value if value == "one_pass" else float(value)
print(json.dumps(training))
PY
)
  "$PY" scripts/train_sft.py --model results/model/initialized --data results/data/ivr --dev results/corpus/domain/dev.jsonl \
    --general-dev results/corpus/general/dev.jsonl --rules results/remap/remap_rules.yaml \
    --compute-reference results/data/control --settings "$settings" --threads 8 \
    --checkpoint-dir "results/checkpoints/$name" --out "results/extra/$name" &&
    "$PY" scripts/validate.py --heldout results/corpus/domain/heldout.jsonl --general-heldout results/corpus/general/heldout.jsonl \
      --compression results/remap/compression.json --fidelity results/tokenizer/fidelity.json \
      --base-model "$BASE" --initialized results/model/initialized \
      --sft "results/extra/$name" --control results/model/control --max-documents 300 --byte-budget 2000 \
      --batch-size 32 --prompts 5 --prompt-bytes 120 --new-tokens 64 \
      --out-json "results/extra/$name.validation.json" --out-html "results/extra/$name.validation.html"
}

faster() {  # faster LINE SLOWEST FASTEST: the line has two ratios, neither below SLOWEST, one above FASTEST
  [[ -n $1 ]] && "$PY" -c "import re, sys; x = [float(v) for v in re.findall(r'([0-9.]+)x', sys.argv[1])]
sys.exit(0 if len(x) == 2 and min(x) > float(sys.argv[2]) and max(x) > float(sys.argv[3]) else 1)" "$@"
}

choose_compile_scope() {  # body if the benchmark measured it faster than blocks for both models, and
  # CUDA graphs if they made the body faster for one and slower for neither
  mkdir -p results/tuning
  local line graphs_line scope=blocks graphs=false
  line=$(grep "body / blocks, our step" "$STATE/bench.log" 2>/dev/null)
  graphs_line=$(grep "graphs / body, our step" "$STATE/bench.log" 2>/dev/null)
  faster "$line" 1.02 1.02 && scope=body
  [[ $scope == body ]] && faster "$graphs_line" 0.99 1.02 && graphs=true
  printf 'training:\n  compile_scope: %s # measured: %s\n  cuda_graphs: %s # measured: %s\n' "$scope" \
    "${line:-no benchmark}" "$graphs" "${graphs_line:-no benchmark}" >results/tuning/compile.yaml
  say "compile_scope $scope (${line:-no benchmark}); cuda_graphs $graphs (${graphs_line:-no benchmark})"
}

tune() {
  local configs=()
  for config in "${CONFIGS[@]}"; do configs+=(--configfile "$config"); done
  stage tuning "$PY" bench/tune_training.py "${configs[@]}" --share "${IVR_SESSION_SHARE:-0.125}" \
    --parallel "${IVR_SESSION_PARALLEL:-6}" --micro-batch "${IVR_SESSION_MICRO:-16}" --eval-bytes 2000
}

orchestrate() {
  say "session starts"
  if [[ $REHEARSAL == 1 ]]; then
    true &
  else
    # shellcheck disable=SC2086
    taskset -c 0-3 "$PY" bench/train_throughput.py --mode compare --profile ${IVR_SESSION_BENCH:-} >"$STATE/bench.log" 2>&1 &&
      touch "$STATE/bench.done" &
  fi
  local bench=$!
  stage cpu_stages taskset -c "${IVR_SESSION_CPUS:-4-15}" "$PY" -m snakemake results/model/initialized results/data/ivr/meta.json \
    results/data/control/meta.json results/tokenizer/fidelity.json results/remap/compression.json \
    "${SNAKE_OPTS[@]}" || return 1
  say "waiting for the throughput benchmark"
  wait $bench
  choose_compile_scope
  CONFIGS+=(results/tuning/compile.yaml)
  SNAKE_OPTS+=(results/tuning/compile.yaml)
  if [[ $REHEARSAL != 1 && ${IVR_SESSION_DEEPSPEED:-1} == 1 ]]; then
    PYTHON="$PY" OUT="$STATE/deepspeed" stage deepspeed_check bash bench/deepspeed_check.sh &
  fi
  local chosen=()
  if [[ ${IVR_SESSION_TUNE:-1} == 1 ]]; then
    if ! tune; then
      grep -q "scope: body" results/tuning/compile.yaml || return 1
      say "tuning failed with compile_scope body: once more by blocks, without CUDA graphs"
      printf 'training:\n  compile_scope: blocks # body failed in the tuning (see tuning.log)\n' >results/tuning/compile.yaml
      tune || return 1
    fi
    chosen=(results/tuning/chosen.yaml)
  fi
  wait
  if ! stage default_run "$PY" -m snakemake results/final_model "${SNAKE_OPTS[@]}" "${chosen[@]}" &&
    grep -q "cuda_graphs: true" results/tuning/compile.yaml; then
    say "the default run failed with CUDA graphs: once more without them (it resumes from its checkpoints)"
    sed -i 's/cuda_graphs: true/cuda_graphs: false # failed in the default run (see default_run.log)/' results/tuning/compile.yaml
    mv "$STATE/default_run.log" "$STATE/default_run_graphs.log"
    stage default_run "$PY" -m snakemake results/final_model "${SNAKE_OPTS[@]}" "${chosen[@]}"
  fi
  for extra in ${IVR_SESSION_EXTRAS:-equal_compute one_pass}; do
    case $extra in
    equal_compute) stage equal_compute extra_run equal_compute budget=1.0 ;;
    one_pass) stage one_pass extra_run one_pass budget=one_pass ;;
    esac
  done
  say "session done"
}

case "${1:-}" in
install) install ;;
stash) stash ;;
run)
  if [[ ! -f $GGUF ]]; then
    mkdir -p "$(dirname "$GGUF")"
    cat "$PARTS"/gguf.part.* >"$GGUF"
    cp "$PARTS/smollm2_SOURCE.json" "$(dirname "$GGUF")/SOURCE.json"
  fi
  echo "$GGUF_SHA  $GGUF" | sha256sum -c - || exit 1
  setsid nohup bash "$0" orchestrate >"$STATE/orchestrate.log" 2>&1 &
  sleep 2; cat "$STATE/session.log"
  ;;
orchestrate) orchestrate ;;
status)
  cat "$STATE/session.log"
  for log in "$STATE"/*.log; do echo "== $log"; tail -n "${TAIL:-4}" "$log"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  ;;
collect)
  tar czf "$OUT/session.tar.gz" --ignore-failed-read --exclude=./parts -C "$STATE" . -C "$PWD" results/report results/tuning/trials.jsonl results/tuning/ablation.md \
    results/tuning/chosen.yaml results/tuning/runs results/extra/*.json results/extra/*.html \
    results/model/sft/train_log.jsonl results/model/sft/training_stats.json results/model/control/train_log.jsonl \
    results/model/control/training_stats.json results/extra/*/train_log.jsonl results/extra/*/training_stats.json \
    results/remap/compression.json results/tokenizer/fidelity.json results/analysis/corpus_stats.json \
    results/remap/selection_log.md logs benchmarks results/final_model/README.md results/final_model/PROVENANCE.json \
    2>/dev/null
  ls -la "$OUT"
  ;;
*)
  echo "usage: $0 install|stash|run|status|collect" >&2
  exit 2
  ;;
esac
