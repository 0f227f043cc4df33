#!/usr/bin/env bash
# launch/gke_jobset.sh: a JobSet manifest that trains on one TPU slice of a GKE cluster.
#
#   launch/gke_jobset.sh --image IMAGE --tpu-type TYPE --config CONFIG.yaml [--name NAME]
#                        [--restarts N] [--apply] [--dry-run] [section.key=value ...]
#
#   --image IMAGE    container image with jaxsft installed (`pip install '.[tpu]'`), whose working
#                    directory holds the config and the relative paths it names
#   --tpu-type TYPE  v5p-16, v4-32 (TensorCores: 2 per chip), v5e-16 (or v5litepod-16), v6e-8 (chips)
#   --config PATH    the config, as a path inside the image
#   --name NAME      JobSet name (default jaxsft)
#   --restarts N     times JobSet recreates the whole slice after a failure (default 0); jaxsft
#                    resumes from the newest checkpoint in run.dir
#   --apply          pipe the manifest to `kubectl apply -f -` (needs kubectl and a cluster context)
#   --dry-run        print the manifest only, as without --apply
#
# One pod per TPU host: parallelism = completions = hosts of the slice (4 chips each; v5e/v6e
# slices of up to 8 chips are one host). Every pod runs `python -m jaxsft.cli train CONFIG ...`;
# jax.distributed.initialize() finds the other hosts from the variables GKE sets for TPU pods.
# run.dir must be storage every pod sees (e.g. a gcsfuse CSI volume, added to the manifest).
# Example: launch/gke_jobset.sh --image us-docker.pkg.dev/p/r/jaxsft:1 --tpu-type v5p-16 \
#            --config configs/llama3.1-8b-v5p-8.yaml run.dir=/gcs/runs/llama > jobset.yaml
set -euo pipefail

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'gke_jobset.sh: %s\n\n' "$1" >&2; usage >&2; exit 2; }
value() { [[ -n "${2:-}" && "$2" != -* ]] || die "$1 needs a value"; }
yaml_str() { local s="${1//\\/\\\\}"; printf '"%s"' "${s//\"/\\\"}"; }  # a YAML double-quoted scalar

name=jaxsft image="" tpu_type="" config="" restarts=0 apply=0 dry_run=0 overrides=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) value "$1" "${2:-}"; name="$2"; shift ;;
    --image) value "$1" "${2:-}"; image="$2"; shift ;;
    --tpu-type) value "$1" "${2:-}"; tpu_type="$2"; shift ;;
    --config) value "$1" "${2:-}"; config="$2"; shift ;;
    --restarts) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--restarts needs a number"; restarts="$2"; shift ;;
    --apply) apply=1 ;;
    --dry-run) dry_run=1 ;;
    -*) die "unknown option: $1" ;;
    *) overrides+=("$1") ;;
  esac
  shift
done
[[ -n "$config" ]] || die "missing --config CONFIG.yaml"
[[ -n "$image" ]] || die "missing --image IMAGE"
[[ -n "$tpu_type" ]] || die "missing --tpu-type TYPE"
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name $name: lower-case letters, digits and '-' only"

# The slice: GKE's accelerator label, chips, and the topology jaxsft/aot.py's parse_topology gives.
size="${tpu_type##*-}"
[[ "$size" =~ ^[0-9]+$ ]] || die "--tpu-type $tpu_type: expected GENERATION-SIZE, e.g. v5p-16"
case "${tpu_type%-*}" in
  v4) accelerator=tpu-v4-podslice dims=3 chips=$((size / 2)) ;;
  v5p) accelerator=tpu-v5p-slice dims=3 chips=$((size / 2)) ;;
  v5e | v5litepod) accelerator=tpu-v5-lite-podslice dims=2 chips=$size ;;
  v6e) accelerator=tpu-v6e-slice dims=2 chips=$size ;;
  *) die "--tpu-type $tpu_type: known generations are v4, v5p, v5e (v5litepod), v6e" ;;
esac
((chips >= 1 && (chips & (chips - 1)) == 0)) || die "--tpu-type $tpu_type: $chips chips is not a power of two"
sides=(1 1 1) product=1
((dims == 3)) || sides=(1 1)
while ((product < chips)); do  # double the first smallest side: 8 -> 2,2,2 / 4,2; 16 -> 4,2,2 / 4,4
  small=0
  for i in "${!sides[@]}"; do ((sides[i] < sides[small])) && small=$i; done
  sides[small]=$((sides[small] * 2)) product=$((product * 2))
done
sorted=()  # the sides never increase along the array: reversed, they are sorted
for ((i = ${#sides[@]} - 1; i >= 0; i--)); do sorted+=("${sides[i]}"); done
((dims == 2 || sorted[0] > 1)) || sorted=("${sorted[@]:1}" 1)  # 3-D slices put the 1 last: 2x2x1
topology="$(IFS=x; echo "${sorted[*]}")"
per_host=4
((chips < 4 || (dims == 2 && chips == 8))) && per_host=$chips
hosts=$((chips / per_host))

command=""
for word in python -m jaxsft.cli train "$config" "${overrides[@]}"; do command+="${command:+, }$(yaml_str "$word")"; done
manifest="# jaxsft on GKE: JobSet $name, one $tpu_type slice (topology $topology, $chips chips) = $hosts host(s) x $per_host chips.
# Start it: kubectl apply -f - < this file (or rerun with --apply); delete it: kubectl delete jobset $name
# Logs of every host: kubectl logs -f --prefix --max-log-requests=$hosts -l jobset.sigs.k8s.io/jobset-name=$name
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $name
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool  # one slice per node pool
spec:
  failurePolicy:
    maxRestarts: $restarts
  replicatedJobs:
  - name: slice
    replicas: 1  # TPU slices
    template:
      spec:
        parallelism: $hosts  # one pod per TPU host
        completions: $hosts
        backoffLimit: 0  # a failed host fails the slice; JobSet restarts all of it (maxRestarts)
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true  # the TPU hosts talk over the node network
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $accelerator
              cloud.google.com/gke-tpu-topology: $topology
            containers:
            - name: jaxsft
              image: $(yaml_str "$image")
              command: [$command]
              ports:
              - containerPort: 8471  # TPU runtime between hosts
              resources:
                limits:
                  google.com/tpu: $per_host"

if ((!apply || dry_run)); then
  echo "$manifest"
  exit 0
fi
command -v kubectl >/dev/null \
  || { echo "gke_jobset.sh: --apply needs kubectl on PATH (and a context for the GKE cluster)" >&2; exit 1; }
kubectl apply -f - <<<"$manifest"
