#!/usr/bin/env bash
# One GPU session on the lent GPU (no network there): the default experiment of config/gpu.yaml from a
# clean results/, its settings chosen on the dev split first, plus the throughput and DeepSpeed checks.
# docs/DEVELOPING.md ("The GPU machine") gives the calls; each step below is one short call of the device
# tool, and `run` leaves the long work to a background process, so that the machine's time goes to the
# work and not to waiting for the next call.
#
#   bash bench/gpu_session.sh pack        here, before the session: the assets the configured run needs
#                                         (Snakemake's DAG says which), fetched if missing, packed in parts
#                                         .devcarry/1, 2, ... of one call each; prints the calls
#   bash bench/gpu_session.sh install     call 1: wheels from .whl/ into /tmp/site, the modules the run
#                                         will use checked; the carried part put aside
#   bash bench/gpu_session.sh stash       later calls: the carried part put aside
#   bash bench/gpu_session.sh run         the assets unpacked and checked, then in the background: the
#                                         throughput benchmark (cores 0-3) beside the CPU stages (cores
#                                         4-15); the tuning on the dev split and the DeepSpeed check; the
#                                         default run with the chosen settings; the extra IVR runs. A
#                                         fresh session: what an earlier one marked done or failed is
#                                         cleared, its logs moved to previous/
#   bash bench/gpu_session.sh resume      the same, keeping the stages marked done: after a failure, the
#                                         failed stage and those after it run again
#   bash bench/gpu_session.sh wait [S]    until the session ends or S seconds (540) pass, then status
#   bash bench/gpu_session.sh status      what has finished, the tail of the logs
#   bash bench/gpu_session.sh collect     reports, logs and tables into $OUT/session.tar.gz
# Settings, in front of run or resume (and of install for IVR_SESSION_DEEPSPEED):
#   IVR_SESSION_BENCH      the benchmark's extra arguments (e.g. --no-extras), or skip: no benchmark, and
#                          compile_scope and cuda_graphs stay as the configs set them
#   IVR_SESSION_TUNE=0     no tuning (the configs carry the settings chosen on the dev split)
#   IVR_SESSION_DEEPSPEED=0  no DeepSpeed check (install then checks no DeepSpeed either)
#   IVR_SESSION_EXTRAS     what follows the default run (equal_compute one_pass unless set; "" or none:
#                          nothing): equal_compute, one_pass (the IVR model again at the control's compute
#                          or after one pass, with a report); config:KEY=VALUE[,KEY=VALUE...] (the
#                          workflow with config keys changed, dotted, e.g. config:ivr.n_reassign=4000, in a
#                          copy of the work tree: its CPU stages beside the default run, its IVR model
#                          trained after it); unigram (config:ivr.backend=unigram);
#                          train:KEY=VALUE[,KEY=VALUE...] (the IVR model with training settings changed);
#                          gguf (the trained IVR model as GGUF files, checked and timed in llama.cpp against
#                          the base GGUF on two cores, IVR_SESSION_GGUF_CPUS). config:, unigram, train: (on
#                          the cores of IVR_SESSION_TRAIN_CPUS) and gguf run side by side after the default
#                          run's report, and write only training stats and JSON figures
#   IVR_SESSION_CONFIGS    the configs (config/gpu.yaml); a CPU rehearsal: see docs/DEVELOPING.md
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
STATE=${IVR_SESSION_STATE:-/tmp/ivr-session}
PARTS=$STATE/parts
mkdir -p "$STATE" "$PARTS"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IVR_NO_PROGRESS=1
export TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
read -r -a CONFIGS <<<"${IVR_SESSION_CONFIGS:-config/gpu.yaml}"
BENCH=${IVR_SESSION_BENCH-}
EXTRAS=${IVR_SESSION_EXTRAS-equal_compute one_pass}
DEEPSPEED=${IVR_SESSION_DEEPSPEED:-1}
SIDE_CPUS=${IVR_SESSION_SIDE_CPUS:-8-15} # the config runs' CPU stages, beside the default run
GGUF_CPUS=${IVR_SESSION_GGUF_CPUS:-0,1}  # the GGUF export and llama.cpp's timing: two cores, as on a small machine
TRAIN_CPUS=${IVR_SESSION_TRAIN_CPUS:-2-15} # the extra trainings, beside them
CALL_MIB=${IVR_SESSION_CALL_MIB:-60} # what one device call may carry, under its limit of 64 MiB
# targets first: --configfile takes several values and would swallow a target written after it
SNAKE_OPTS=(--cores "${IVR_SESSION_CORES:-12}" --resources gpu=1 --scheduler greedy --configfile "${CONFIGS[@]}")
CPU_TARGETS=(results/model/initialized results/data/ivr/meta.json results/data/control/meta.json
  results/tokenizer/fidelity.json results/remap/compression.json)
