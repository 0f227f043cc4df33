#!/usr/bin/env bash
# launch/local_multi.sh: one jaxsft job of N processes on this machine, to run the multi-host code
# paths (distributed init, per-process data, collectives over gloo) without a cluster.
#
#   launch/local_multi.sh [-n N] [--devices-per-process K] [--port PORT] [--platform P]
#                         [--log-dir DIR] [--dry-run] CONFIG.yaml [section.key=value ...]
#
#   -n N                     processes (default 2)
#   --devices-per-process K  devices of each process (default 1): fake CPU devices on the CPU;
#                            with --platform gpu/cuda, process i gets GPUs i*K .. i*K+K-1
#   --port PORT              port of the coordinator (process 0) on localhost (default 12355)
#   --platform P             JAX_PLATFORMS of every process (default cpu)
#   --log-dir DIR            where process_<i>.log go (default launch-logs in the repository root);
#                            process 0 also prints to the terminal
#   --dry-run                print the N commands instead of running them
#   -h, --help               print this help
#
# Process i runs `jaxsft train` in the repository root (relative paths resolve there) with
# JAXSFT_COORDINATOR=localhost:PORT, JAXSFT_NUM_PROCESSES=N and JAXSFT_PROCESS_ID=i, which
# jaxsft.parallel.initialize_distributed reads. When one process fails the others are stopped and
# the exit status is the failed one's; Ctrl-C sends SIGTERM to all (each saves a checkpoint).
# The command is .venv/bin/jaxsft when it exists, else jaxsft on PATH, or $JAXSFT_BIN (a full path).
# Example: launch/local_multi.sh -n 2 --devices-per-process 4 configs/demo.yaml train.steps=20
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) \
  || { echo "local_multi.sh: needs bash 5.1 or newer (wait -n -p); this is $BASH_VERSION" >&2; exit 1; }
usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'local_multi.sh: %s\n\n' "$1" >&2; usage >&2; exit 2; }
quote() {  # the words as Python's shlex.join writes them
  local w out=()
  for w; do [[ "$w" =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]] && out+=("$w") || out+=("'${w//\'/\'\"\'\"\'}'"); done
  echo "${out[*]}"
}
number() { [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer"; }

n=2 per_process=1 port=12355 platform=cpu log_dir="" dry_run=0 args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -n) number "$1" "${2:-}"; n="$2"; shift ;;
    --devices-per-process) number "$1" "${2:-}"; per_process="$2"; shift ;;
    --port) number "$1" "${2:-}"; port="$2"; shift ;;
    --platform) [[ -n "${2:-}" ]] || die "--platform needs a value"; platform="$2"; shift ;;
    --log-dir) [[ -n "${2:-}" ]] || die "--log-dir needs a directory"; log_dir="$2"; shift ;;
    --dry-run) dry_run=1 ;;
    -*) die "unknown option: $1" ;;
    *) args+=("$1") ;;
  esac
  shift
done
((${#args[@]})) || die "missing CONFIG.yaml"
config="${args[0]}"
[[ -f "$config" ]] || { echo "local_multi.sh: config not found: $config" >&2; exit 2; }
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
config="${config#"$root/"}"
if [[ -z "$log_dir" ]]; then log_dir="launch-logs"; elif [[ "$log_dir" != /* ]]; then log_dir="$PWD/$log_dir"; fi
log_dir="${log_dir#"$root/"}"  # the processes run in the repository root

jaxsft="${JAXSFT_BIN:-.venv/bin/jaxsft}"  # run in the repository root
[[ -n "${JAXSFT_BIN:-}" || -x "$root/$jaxsft" ]] || jaxsft="jaxsft"
read -ra flags <<<"${XLA_FLAGS:-}"  # the caller's XLA flags, except a device count
xla=()
for f in "${flags[@]}"; do [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla+=("$f"); done

command_of() {  # the command of process $1, into the array `cmd`
  local devices=()
  if [[ "$platform" == cpu ]]; then
    devices=("XLA_FLAGS=${xla[*]:+${xla[*]} }--xla_force_host_platform_device_count=$per_process")
  elif [[ "$platform" == gpu || "$platform" == cuda || "$platform" == rocm ]]; then
    devices=("CUDA_VISIBLE_DEVICES=$(seq -s, $(($1 * per_process)) $(($1 * per_process + per_process - 1)))")
  fi
  cmd=(env "JAX_PLATFORMS=$platform" "${devices[@]}" "JAXSFT_COORDINATOR=localhost:$port"
       "JAXSFT_NUM_PROCESSES=$n" "JAXSFT_PROCESS_ID=$1" "$jaxsft" train "$config" "${args[@]:1}")
}

if ((dry_run)); then
  for ((i = 0; i < n; i++)); do
    command_of "$i"
    echo "cd $(quote "$root") && $(quote "${cmd[@]}")"
  done
  echo "# logs: $log_dir/process_<i>.log; process 0 also to the terminal"
  exit 0
fi
cd "$root"
[[ "$jaxsft" == */* ]] || command -v jaxsft >/dev/null \
  || { echo "local_multi.sh: no $root/.venv/bin/jaxsft and no jaxsft on PATH: run tools/setup.sh first" >&2; exit 1; }
mkdir -p "$log_dir"
logs="$log_dir"
[[ "$logs" == /* ]] || logs="$root/$logs"  # as the messages name it

declare -A running  # pid -> process id
stop() {  # SIGTERM to the processes still running, SIGKILL to those left after $1 seconds
  local pid t
  for pid in "${!running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < $1 * 5; t++)); do
    for pid in "${!running[@]}"; do kill -0 "$pid" 2>/dev/null || unset "running[$pid]"; done
    ((${#running[@]})) || return 0
    sleep 0.2
  done
  for pid in "${!running[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local_multi.sh: interrupted, stopping all processes" >&2; stop 60; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  command_of "$i"
  if ((i == 0)); then
    "${cmd[@]}" > >(tee "$log_dir/process_0.log") 2>&1 &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  running[$!]=$i
done

while ((${#running[@]})); do
  rc=0
  wait -n -p pid "${!running[@]}" || rc=$?
  i="${running[$pid]}"
  unset "running[$pid]"
  if ((rc)); then
    echo "local_multi.sh: process $i exited with status $rc (log: $logs/process_$i.log); stopping the others" >&2
    stop 5
    wait || true
    exit "$rc"
  fi
done
wait  # for the terminal copy of process 0's output
echo "local_multi.sh: all $n processes finished; logs in $logs/" >&2
