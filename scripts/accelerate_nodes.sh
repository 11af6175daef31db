#!/usr/bin/env bash
# One `accelerate launch` per node of a Slurm job: the training rule's launcher when training.nodes > 1.
#   accelerate_nodes.sh ACCELERATE-LAUNCH-ARGUMENTS...     (--num_machines N among them; inside a job)
# Run once in the job (rules/train_sft.smk gives the job the SLURM plugin's `mpi` resource, so the plugin
# runs the rule's shell in the batch step rather than under `srun -n1`), it starts one task per node:
#   srun --nodes=N --ntasks=N --ntasks-per-node=1 --cpus-per-task=<the job's CPUs per node> \
#     accelerate_nodes.sh --task ARGS...
# and each task runs `accelerate launch --machine_rank $SLURM_PROCID --main_process_ip <address of the
# step's first node> --main_process_port <20000 + job id mod 20000> ARGS...`. The plugin drops the SLURM_*
# variables before the rule runs, so the job's node count and CPUs are read from squeue; srun sets them
# again in the tasks.
# At the time limit Slurm sends SIGTERM to every process of the job: this script, its tasks and
# accelerate's launcher ignore it (torchrun through TORCHELASTIC_SIGNALS_TO_HANDLE without SIGTERM), so
# only train_sft.py handles it: it finishes its step, saves a checkpoint and exits within KillWait.
set -euo pipefail
trap '' TERM
me=$(realpath "$0")

if [[ ${1:-} == --task ]]; then
  shift
  first=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1)
  addr=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  port=$((20000 + SLURM_JOB_ID % 20000))
  launch=(accelerate launch --machine_rank "$SLURM_PROCID" --main_process_ip "${addr:-$first}"
    --main_process_port "$port")
  echo "accelerate_nodes.sh: task $SLURM_PROCID on node $SLURMD_NODENAME: ${launch[*]} ..." >&2
  exec "${launch[@]}" "$@"
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "accelerate_nodes.sh: not inside a Slurm job; training on several nodes (training.nodes > 1)" \
    "runs through Slurm: snakemake --profile slurm ..." >&2
  exit 2
fi
machines=
args=("$@")
for ((i = 0; i < ${#args[@]} - 1; i++)); do
  [[ ${args[i]} == --num_machines ]] && machines=${args[i + 1]}
done
read -r nodes cpus < <(squeue -h -j "$SLURM_JOB_ID" -o "%D %C")
if [[ $nodes != "$machines" ]]; then
  echo "accelerate_nodes.sh: job $SLURM_JOB_ID has $nodes node(s) but accelerate is told" \
    "--num_machines ${machines:-(none)}" >&2
  exit 2
fi
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
step=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task=$((cpus / nodes))
  --kill-on-bad-exit=1)
echo "accelerate_nodes.sh: ${step[*]} $me --task ${args[*]}" >&2
"${step[@]}" bash "$me" --task "$@"
