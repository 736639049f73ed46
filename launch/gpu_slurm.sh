#!/usr/bin/env bash
# A multi-host job on a GPU cluster under SLURM: one srun step, the same `python -m ldm_jax.<ENTRY>` in every task
# (training by default; sampling, evaluation and latent caching jobs the same way). Submit from the repository root
# (sbatch copies this script; the job runs in the submission directory):
#
#   sbatch launch/gpu_slurm.sh --config=configs/txt2img.py:sd --workdir=/shared/runs/txt2img
#   sbatch --nodes=4 --time=48:00:00 launch/gpu_slurm.sh --config=... --workdir=...      # sbatch flags override
#   MODE=per_gpu sbatch --ntasks-per-node=8 launch/gpu_slurm.sh --config=... --workdir=...
#   ENTRY=sample sbatch launch/gpu_slurm.sh --workdir=/shared/runs/txt2img --prompts_file=coco30k.tsv \
#       --outdir=/shared/samples/coco30k --output_format=webdataset     # resubmit the same command to resume
#
# MODE=per_node (default): one process per node that drives all the node's GPUs (--ntasks-per-node=1).
# MODE=per_gpu: one process per GPU (--ntasks-per-node = GPUs per node); task SLURM_LOCALID uses GPU SLURM_LOCALID,
# or GPU 0 of its own when SLURM gives each task one GPU (--gpus-per-task=1 / --gpu-bind=single:1).
# Arguments are the flags of ldm_jax.<ENTRY>. JAX reads the coordinator (first node of the step), the process count and each
# process's id from SLURM's variables (jax.distributed.initialize() auto-detection; the port comes from the job id,
# or set JAX_COORDINATOR_PORT). --local_device_ids, which this script passes, tells each process which GPUs are its.
#
# --workdir (and --config.first_stage.workdir, --config.init_from) must be on a filesystem every node mounts at the
# same path (NFS, Lustre, GPFS...): all processes write their shares of each checkpoint there; only process 0 writes
# logs and previews. Relative paths resolve from the submission directory, so that must be shared as well.
#
# Knobs (environment variables, exported to the job by sbatch; defaults in brackets):
#   MODE           per_node or per_gpu [per_node]
#   ENTRY          the ldm_jax module every process runs: train, sample, evaluate or cache_latents [train]
#   PYTHON         the interpreter of an environment with `pip install -e . "jax[cuda12]"`, on the shared
#                  filesystem [.venv/bin/python]
#   GPUS_PER_NODE  used when SLURM does not say (SLURM_GPUS_ON_NODE unset) [the node's nvidia-smi -L count]
#
# sbatch reads the #SBATCH lines below (flags on the sbatch command line override them).
#SBATCH --job-name=ldm_jax
# Hosts:
#SBATCH --nodes=2
# GPUs on each host:
#SBATCH --gpus-per-node=8
# Processes on each host: 1 for MODE=per_node; for MODE=per_gpu, the GPUs per host (sbatch --ntasks-per-node=8):
#SBATCH --ntasks-per-node=1
# CPU cores per process (input pipeline, XLA compiler threads); for MODE=per_gpu at most cores per host / GPUs:
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
# SIGTERM to every task 120 s before the time limit: the run saves a checkpoint and stops; resubmit to resume.
#SBATCH --signal=TERM@120
# One log for all tasks (srun --label prefixes each line with its task id):
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

MODE="${MODE:-per_node}"
ENTRY="${ENTRY:-train}"
case "$ENTRY" in
  train | sample | evaluate | cache_latents) ;;
  *)
    echo "ENTRY=$ENTRY: must be train, sample, evaluate or cache_latents" >&2
    exit 2
    ;;
esac
PYTHON="${PYTHON:-.venv/bin/python}"
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "run this through sbatch (see the usage at the top of $0)" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  echo "usage: [ENTRY=train|sample|evaluate|cache_latents] sbatch $0 <flags of ldm_jax.\$ENTRY>, e.g." >&2
  echo "       sbatch $0 --config=configs/<task>.py[:preset] --workdir=<shared path> [more ldm_jax.train flags]" >&2
  exit 2
fi
gpus="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}}"
tasks="${SLURM_NTASKS_PER_NODE:-1}"
case "$MODE" in
  per_node)
    if [ "$tasks" != 1 ]; then
      echo "MODE=per_node needs --ntasks-per-node=1, got $tasks" >&2
      exit 2
    fi
    ;;
  per_gpu)
    if [ "$tasks" != "$gpus" ]; then
      echo "MODE=per_gpu needs --ntasks-per-node equal to the GPUs per node ($gpus), got $tasks" >&2
      exit 2
    fi
    ;;
  *)
    echo "MODE=$MODE: must be per_node or per_gpu" >&2
    exit 2
    ;;
esac
export MODE PYTHON ENTRY
echo "job $SLURM_JOB_ID: ldm_jax.$ENTRY, $SLURM_JOB_NUM_NODES nodes x $tasks processes ($MODE), $gpus GPUs per node"

# Per task: which GPUs (CUDA ordinals, counted within CUDA_VISIBLE_DEVICES) this process uses. Without the flag JAX
# would give every SLURM task only GPU number SLURM_LOCALID, which is wrong for per_node.
# --kill-on-bad-exit: one failed process ends the step instead of leaving the others waiting in a collective.
# shellcheck disable=SC2016  # expanded by each task's shell, not here
srun --kill-on-bad-exit=1 --label bash -c '
  set -euo pipefail
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr "," "\n" | grep -c .)
  else
    visible=$(nvidia-smi -L | wc -l)
  fi
  if [ "$MODE" = per_node ]; then
    ids=$(seq -s, 0 $((visible - 1)))
  elif [ "$visible" = 1 ]; then
    ids=0
  else
    ids=$SLURM_LOCALID
  fi
  exec "$PYTHON" -m "ldm_jax.$ENTRY" --local_device_ids="$ids" "$@"
' ldm_jax_task "$@"
