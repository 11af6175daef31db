#!/usr/bin/env bash
# The training rule's script on the GPU, as the rule runs it (accelerate launch, config/gpu.yaml's settings,
# the launcher ignoring SIGTERM), in the default model's shape: stage 1 (reassigned rows) and stage 2
# (full), dev evaluation, a SIGTERM in stage 2 (what Slurm sends at a time limit), then the rerun that
# resumes from its checkpoint and finishes. Prints the resumption, the held-row checks and the tokens/s
# the train log reports, and writes logs and stats to OUT. About 3 minutes on an H200.
#
#   bash bench/train_rule_check.sh prepare DIR     (here: needs the fetched assets, writes 27 MB into DIR)
#   bash bench/train_rule_check.sh DIR [OUT]       (on the GPU machine, DIR carried there)
#
# prepare writes DIR/tok (SmolLM2-135M's config and tokenizer, from the GGUF asset), DIR/data (6,763 Korean
# bills packed by scripts/pack_data.py into 7,544 blocks of 1024 tokens: 236 steps of config/gpu.yaml's
# batch), DIR/remap_rules.yaml (300 reassigned rows and a frozen special token) and DIR/dev.jsonl (64 other
# bills). The weights are built from the config (random): tokens/s do not depend on them.
# WHEELS: a folder of wheels for jsonschema and what it needs, installed when it is missing.
# CHECK_SET: more `--set KEY=VALUE` arguments (a CPU rehearsal: "--set compile=false --set max_tokens=...").
set -euo pipefail
PY=${PY:-python3}
if [ "${1:-}" = prepare ]; then
  DIR=${2:?usage: bench/train_rule_check.sh prepare DIR}
  mkdir -p "$DIR/tok"
  tmp=$(mktemp -d)
  "$PY" scripts/gguf_to_hf.py --out "$tmp/hf" resources/assets/smollm2_gguf/SmolLM2-135M-Instruct.Q4_1.gguf
  cp "$tmp"/hf/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$DIR/tok/"
  "$PY" - "$DIR" "$tmp/train.jsonl" <<'EOF'
import json
import sys

import pyarrow.parquet as pq
import yaml

folder, train = sys.argv[1], sys.argv[2]
table = pq.read_table("resources/assets/korean_bills/bill_texts.parquet", columns=["propose_reason"])
texts = [t for t in table.column("propose_reason").to_pylist() if t and t.strip()]
with open(f"{folder}/dev.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[:64])
size = 0
with open(train, "w", encoding="utf-8") as f:
    for text in texts[200:]:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        size += len(text.encode())
        if size > 9_000_000:
            break
rules = [{"id": i, "kind": "ngram", "old_token": None, "new_token": f"t{i}", "base_ids": [1, 2], "frozen": False}
         for i in range(40000, 40300)]
rules.insert(0, {"id": 0, "kind": "special", "old_token": "<|endoftext|>", "new_token": "<|endoftext|>",
                 "base_ids": [], "frozen": True})
with open(f"{folder}/remap_rules.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump({"version": 1, "reassignments": rules}, f)
EOF
  "$PY" scripts/pack_data.py --tokenizer "$DIR/tok" --train "$tmp/train.jsonl" --out-dir "$DIR/data" --block-size 1024
  rm -rf "$tmp"
  exit 0
fi
DIR=${1:?usage: bench/train_rule_check.sh DIR [OUT]}
OUT=${2:-/tmp/ivr_rule_check_out}
WORK=${WORK:-/tmp/ivr_rule_check}
STOP_AT=${STOP_AT:-150}  # SIGTERM once the log shows this step
if ! "$PY" -c "import jsonschema" 2>/dev/null; then  # the GPU machine's image lacks it
  [ -n "${WHEELS:-}" ] || { echo "jsonschema is missing: set WHEELS to a folder with its wheels (docs/DEVELOPING.md)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*"; }

"$PY" - "$DIR/tok" "$WORK/model" <<'EOF'
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
# from_config zeroes the padding id's row (SmolLM2: id 2, also its end of text); a block that starts with
# it then carries an exactly zero residual through every layer, and each RMSNorm's backward multiplies the
# gradient there by 1/sqrt(eps) (~316): inf by layer 3, NaN everywhere after clipping. Trained weights
# have no zero rows; so that random ones have none either:
model.get_input_embeddings().weight.data.normal_(0.0, config.initializer_range)
model.save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF

train() {
  # shellcheck disable=SC2086
  bash -c 'trap "" TERM; exec "$@"' train "$PY" -m accelerate.commands.launch --config_file config/accelerate/single_gpu.yaml \
    --num_processes 1 --num_machines 1 scripts/train_sft.py --model "$WORK/model" --data "$DIR/data" \
    --rules "$DIR/remap_rules.yaml" --dev "$DIR/dev.jsonl" --settings config/gpu.yaml --set stage1_share=0.2 \
    --set log_every=10 --set eval_every=60 ${CHECK_SET:-} --out "$WORK/out" --checkpoint-dir "$WORK/ck"
}

say "run 1: until step $STOP_AT, then SIGTERM"
( set +e; train > "$OUT/run1.log" 2>&1; echo $? > "$WORK/run1.rc" ) &
until grep -q "\"step\": $STOP_AT," "$OUT/run1.log" 2>/dev/null || [ -e "$WORK/run1.rc" ]; do sleep 0.5; done
pkill -TERM -f "scripts/train_sft.py" || true
while [ ! -e "$WORK/run1.rc" ]; do sleep 0.5; done
say "run 1 exit status $(cat "$WORK/run1.rc") (the launcher's 1 for the script's 143 after a checkpoint)"
say "run 2: the rerun"
train > "$OUT/run2.log" 2>&1 && echo 0 > "$WORK/run2.rc" || echo $? > "$WORK/run2.rc"
say "run 2 exit status $(cat "$WORK/run2.rc")"

cp "$WORK"/out/train_log.jsonl "$WORK"/out/training_stats.json "$OUT"/ 2>/dev/null || true
grep -hE "stage [12] \(|resumed|held rows, stage|first loss|SIGTERM|Error|error" "$OUT"/run1.log "$OUT"/run2.log | cut -c1-220
"$PY" - "$WORK/out" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
speeds = [r["tokens_per_s"] for r in records if r.get("stage") == 2 and "tokens_per_s" in r and r["step"] % 10 == 0]
stats = json.loads((out / "training_stats.json").read_text())
print(f"train log: {len(records)} records, steps {records[0]['step']}..{records[-1]['step']}; stage 2 tokens/s "
      f"median {statistics.median(speeds):,.0f} over {len(speeds)} windows of 10 steps (min {min(speeds):,.0f}, "
      f"max {max(speeds):,.0f})")
print("stats:", {k: stats.get(k) for k in ("optimizer_steps", "tokens_seen", "tokens_per_s", "wall_clock_s",
                                           "gpu_seconds", "first_loss", "final_loss", "dev_bpb", "held_row_checks")})
EOF
