#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests: munge, slurmctld, and two slurmd (nodes ivr1
# and ivr2, each with a fake GPU), so that a job can span two nodes (training.nodes: 2).
#   bash tests/slurm/cluster.sh start   # writes /etc/slurm/slurm.conf, starts the daemons, waits for idle
#   bash tests/slurm/cluster.sh stop    # stops every daemon it started, by the PIDs it recorded
# Needs root and the Debian packages slurmctld slurmd slurm-client munge (setup.sh installs them
# with IVR_SETUP_TEST_TOOLS=1). The configuration must live at /etc/slurm/slurm.conf: the jobstep
# plugin drops SLURM_CONF before its inner srun.
# Time limits (test_slurm.py kills a training job at one): slurmctld checks them about every 30 s, sends
# SIGTERM when a job is past its limit (OverTimeLimit=0) and SIGKILL KillWait=30 s later; MinJobAge keeps
# finished jobs in scontrol for an hour, so a test can read each attempt's TimeLimit and JobState.
# The two nodes: `slurmd -N ivr1` and `slurmd -N ivr2` on this host (NodeHostname), each on its own port
# of 127.0.0.1 (NodeAddr, Port), with its own spool, pid and log file (%n in their paths). Each node
# claims all of this machine's CPUs and memory but 1 GiB, so the cluster oversubscribes them twice, and
# two fake GPUs (/dev/null and /dev/zero), so that a one-node GPU job can run beside a two-node one.
set -euo pipefail
STATE=${IVR_SLURM_STATE:-/tmp/ivr-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by ivr tests/slurm/cluster.sh"

start() {
  if [[ -f $CONF ]] && ! grep -q "$MARK" "$CONF"; then
    echo "cluster.sh: $CONF exists and is not ours; refusing to overwrite it" >&2
    exit 1
  fi
  if [[ -s $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "cluster.sh: a test cluster is already running (slurmctld $(cat "$STATE/slurmctld.pid")):" \
      "another test run is using it; wait for it, or stop it with: $0 stop" >&2
    exit 1
  fi
  mkdir -p "$STATE"/{state,spool,log} /etc/slurm /run/munge
  chown munge:munge /run/munge
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(($(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024))
  cat >"$CONF" <<CONF
$MARK
ClusterName=ivrtest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=3600
KillWait=30
OverTimeLimit=0
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=ivr1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6818 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem Gres=gpu:2 State=UNKNOWN
NodeName=ivr2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6819 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=ivr[1-2] Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ivr[1-2] MaxTime=INFINITE State=UP
CONF
  echo "NodeName=ivr[1-2] Name=gpu File=/dev/null,/dev/zero" >/etc/slurm/gres.conf
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/munged.pid" 2>/dev/null || runuser -u munge -- /usr/sbin/munged
  [[ -s $STATE/munged.pid ]] || pgrep -n munged >"$STATE/munged.pid"
  slurmctld -c # -c: no jobs recovered from an earlier test cluster's state
  slurmd -N ivr1
  slurmd -N ivr2
  for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o %T 2>/dev/null | sort -u) == idle ]]; then
      echo "cluster.sh: slurm is up on $host: nodes ivr1 and ivr2"
      return 0
    fi
    sleep 1
  done
  echo "cluster.sh: the nodes never became idle; see $STATE/log" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  for name in slurmd-ivr1 slurmd-ivr2 slurmctld munged; do
    local pidfile=$STATE/$name.pid
    if [[ -s $pidfile ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  echo "cluster.sh: stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
