#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the cluster path (and for the tests
# in tests/test_slurm_real.py). Needs root and Debian's packages:
#   apt-get install slurm-wlm munge
#
#   scripts/slurm_local.sh start DIR    # start munged, slurmctld, slurmd; state, logs, config in DIR
#   eval "$(scripts/slurm_local.sh env DIR)"   # point sbatch/squeue/scontrol at it (SLURM_CONF)
#   scripts/slurm_local.sh stop DIR     # stop the three daemons (DIR stays, with the logs)
#
# The cluster: one node (this host) advertising CPUS (default 2) CPUs and MEM_MB of
# memory, one partition `debug`, no accounting (submitit then warns "accounting storage is
# disabled" on status queries; jobs still run and results are still read from their files).
# Everything is private to DIR: its own munge socket and key, free ports, its own state, so
# it does not touch a system SLURM or munge and several can run at once.
set -euo pipefail

usage() { echo "usage: $0 start|stop|env DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pid_of() { [ -s "$1" ] && cat "$1" || true; }

start() {
  [ "$(id -u)" -eq 0 ] || { echo "slurm_local.sh: needs root (slurmd runs jobs as their users); run it as root" >&2; exit 3; }
  for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || { echo "slurm_local.sh: $tool not found; install the packages: apt-get install slurm-wlm munge" >&2; exit 3; }
  done
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 700 "$dir/munge"
  [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --force
  chmod 600 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

  local host mem
  host=$(hostname -s)
  mem=${MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))}
  cat >"$conf" <<EOF
ClusterName=zsbirlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds after the requeue (default 120).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs (e.g. requeued ones) are looked at every 5 s instead of every 60 s.
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
# Short waits: a cancelled step is killed 10 s after its SIGTERM; finished jobs stay visible 5 min.
KillWait=10
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=${CPUS:-2} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$conf
  slurmctld -f "$conf" -i
  slurmd -f "$conf" -N "$host"
  # Up when the node accepts jobs (seconds).
  for _ in $(seq 60); do
    if sinfo -h -n "$host" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM is up: export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "slurm_local.sh: the node did not come up within 60 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  stop
  exit 4
}

# slurmctld, slurmd and the job step daemons (slurmstepd) of this cluster: they run in DIR.
slurm_pids() {
  local proc
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/cwd" 2>/dev/null)" = "$dir" ] || continue
    case "$(cat "$proc/comm" 2>/dev/null)" in slurmctld|slurmd|slurmstepd) echo "${proc#/proc/}" ;; esac
  done
}

stop() {
  export SLURM_CONF=$conf
  # Jobs first, and wait until they have left the queue: a job step still reporting its end
  # would otherwise outlive the daemons (slurmd does not stop while it has steps).
  if [ -f "$conf" ]; then
    scancel --quiet --partition=debug 2>/dev/null || true
    for _ in $(seq 60); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  local pids
  pids=$(slurm_pids)
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
  for _ in $(seq 20); do
    pids=$(slurm_pids)
    [ -z "$pids" ] && break
    sleep 0.5
  done
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  # munge last: the slurm daemons authenticate their last messages with it.
  pids=$(pid_of "$dir/munge/munged.pid")
  [ -z "$pids" ] || kill "$pids" 2>/dev/null || true
}

case $action in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) usage ;;
esac
