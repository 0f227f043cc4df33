#!/usr/bin/env bash
# launch/tpu_vm.sh: train on every worker (host) of a Cloud TPU VM slice, from your machine.
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P] [--skip-install] [--log-dir DIR]
#                    [--dry-run] CONFIG.yaml [section.key=value ...]
#
# 1. copies this repository (without .venv, .git, runs/, launch-logs/) and CONFIG, as
#    ~/jaxsft/launch-config.yaml, to every worker: `gcloud compute tpus tpu-vm scp --worker=all`;
# 2. installs it there in ~/jaxsft/.venv: `pip install -e '.[tpu]'` (Python 3.11+ needed on the
#    workers; skip this step with --skip-install when the code's dependencies did not change);
# 3. runs `python -m jaxsft.cli train` on all workers at once (`tpu-vm ssh --worker=all`), in
#    ~/jaxsft, so relative paths in the config resolve there. jax.distributed.initialize() finds
#    the other workers itself: no JAXSFT_* variables. Each worker logs to ~/jaxsft/launch-logs/train.log;
# 4. copies those logs back, also when training failed: DIR/worker-<i>.log, next to DIR/train.log
#    (what this terminal showed). DIR defaults to launch-logs/NAME in the repository.
# The model and data that the config names must exist on every worker, and run.dir must be storage
# that all workers share (a gcsfuse or Filestore mount) for checkpoints of a multi-host slice.
# --dry-run prints the commands (gcloud is not needed for it). Stopping this script (Ctrl-C) does
# not stop training on the workers: `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all
# --command='pkill -f "jaxsft.cli train"'` does.
# Example: launch/tpu_vm.sh --tpu my-v5p-16 --zone us-east5-a configs/llama3.1-8b-v5p-8.yaml model.path=/mnt/llama
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'tpu_vm.sh: %s\n\n' "$1" >&2; usage >&2; exit 2; }
value() { [[ -n "${2:-}" && "$2" != -* ]] || die "$1 needs a value"; }

tpu="" zone="" project="" install=1 log_dir="" dry_run=0 args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --tpu) value "$1" "${2:-}"; tpu="$2"; shift ;;
    --zone) value "$1" "${2:-}"; zone="$2"; shift ;;
    --project) value "$1" "${2:-}"; project="$2"; shift ;;
    --log-dir) value "$1" "${2:-}"; log_dir="$2"; shift ;;
    --skip-install) install=0 ;;
    --dry-run) dry_run=1 ;;
    -*) die "unknown option: $1" ;;
    *) args+=("$1") ;;
  esac
  shift
done
[[ -n "$tpu" ]] || die "missing --tpu NAME"
[[ -n "$zone" ]] || die "missing --zone ZONE"
((${#args[@]})) || die "missing CONFIG.yaml"
config="${args[0]}"
[[ -f "$config" ]] || { echo "tpu_vm.sh: config not found: $config" >&2; exit 2; }
log_dir="${log_dir:-$root/launch-logs/$tpu}"
stage="${TMPDIR:-/tmp}/jaxsft-tpu-vm-$tpu"  # what is copied: $stage/jaxsft

gcloud=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z "$project" ]] || where+=("--project=$project")
quote() {  # the words as Python's shlex.join writes them
  local w out=()
  for w; do [[ "$w" =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]] && out+=("$w") || out+=("'${w//\'/\'\"\'\"\'}'"); done
  echo "${out[*]}"
}
install_cmd="cd ~/jaxsft && { test -x .venv/bin/python || \"\$(command -v python3.12 || command -v python3.11 \
|| echo python3)\" -m venv .venv; } && .venv/bin/python -m pip install -q -e \".[tpu]\""
train_cmd="cd ~/jaxsft && mkdir -p launch-logs && set -o pipefail && .venv/bin/python -m jaxsft.cli train \
$(quote launch-config.yaml "${args[@]:1}") 2>&1 | tee launch-logs/train.log"
run() { if ((dry_run)); then quote "$@"; else "$@"; fi; }  # prints the command under --dry-run

if ((dry_run)); then
  echo "# stage $root (without .venv .git runs launch-logs) and $config as launch-config.yaml in $stage/jaxsft"
else
  command -v gcloud >/dev/null || { echo "tpu_vm.sh: gcloud is not on PATH (https://cloud.google.com/sdk/docs/install)" >&2; exit 1; }
  rm -rf "$stage" && mkdir -p "$stage/jaxsft" "$log_dir"
  trap 'rm -rf "$stage"' EXIT
  tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./launch-logs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -cf - . | tar -C "$stage/jaxsft" -xf -
  cp "$config" "$stage/jaxsft/launch-config.yaml"
fi
run "${gcloud[@]}" scp "$stage/jaxsft" "$tpu:" "${where[@]}" --worker=all --recurse
((install == 0)) || run "${gcloud[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$install_cmd"

rc=0
if ((dry_run)); then
  run "${gcloud[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$train_cmd"
else
  "${gcloud[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$train_cmd" 2>&1 | tee "$log_dir/train.log" || rc=$?
fi

# `scp --worker=all` only copies to the workers, so the logs come back one worker at a time.
if ((dry_run)); then
  run "${gcloud[@]}" describe "$tpu" "${where[@]}" '--format=value(networkEndpoints.len())'
  echo "# then, for each worker W:"
  run "${gcloud[@]}" scp "$tpu:jaxsft/launch-logs/train.log" "$log_dir/worker-W.log" "${where[@]}" --worker=W
  exit 0
fi
workers="$("${gcloud[@]}" describe "$tpu" "${where[@]}" '--format=value(networkEndpoints.len())')" || workers=0
for ((w = 0; w < workers; w++)); do
  "${gcloud[@]}" scp "$tpu:jaxsft/launch-logs/train.log" "$log_dir/worker-$w.log" "${where[@]}" --worker="$w" \
    || echo "tpu_vm.sh: could not copy the log of worker $w" >&2
done
echo "tpu_vm.sh: training exited with status $rc; logs in $log_dir/" >&2
exit "$rc"
