#!/usr/bin/env bash
# Training (or a sampling, evaluation or latent caching job) on every worker of a Cloud TPU VM pod slice (e.g.
# v4-32: 4 hosts), run from your workstation with gcloud.
#
#   TPU_NAME=my-pod ZONE=us-central2-b PROJECT=my-project bash launch/tpu_pod.sh -- \
#       --config=configs/txt2img.py:sd --workdir=/mnt/shared/runs/txt2img
#   STEPS=train TPU_NAME=... ZONE=... PROJECT=... bash launch/tpu_pod.sh -- ...   # tree already copied, installed
#   ENTRY=sample STEPS=train TPU_NAME=... bash launch/tpu_pod.sh -- --workdir=/mnt/shared/runs/txt2img \
#       --prompts_file=coco30k.tsv --outdir=/mnt/shared/samples/coco30k   # the same command again resumes it
#
# Three steps, each on all workers at once (gcloud ... --worker=all): copy this working tree, as one archive, (tracked files plus
# untracked ones git does not ignore: no .venv, no runs/) to $REMOTE_DIR, install it (pip install -e . plus jax[tpu])
# into the virtual environment $REMOTE_VENV, then run the same `python -m ldm_jax.$ENTRY <args after -->` on every
# worker. LDM_JAX_DISTRIBUTED=auto makes ldm_jax.$ENTRY call jax.distributed.initialize(), which finds the workers,
# the coordinator and this worker's id in the TPU VM metadata.
#
# --workdir must be one directory every worker sees: a shared filesystem (Filestore/NFS, or a bucket mounted with
# gcsfuse) mounted at the same path on every worker. gs:// URLs are refused: checkpoints and logs are written with
# local file APIs. Only process 0 writes logs and previews; every worker writes its share of each checkpoint.
#
# Knobs (environment variables, defaults in brackets):
#   TPU_NAME, ZONE, PROJECT  the pod slice (required)
#   STEPS          which steps to run, comma-separated [copy,install,train] ("train" runs ENTRY)
#   ENTRY          the ldm_jax module every worker runs: train, sample, evaluate or cache_latents [train]
#   REMOTE_DIR     the tree's directory on the workers [ldm_jax, relative to the remote home directory]
#   REMOTE_VENV    the virtual environment on the workers [ldm_jax_venv]
#   REMOTE_PYTHON  interpreter that creates it; the package needs Python >= 3.11 [python3]
#   JAX_TPU        the pip requirement for JAX on TPU [jax[tpu]]
#   TRAIN_ENV      extra VAR=value settings for the training processes, space-separated [] (e.g. LIBTPU_INIT_ARGS=...)
# A worker still holding the TPU from an earlier run fails with "TPU in use"; find it with
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --project=$PROJECT --worker=all --command='sudo lsof -w /dev/accel*'
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-central2-b}"
: "${PROJECT:?set PROJECT to the Google Cloud project}"
STEPS="${STEPS:-copy,install,train}"
REMOTE_DIR="${REMOTE_DIR:-ldm_jax}"
REMOTE_VENV="${REMOTE_VENV:-ldm_jax_venv}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
JAX_TPU="${JAX_TPU:-jax[tpu]}"
TRAIN_ENV="${TRAIN_ENV:-}"
ENTRY="${ENTRY:-train}"
case "$ENTRY" in
  train | sample | evaluate | cache_latents) ;;
  *)
    echo "ENTRY=$ENTRY: must be train, sample, evaluate or cache_latents" >&2
    exit 2
    ;;
esac

has_step() {
  case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}
if [ "${1:-}" = "--" ]; then
  shift
fi
for arg in "$@"; do
  case "$arg" in
    --workdir=gs://* | --config.first_stage.workdir=gs://* | --config.init_from=gs://* | --outdir=gs://*)
      echo "$arg: gs:// paths are not supported; use a shared filesystem mounted on every worker" >&2
      exit 2
      ;;
  esac
done
if has_step train && [ "$#" -eq 0 ]; then
  echo "usage: [ENTRY=train|sample|evaluate|cache_latents] $0 -- <flags of ldm_jax.\$ENTRY>, e.g." >&2
  echo "       $0 -- --config=configs/<task>.py[:preset] --workdir=<shared path> [more ldm_jax.train flags]" >&2
  exit 2
fi

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --project="$PROJECT" --worker=all)
# on_all COMMAND: runs the shell COMMAND on every worker in parallel (gcloud prefixes each line with the worker),
# after setting D (the tree) and V (the virtual environment) to absolute paths there.
on_all() {
  local prelude
  prelude="D=$(printf '%q' "$REMOTE_DIR"); V=$(printf '%q' "$REMOTE_VENV")"
  prelude+='; case $D in /*) ;; *) D=$HOME/$D ;; esac; case $V in /*) ;; *) V=$HOME/$V ;; esac; set -e; '
  "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$prelude$1"
}

if has_step copy; then
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  # Tracked and untracked-but-not-ignored files that exist (a deleted tracked file is skipped).
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [ -f "$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar --null -T - -czf "$stage/ldm_jax_tree.tgz"
  # One archive rather than scp --recurse over the tree: one transfer per worker.
  "${gc[@]}" scp "$stage/ldm_jax_tree.tgz" "$TPU_NAME:ldm_jax_tree.tgz" "${where[@]}"
  # Replaces the previous copy wholesale, so files deleted here disappear there too.
  on_all 'rm -rf "$D" && mkdir -p "$D" && tar -xzf ~/ldm_jax_tree.tgz -C "$D" && rm ~/ldm_jax_tree.tgz'
fi

if has_step install; then
  py="$(printf '%q' "$REMOTE_PYTHON")"
  on_all "$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"ldm_jax needs Python >= 3.11; \
$py is older: set REMOTE_PYTHON\" >&2; exit 1; }; "'[ -x "$V/bin/python" ] || '"$py"' -m venv "$V"; cd "$D"; '\
'"$V/bin/python" -m pip install -q --upgrade pip; "$V/bin/python" -m pip install -q -e . '"$(printf '%q' "$JAX_TPU")"
fi

if has_step train; then
  on_all 'cd "$D"; env LDM_JAX_DISTRIBUTED=auto '"$TRAIN_ENV"' "$V/bin/python" -m ldm_jax.'"$ENTRY $(printf '%q ' "$@")"
fi
