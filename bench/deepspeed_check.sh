#!/usr/bin/env bash
# DeepSpeed as the set-up installs it, on a GPU: `accelerate launch` of scripts/train_sft.py under
# config/accelerate/deepspeed_zero2.yaml for a few steps of the default model (the initialized IVR model,
# its packed data and rules: results/model/initialized, results/data/ivr, results/remap/remap_rules.yaml),
# stage 1 (only the reassigned rows learn) then full fine-tuning, held rows checked every 2 steps and at
# each stage's end: their fp32 weights (DeepSpeed's master copy) must not move at all.
#   bash bench/deepspeed_check.sh [WHEELS]      (NPROC=2 for two GPUs; OUT=folder for the outputs)
# WHEELS: a folder of wheels to install DeepSpeed, TensorBoard and jsonschema (the settings' check) from,
# with no network, when the Python on PATH lacks them: the deepspeed wheel built as setup.sh builds it
# (DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==<requirements.txt's>) and the wheels
# they need (docs/DEVELOPING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-}
nproc=${NPROC:-1}
out=${OUT:-/tmp/ivr-deepspeed-check}
python=${PYTHON:-python}

if [[ -n $wheels ]] && ! "$python" -c "import deepspeed, tensorboard, jsonschema" 2>/dev/null; then
  "$python" -m pip install -q --no-index --find-links "$wheels" $(grep -E '^(deepspeed|tensorboard|jsonschema)==' requirements.txt)
fi
"$python" -c "import deepspeed, accelerate, torch; print('deepspeed', deepspeed.__version__, 'accelerate',
accelerate.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"

rm -rf "$out/sft" "$out/checkpoints"
mkdir -p "$out"
# a budget of about 8 steps of 8 blocks per GPU: half stage 1, half full fine-tuning
block=$("$python" -c "import json; print(json.load(open('results/data/ivr/meta.json'))['block_size'])")
tokens=$((block * 8 * 8 * nproc))
set -x
"$python" -m accelerate.commands.launch --config_file config/accelerate/deepspeed_zero2.yaml \
  --num_processes "$nproc" --num_machines 1 \
  scripts/train_sft.py --model results/model/initialized --data results/data/ivr \
  --rules results/remap/remap_rules.yaml --out "$out/sft" --checkpoint-dir "$out/checkpoints" \
  --set accelerate=deepspeed_zero2 --set gpus="$nproc" --set bf16=true --set micro_batch_size=8 \
  --set max_tokens="$tokens" --set stage1_share=0.5 --set weight_decay=0.1 --set log_every=1 \
  --set frozen_check_every=2 --set checkpoint_every=4 2>&1 | tee "$out/deepspeed_check.log"
set +x
grep -E "held rows|starting fresh|first loss|saved " "$out/deepspeed_check.log"
"$python" - "$out/sft" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
stats = json.loads((out / "training_stats.json").read_text())
checks = stats["held_row_checks"]
drift = max(c["max_abs_change"] for c in checks)
events = sorted(p.name for p in (out / "tensorboard").rglob("events.out.tfevents.*"))
print(f"DEEPSPEED-CHECK {stats['world']} steps={stats['plan']['total_steps']} held-row checks={len(checks)} "
      f"max abs change={drift:.3e} (fp32 master) vs input before restore="
      f"{stats['held_rows_vs_input']['max_abs_change_before_restore']:.3e} tensorboard files={len(events)}")
sys.exit(0 if drift == 0.0 and len(checks) >= 2 else 1)
EOF
