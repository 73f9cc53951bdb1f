#!/bin/bash
# Run on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...): each worker runs the
# same command; jax.distributed reads the slice layout from the TPU metadata.
#
#   launch/tpu_pod.sh setup  TPU_NAME ZONE                # copy this checkout, pip install
#   launch/tpu_pod.sh run    TPU_NAME ZONE CONFIG [--config.field=value ...]
#   launch/tpu_pod.sh stop   TPU_NAME ZONE                # kill the run on all workers
#
# Environment: PROJECT (gcloud project; default: gcloud's), REMOTE_DIR (default ~/oisd_jax),
# WORKDIR (checkpoints + metrics; use a gs:// bucket so every worker writes its shards),
# ENTRY (default oisd_jax.train; oisd_jax.evaluate evaluates WORKDIR's checkpoint),
# JAX_COMPILATION_CACHE_DIR (default WORKDIR/xla_cache, shared by every worker -- jax's
# persistent cache reads and writes gs:// paths through etils.epath, with gcsfs, which
# `setup` installs -- so a rerun, on this slice or another
# of the same shape, loads its compiled programs instead of recompiling them),
# DRY_RUN=1 (print the gcloud commands and what each worker runs; run nothing).
# On TPU the attention is model.attn_impl=splash (the Pallas TPU kernel; cuDNN is GPU-only,
# xla's T x T scores do not fit 8k); plan first: python -m oisd_jax.plan --target=v5p --devices=N.
set -euo pipefail

CMD=${1:?usage: tpu_pod.sh setup|run|stop TPU_NAME ZONE [CONFIG overrides...]}
TPU_NAME=${2:?TPU name}
ZONE=${3:?zone}
shift 3
REMOTE_DIR=${REMOTE_DIR:-oisd_jax}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
HERE=$(cd "$(dirname "$0")/.." && pwd)

GCLOUD=gcloud
if [ "${DRY_RUN:-0}" = 1 ]; then
  GCLOUD="echo [dry-run] gcloud"
fi

ssh_all() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "[dry-run] every worker of $TPU_NAME (--worker=all) runs:"
    echo "  $1"
  fi
  $GCLOUD compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "$CMD" in
  setup)
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "[dry-run] tar -C $HERE -czf /tmp/oisd_jax_src.tgz ."
    else
      tar -C "$HERE" --exclude=.git --exclude=runs --exclude='__pycache__' -czf /tmp/oisd_jax_src.tgz .
    fi
    $GCLOUD compute tpus tpu-vm scp /tmp/oisd_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/oisd_jax_src.tgz && cd $REMOTE_DIR && \
      pip install -q -r requirements.txt 'jax[tpu]==0.10.2' gcsfs"
    ;;
  run)
    CONFIG=${1:?config file}
    shift
    WORKDIR=${WORKDIR:?set WORKDIR (a gs:// path all workers can write)}
    # Quote the overrides for the remote shell.
    ARGS=$(printf ' %q' "$@")
    # OISD_TPU_POD=1 makes oisd_jax.distributed.initialize() start jax.distributed even
    # where the TPU environment variables are not set (GCE TPU VMs use metadata instead).
    CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/xla_cache}
    ssh_all "cd $REMOTE_DIR && OISD_TPU_POD=1 TOKENIZERS_PARALLELISM=false JAX_COMPILATION_CACHE_DIR=$CACHE_DIR nohup \
      python -m ${ENTRY:-oisd_jax.train} --config=$CONFIG --workdir=$WORKDIR --config.model.attn_impl=splash $ARGS \
      > run.log 2>&1 & echo \$! > train.pid; echo started on \$(hostname)"
    echo "logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f $REMOTE_DIR/run.log'"
    ;;
  stop)
    # Only the trainer this script started (its pid was saved by `run`).
    ssh_all "cd $REMOTE_DIR && [ -f train.pid ] && kill \$(cat train.pid) && rm train.pid || true"
    ;;
  *)
    echo "unknown command $CMD (setup|run|stop)" >&2
    exit 2
    ;;
esac