CHOSEN=() # results/tuning/chosen.yaml once the tuning has chosen
say() { echo "[$(date +%T)] $*" | tee -a "$STATE/session.log"; }

cfg() { # cfg EXPR: a Python expression over the configs in effect (c), printed
  "$PY" - "$1" "${CONFIGS[@]}" "${CHOSEN[@]}" <<'PY'
import sys
sys.path.insert(0, "scripts")
from ivr.config import read_configs
c = read_configs(sys.argv[2:])
value = eval(sys.argv[1])
print(str(value).lower() if isinstance(value, bool) else value)
PY
}

needed_assets() { # the asset folders (resources/assets/NAME) the configured run reads, from Snakemake's DAG
  local summary
  summary=$("$PY" -m snakemake --summary results/final_model "${CPU_TARGETS[@]}" --configfile "${CONFIGS[@]}" 2>&1) ||
    { echo "$summary" >&2; return 1; }
  awk -F'\t' '/^output_file\t/ { for (i = 1; i <= NF; i++) if ($i == "rule") rule = i; next }
    rule && $rule == "fetch_assets" { print $1 }' <<<"$summary" | sort -u
}

pack() {
  local assets tree=0 whl=0 first part sha count call carry command mib
  assets=$(needed_assets) || return 1
  read -r -d '' -a assets <<<"$assets"
  ((${#assets[@]})) || { echo "error: Snakemake listed no assets for ${CONFIGS[*]}" >&2; return 1; }
  git check-ignore -q .devcarry/1 || { echo "error: .devcarry is not git-ignored: it would travel with every call" >&2; return 1; }
  "$PY" -m snakemake "${assets[@]}" --cores 2 --configfile "${CONFIGS[@]}" >"$STATE/pack.log" 2>&1 ||
    { tail -n 20 "$STATE/pack.log" >&2; return 1; }
  rm -rf .devcarry && mkdir -p .devcarry/all
  tar -czf .devcarry/all/assets.tgz "${assets[@]}" || return 1
  sha=$(sha256sum .devcarry/all/assets.tgz | cut -d' ' -f1)
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
  [[ -d .whl ]] && whl=$(du -sbL .whl | cut -f1)
  # the first part travels with .whl, the others with the work tree only
  first=$((CALL_MIB * 1048576 - tree - whl)) part=$((CALL_MIB * 1048576 - tree))
  ((first > 1048576)) || { echo "error: the work tree and .whl leave no room in a call of $CALL_MIB MiB" >&2; return 1; }
  head -c "$first" .devcarry/all/assets.tgz >.devcarry/all/assets.tgz.part.00
  tail -c +$((first + 1)) .devcarry/all/assets.tgz | split -b "$part" -d -a 2 --numeric-suffixes=1 - .devcarry/all/assets.tgz.part.
  rm .devcarry/all/assets.tgz
  count=0
  for file in .devcarry/all/assets.tgz.part.*; do
    count=$((count + 1))
    mkdir -p ".devcarry/$count" && mv "$file" ".devcarry/$count/"
  done
  rmdir .devcarry/all
  echo "$sha $count ${assets[*]}" >.devcarry/1/assets.manifest
  echo "assets: ${assets[*]} ($((tree / 1048576)) MiB of work tree, $((whl / 1048576)) MiB of .whl)"
  echo "| call | carry | MiB | command |"
  for ((call = 1; call <= count; call++)); do
    carry="\".devcarry/$call\"" command="bash bench/gpu_session.sh stash"
    mib=$(du -sbL ".devcarry/$call" | cut -f1)
    ((call == 1)) && carry="\".whl\", $carry" command="bash bench/gpu_session.sh install" mib=$((mib + whl))
    ((call == count)) && command="$command && bash bench/gpu_session.sh run"
    echo "| $call | [$carry] | $(((mib + tree) / 1048576)) | \`$command\` |"
  done
}

stash() {
  for part in .devcarry/*/*; do [[ -e $part ]] && mv -f "$part" "$PARTS/"; done
  ls -la "$PARTS"
}

install() {
  local modules=(torch transformers accelerate snakemake jsonschema gguf tensorboard)
  [[ " $EXTRAS " == *" gguf "* ]] && modules+=(llama_cpp)
  [[ $DEEPSPEED == 1 ]] && modules+=(deepspeed)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  "$PY" - "${modules[@]}" <<'PY'
import importlib, sys
from importlib.metadata import packages_distributions, version
distributions = packages_distributions()  # module -> distribution: llama_cpp is llama_cpp_python's
for name in sys.argv[1:]:
    importlib.import_module(name)
print(*(f"{name} {version(distributions[name][0])}" for name in sys.argv[1:]), "cuda",
      importlib.import_module("torch").cuda.is_available())
PY
  stash
}

unpack() { # the carried assets into resources/assets, once, checked against pack's SHA-256
  local sha count names
  [[ -f $PARTS/assets.manifest ]] || return 0
  read -r sha count names <"$PARTS/assets.manifest"
  [[ $(cat "$PARTS/assets.unpacked" 2>/dev/null) == "$sha" ]] && return 0
  local parts=("$PARTS"/assets.tgz.part.*)
  [[ -e ${parts[0]} && ${#parts[@]} == "$count" ]] || {
    echo "error: ${#parts[@]} of the $count parts of the assets in $PARTS: each .devcarry/N of pack's table is carried once" >&2
    return 1
  }
  cat "${parts[@]}" >"$STATE/assets.tgz"
  echo "$sha  $STATE/assets.tgz" | sha256sum -c --quiet - || { echo "error: the assets' parts do not match pack's SHA-256" >&2; return 1; }
  # -m: unpacked now, so newer than the workflow's scripts: Snakemake fetches none of them again
  tar -xzmf "$STATE/assets.tgz" && rm "$STATE/assets.tgz" && echo "$sha" >"$PARTS/assets.unpacked" &&
    say "assets unpacked: $names"
}

check_settings() {
  local extra assets missing=()
  for extra in $EXTRAS; do
    case $extra in equal_compute | one_pass | unigram | gguf | none | train:?*=?* | config:?*=?*) ;; *)
      echo "error: IVR_SESSION_EXTRAS: unknown run '$extra' (equal_compute, one_pass, unigram, train:KEY=VALUE, config:KEY=VALUE, gguf, none)" >&2
      return 1
      ;;
    esac
    if [[ $extra == config:* ]]; then
      local setting settings
      IFS=, read -r -a settings <<<"${extra#config:}"
      for setting in "${settings[@]}"; do
        case ${setting%%.*} in ivr | embeddings | distill) ;; *)
          echo "error: IVR_SESSION_EXTRAS: $extra: $setting is no ivr, embeddings or distill key (a copy shares the default run's corpus, analysis and control; train:KEY=VALUE changes training)" >&2
          return 1
          ;;
        esac
      done
    fi
  done
  assets=$(needed_assets) || return 1
  for asset in $assets; do [[ -d $asset ]] || missing+=("$asset"); done
  ((${#missing[@]} == 0)) || {
    echo "error: missing ${missing[*]} (no network here: run pack before the session and carry its parts)" >&2
    return 1
  }
}

start() { # start fresh|resume: clear the markers, then orchestrate in the background
  if [[ -f $STATE/orchestrate.pid ]] && kill -0 "$(cat "$STATE/orchestrate.pid")" 2>/dev/null; then
    echo "error: a session is still running (pid $(cat "$STATE/orchestrate.pid")): wait or status" >&2
    return 1
  fi
  unpack && check_settings || return 1
  rm -f "$STATE"/*.failed "$STATE"/session.done
  if [[ $1 == fresh ]]; then # the stage logs of an earlier session go to previous/
    rm -rf "$STATE/previous" && mkdir "$STATE/previous"
    for log in "$STATE"/*.log; do [[ -e $log && $log != */session.log ]] && mv "$log" "$STATE/previous/"; done
    rm -f "$STATE"/*.done
  fi
  [[ -n $(ls -A .snakemake/locks 2>/dev/null) ]] && "$PY" -m snakemake --unlock --configfile "${CONFIGS[@]}" --quiet
  setsid nohup bash "$0" orchestrate >"$STATE/orchestrate.log" 2>&1 &
  echo $! >"$STATE/orchestrate.pid"
  sleep 2
  cat "$STATE/session.log"
}

stage() { # stage NAME COMMAND...: run it, log it, mark it done or failed; a stage marked done is kept
  local name=$1
  shift
  if [[ -f $STATE/$name.done ]]; then say "$name: done earlier, kept"; return 0; fi
  rm -f "$STATE/$name.failed"
  say "start $name"
  if "$@" >"$STATE/$name.log" 2>&1; then touch "$STATE/$name.done"; say "done $name"; else
    touch "$STATE/$name.failed"; say "FAILED $name (see $STATE/$name.log)"; return 1; fi
}

base_model() { # the base model's folder, as the workflow converts a GGUF
  cfg "(c['base_model'] if not c['base_model'].endswith('.gguf') else
    'resources/models/' + c['base_model'].rsplit('/', 1)[-1].removesuffix('.gguf'))"
}

extra_train() { # extra_train NAME KEY=VALUE[,KEY=VALUE...]: the IVR model again with training settings changed
  local name=$1 setting=$2 settings base unseen_dev=()
  base=$(base_model) || return 1
  # two lines: the settings (JSON), then the unseen dev texts as train_sft's arguments
  mapfile -t lines < <("$PY" - "$setting" "${CONFIGS[@]}" "${CHOSEN[@]}" <<'PY'
import json, sys
import yaml
sys.path.insert(0, "scripts")
from ivr.config import read_configs
from ivr.retention import unseen_spec
from ivr.train_settings import branch_settings, parse_value
config = read_configs(sys.argv[2:])
training = branch_settings(config["training"], "ivr")
for setting in sys.argv[1].split(","):
    key, value = setting.split("=", 1)
    if key not in training:
        sys.exit(f"error: training.{key} is no training setting")
    training[key] = parse_value(value)
print(json.dumps(training))
print(" ".join(unseen_spec(t) for t in config["unseen_texts"]["dev"]))
PY
) && ((${#lines[@]} == 2)) || return 1
  settings=${lines[0]}
  for spec in ${lines[1]}; do unseen_dev+=(--unseen-dev "$spec"); done
  taskset -c "$TRAIN_CPUS" "$PY" scripts/train_sft.py --model results/model/initialized --data results/data/ivr --dev results/corpus/domain/dev.jsonl \
    --general-dev results/corpus/general/dev.jsonl --rules results/remap/remap_rules.yaml "${unseen_dev[@]}" \
    --reference-model "$base" --compute-reference results/data/control --settings "$settings" --threads 8 \
    --checkpoint-dir "results/checkpoints/$name" --out "results/extra/$name"
}

extra_run() { # extra_run NAME KEY=VALUE: extra_train, then the report of that model
  local name=$1 base unseen=()
  extra_train "$@" || return 1
  base=$(base_model) || return 1
  for spec in $(cfg "' '.join(__import__('ivr.retention').retention.unseen_spec(t) for t in c['unseen_texts']['report'])"); do
    unseen+=(--unseen "$spec")
  done
  "$PY" scripts/validate.py --heldout results/corpus/domain/heldout.jsonl --general-heldout results/corpus/general/heldout.jsonl \
    --compression results/remap/compression.json --fidelity results/tokenizer/fidelity.json "${unseen[@]}" \
    --base-model "$base" --initialized results/model/initialized \
    --sft "results/extra/$name" --control results/model/control --max-documents 300 --byte-budget 2000 \
    --batch-size 32 --prompts 5 --prompt-bytes 120 --new-tokens 64 \
    --out-json "results/extra/$name.validation.json" --out-html "results/extra/$name.validation.html"
}

COPIES=$STATE/copies # the config runs' copies of the work tree
copy_setting() { # copy_setting EXTRA: the config keys of a config: extra (unigram is config:ivr.backend=unigram)
  if [[ $1 == unigram ]]; then echo ivr.backend=unigram; else echo "${1#config:}"; fi
}

copy_name() { # copy_name EXTRA: the folder name of its copy
  [[ $1 == unigram ]] && echo unigram && return
  local setting
  setting=$(copy_setting "$1")
  echo "config_${setting//[:=,\/]/_}"
}

copy_cpu() { # copy_cpu NAME KEY=VALUE[,...]: the workflow in a copy of the work tree ($COPIES/NAME) with
  # those config keys changed (dotted, e.g. ivr.n_reassign=4000), sharing the assets and the base model's
  # folder, with the default run's corpus, analysis and control data (whose rules read no ivr, embeddings
  # or distill setting), then its own CPU stages
  local name=$1 copy=$COPIES/$1 entry
  rm -rf "$copy" && mkdir -p "$copy/results/data" "$copy/.snakemake" || return 1
  for entry in * .[!.]*; do
    case $entry in results | resources | logs | benchmarks | .snakemake | .devcarry | .whl | .git) ;; *) cp -a "$entry" "$copy/" ;; esac
  done
  ln -s "$PWD/resources" "$copy/resources"
  cp -a results/corpus results/analysis "$copy/results/" && cp -a results/data/control "$copy/results/data/" &&
    cp -a .snakemake/metadata "$copy/.snakemake/" || return 1
  [[ -d results/tuning ]] && cp -a results/tuning "$copy/results/" # compile.yaml, which SNAKE_OPTS may name
  "$PY" - "$2" >"$copy/extra.yaml" <<'PY' || return 1
import sys
import yaml
sys.path.insert(0, "scripts")
from ivr.train_settings import apply_overrides
print(yaml.safe_dump(apply_overrides({}, sys.argv[1].split(","), "config:")), end="")
PY
  # beside the default run (SNAKE_OPTS without its --cores N); the rules' script paths differ in the copy,
  # so only missing or older outputs count
  (cd "$copy" && taskset -c "$SIDE_CPUS" "$PY" -m snakemake "${CPU_TARGETS[@]}" --rerun-triggers mtime \
    --cores "$(taskset -c "$SIDE_CPUS" nproc)" "${SNAKE_OPTS[@]:2}" extra.yaml) || return 1
  mkdir -p "results/extra/$name" # its tokenizer's figures, whether or not its training comes to run
  cp "$copy"/results/remap/compression.json "$copy"/results/tokenizer/fidelity.json "results/extra/$name/"
}

copy_train() { # copy_train NAME: the copy's IVR model with the session's settings; its stats into results/extra/NAME
  local copy=$COPIES/$1
  [[ -d results/tuning ]] && cp -a results/tuning "$copy/results/"
  (cd "$copy" && taskset -c "$TRAIN_CPUS" "$PY" -m snakemake results/model/sft --rerun-triggers mtime "${SNAKE_OPTS[@]}" \
    "${CHOSEN[@]}" extra.yaml) ||
    return 1
  cp "$copy"/results/model/sft/{training_stats.json,train_log.jsonl} "results/extra/$1/"
}

GGUF_DIR=results/extra/gguf
trained_ivr() { # the trained IVR model: the final model if the gates let it be written, else the SFT checkpoint
  if [[ -d results/final_model ]]; then echo results/final_model; else echo results/model/sft; fi
}

gguf_export() { # the trained IVR model as GGUF (the base GGUF's type and F16), checked in llama.cpp
  local model base_gguf
  model=$(trained_ivr) base_gguf=$(cfg "c['base_model']")
  [[ $base_gguf == *.gguf ]] || { echo "error: base_model $base_gguf is no GGUF: nothing to time the export against" >&2; return 1; }
  mkdir -p "$GGUF_DIR"
  say "gguf: exporting $model"
  taskset -c "$GGUF_CPUS" "$PY" scripts/export_gguf.py --model "$model" --out "base=$GGUF_DIR/ivr.gguf" --out "F16=$GGUF_DIR/ivr.F16.gguf" \
    --base-gguf "$base_gguf" --check domain=results/corpus/domain/heldout.jsonl \
    --check general=results/corpus/general/heldout.jsonl --threads 2 --report "$GGUF_DIR/gguf_check.json"
}

gguf_speed() { # on the export's cores, which the extra trainings keep off
  taskset -c "$GGUF_CPUS" "$PY" bench/gguf_speed.py --ivr "$GGUF_DIR/ivr.gguf" --base "$(cfg "c['base_model']")" \
    --texts results/corpus/domain/heldout.jsonl --threads 2 --json "$GGUF_DIR/gguf_speed.json"
}

override() { # override KEY VALUE WHY: training.KEY set in results/tuning/compile.yaml, passed after the configs
  mkdir -p results/tuning
  [[ -f results/tuning/compile.yaml ]] || echo "training:" >results/tuning/compile.yaml
  sed -i "/^  $1:/d" results/tuning/compile.yaml
  echo "  $1: $2 # $3" >>results/tuning/compile.yaml
  if [[ " ${CONFIGS[*]} " != *" results/tuning/compile.yaml "* ]]; then
    CONFIGS+=(results/tuning/compile.yaml)
    SNAKE_OPTS+=(results/tuning/compile.yaml)
  fi
  say "training.$1: $2 for this session ($3)"
}

faster() { # faster LINE SLOWEST FASTEST: the line has two ratios, neither below SLOWEST, one above FASTEST
  [[ -n $1 ]] && "$PY" -c "import re, sys; x = [float(v) for v in re.findall(r'([0-9.]+)x', sys.argv[1])]
sys.exit(0 if len(x) == 2 and min(x) > float(sys.argv[2]) and max(x) > float(sys.argv[3]) else 1)" "$@"
}

choose_compile_scope() { # body if the benchmark measured it faster than blocks for both models, and CUDA
  # graphs if they made the body faster for one and slower for neither; without its figures, the configs'
  if [[ $BENCH != skip && -f results/tuning/compile.yaml && results/tuning/compile.yaml -nt $STATE/bench.done ]]; then
    say "compile settings chosen earlier in this session kept: $(grep -v '^training:' results/tuning/compile.yaml | tr -s ' \n' ' ')"
    CONFIGS+=(results/tuning/compile.yaml)
    SNAKE_OPTS+=(results/tuning/compile.yaml)
    return
  fi
  rm -f results/tuning/compile.yaml
  if [[ $BENCH == skip || ! -f $STATE/bench.done ]]; then
    say "no benchmark figures ($([[ $BENCH == skip ]] && echo skipped || echo "it failed: see bench.log")):" \
      "compile_scope $(cfg "c['training']['compile_scope']") and cuda_graphs $(cfg "c['training']['cuda_graphs']")" \
      "as the configs set them"
    return
  fi
  local line graphs_line scope=blocks graphs=false
  line=$(grep "body / blocks, our step" "$STATE/bench.log")
  graphs_line=$(grep "graphs / body, our step" "$STATE/bench.log")
  faster "$line" 1.02 1.02 && scope=body
  [[ $scope == body ]] && faster "$graphs_line" 0.99 1.02 && graphs=true
  override compile_scope "$scope" "measured: ${line:-no figure}"
  override cuda_graphs "$graphs" "measured: ${graphs_line:-no figure}"
}

tune() {
  local configs=()
  for config in "${CONFIGS[@]}"; do configs+=(--configfile "$config"); done
  stage tuning "$PY" bench/tune_training.py "${configs[@]}" --share "${IVR_SESSION_SHARE:-0.125}" \
    --parallel "${IVR_SESSION_PARALLEL:-6}" --micro-batch "${IVR_SESSION_MICRO:-16}" --eval-bytes 2000
}

compiled_body() { [[ $(cfg "c['training']['compile'] and c['training']['compile_scope']") == body ]]; }

orchestrate() {
  say "session starts (configs ${CONFIGS[*]}; benchmark ${BENCH:-on}; extras ${EXTRAS:-none})"
  local bench=
  if [[ $BENCH != skip ]]; then
    # shellcheck disable=SC2086
    stage bench taskset -c 0-3 "$PY" bench/train_throughput.py --mode compare --profile $BENCH &
    bench=$!
  fi
  if ! stage cpu_stages taskset -c "${IVR_SESSION_CPUS:-4-15}" "$PY" -m snakemake "${CPU_TARGETS[@]}" "${SNAKE_OPTS[@]}"; then
    [[ -n $bench ]] && say "waiting for the throughput benchmark (a resume keeps its figures)" && wait "$bench"
    return 1
  fi
  if [[ -n $bench ]]; then
    say "waiting for the throughput benchmark"
    wait "$bench"
  fi
  choose_compile_scope
  local deepspeed= copies=() after=() extra name
  wait_copies() { local pid; for pid in "${copies[@]}"; do wait "$pid"; done; } # none left running on a return
  for extra in $EXTRAS; do # the copies' CPU stages, beside the tuning and the default run
    case $extra in unigram | config:*)
      name=$(copy_name "$extra")
      stage "${name}_cpu" copy_cpu "$name" "$(copy_setting "$extra")" &
      copies+=($!)
      ;;
    esac
  done
  if [[ $DEEPSPEED == 1 ]]; then
    PYTHON="$PY" OUT="$STATE/deepspeed" stage deepspeed_check bash bench/deepspeed_check.sh &
    deepspeed=$!
  fi
  if [[ ${IVR_SESSION_TUNE:-1} == 1 ]]; then
    if ! tune; then
      compiled_body || { wait_copies; return 1; }
      say "tuning failed with compile_scope body: once more by blocks, without CUDA graphs"
      mv "$STATE/tuning.log" "$STATE/tuning_body.log"
      override compile_scope blocks "body failed in the tuning (see tuning_body.log)"
      override cuda_graphs false "body failed in the tuning (see tuning_body.log)"
      tune || { wait_copies; return 1; }
    fi
    CHOSEN=(results/tuning/chosen.yaml)
  fi
  [[ -n $deepspeed ]] && wait "$deepspeed"
  local failed=0 pid
  if ! stage default_run "$PY" -m snakemake results/final_model "${SNAKE_OPTS[@]}" "${CHOSEN[@]}"; then
    failed=1
    # only a failed training is retried: a failed gate or report is the run's result, not a graphs fault
    if grep -q "Error in rule train_sft" "$STATE/default_run.log" &&
      [[ $(cfg "c['training']['cuda_graphs']") == true ]] && compiled_body; then
      say "the default run failed with CUDA graphs: once more without them (it resumes from its checkpoints)"
      mv "$STATE/default_run.log" "$STATE/default_run_graphs.log"
      override cuda_graphs false "failed in the default run (see default_run_graphs.log)"
      stage default_run "$PY" -m snakemake results/final_model "${SNAKE_OPTS[@]}" "${CHOSEN[@]}" && failed=0
    fi
    if ((failed)); then
      [[ -d results/model/sft && -d results/model/control ]] || { wait_copies; return 1; }
      say "the default run failed after its trainings (a gate or the report): the extras still run on its models"
    fi
  fi
  wait_copies
  # side by side: the GPU shared by the extra trainings, cores 0-1 for the GGUF export
  for extra in $EXTRAS; do
    case $extra in
    unigram | config:*)
      name=$(copy_name "$extra")
      if [[ -f $STATE/${name}_cpu.done ]]; then stage "${name}_train" copy_train "$name" & after+=($!); else failed=1; fi
      ;;
    train:*) stage "${extra//[:=,]/_}" extra_train "${extra//[:=,]/_}" "${extra#train:}" & after+=($!) ;;
    gguf) { stage gguf_export gguf_export && stage gguf_speed gguf_speed; } & after+=($!) ;;
    esac
  done
  for pid in "${after[@]}"; do wait "$pid" || failed=1; done
  for extra in $EXTRAS; do
    case $extra in
    equal_compute) stage equal_compute extra_run equal_compute budget=1.0 || failed=1 ;;
    one_pass) stage one_pass extra_run one_pass budget=one_pass || failed=1 ;;
    esac
  done
  return $failed
}

status() {
  cat "$STATE/session.log"
  for log in "$STATE"/*.log; do echo "== $log"; tail -n "${TAIL:-4}" "$log"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
}

case "${1:-}" in
pack) pack ;;
install) install ;;
stash) stash ;;
run) start fresh ;;
resume) start resume ;;
orchestrate)
  if orchestrate; then touch "$STATE/session.done"; say "session done"; else
    touch "$STATE/session.failed"; say "session FAILED: fix the cause, then: bash bench/gpu_session.sh resume"; exit 1; fi
  ;;
wait)
  for ((waited = 0; waited < ${2:-540}; waited += 5)); do
    [[ -f $STATE/session.done || -f $STATE/session.failed ]] && break
    sleep 5
  done
  status
  ;;
status) status ;;
collect)
  for log in "$COPIES"/*/results/checkpoints/sft/train_log.jsonl; do # the copies' trainings, running or not
    [[ -f $log ]] && name=${log#"$COPIES"/} && cp "$log" "results/extra/${name%%/*}/train_log_so_far.jsonl"
  done
  # not the parts, the copies of the work tree (their figures are in results/extra/NAME) or GGUFs
  tar czf "$OUT/session.tar.gz" --ignore-failed-read --exclude=./parts --exclude=./copies --exclude='*.gguf' \
    -C "$STATE" . -C "$PWD" results/report \
    results/tuning/trials.jsonl results/tuning/ablation.md results/tuning/chosen.yaml results/tuning/compile.yaml \
    results/tuning/runs results/extra/*.json results/extra/*.html results/report/gguf_check.json \
    results/extra/*/{training_stats,compression,fidelity,gguf_check,gguf_speed}.json \
    results/model/sft/train_log.jsonl results/model/sft/training_stats.json results/model/control/train_log.jsonl \
    results/model/control/training_stats.json results/extra/*/train_log.jsonl \
    results/checkpoints/*/train_log.jsonl results/extra/*/train_log_so_far.jsonl \
    results/remap/compression.json results/tokenizer/fidelity.json results/analysis/corpus_stats.json \
    results/remap/selection_log.md logs benchmarks results/final_model/README.md results/final_model/PROVENANCE.json \
    2>/dev/null
  ls -la "$OUT"
  ;;
*)
  echo "usage: $0 pack|install|stash|run|resume|wait [SECONDS]|status|collect" >&2
  exit 2
  ;;
esac
