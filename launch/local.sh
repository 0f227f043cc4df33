#!/usr/bin/env bash
# launch/local.sh: one jaxsft process on this machine (its CPU or its one accelerator); the
# debugging path.
#
#   launch/local.sh [--devices K] [--dry-run] CONFIG.yaml [section.key=value ...]
#
#   --devices K   run on the CPU with K fake devices (JAX_PLATFORMS=cpu and
#                 XLA_FLAGS=--xla_force_host_platform_device_count=K), to try a mesh without one
#   --dry-run     print the command instead of running it
#   -h, --help    print this help
#
# It runs `jaxsft train` in the repository root, so relative paths in the config and the overrides
# are taken from there (as in configs/*.yaml); CONFIG may be given relative to the current directory.
# The command is .venv/bin/jaxsft when it exists, else jaxsft on PATH, or $JAXSFT_BIN (a full path).
# Example: launch/local.sh --devices 8 configs/demo.yaml mesh.fsdp=4 mesh.tensor=2 train.steps=10
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'local.sh: %s\n\n' "$1" >&2; usage >&2; exit 2; }

quote() {  # the words as Python's shlex.join writes them
  local w out=()
  for w; do [[ "$w" =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]] && out+=("$w") || out+=("'${w//\'/\'\"\'\"\'}'"); done
  echo "${out[*]}"
}

devices="" dry_run=0 args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --devices) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--devices needs a positive integer"; devices="$2"; shift ;;
    --dry-run) dry_run=1 ;;
    -*) die "unknown option: $1" ;;
    *) args+=("$1") ;;
  esac
  shift
done
((${#args[@]})) || die "missing CONFIG.yaml"
config="${args[0]}"
[[ -f "$config" ]] || { echo "local.sh: config not found: $config" >&2; exit 2; }
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
config="${config#"$root/"}"  # a config inside the repository is named relative to it

jaxsft="${JAXSFT_BIN:-.venv/bin/jaxsft}"  # run in the repository root
[[ -n "${JAXSFT_BIN:-}" || -x "$root/$jaxsft" ]] || jaxsft="jaxsft"
cmd=("$jaxsft" train "$config" "${args[@]:1}")
if [[ -n "$devices" ]]; then
  read -ra flags <<<"${XLA_FLAGS:-}"  # keep the caller's XLA flags, except a device count
  xla=()
  for f in "${flags[@]}"; do [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla+=("$f"); done
  xla+=("--xla_force_host_platform_device_count=$devices")
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${xla[*]}" "${cmd[@]}")
fi

if ((dry_run)); then
  echo "cd $(quote "$root") && $(quote "${cmd[@]}")"
  exit 0
fi
cd "$root"
[[ "$jaxsft" == */* ]] || command -v jaxsft >/dev/null \
  || { echo "local.sh: no $root/.venv/bin/jaxsft and no jaxsft on PATH: run tools/setup.sh first" >&2; exit 1; }
exec "${cmd[@]}"
