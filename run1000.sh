#!/usr/bin/env bash
# The $1000 tier: 8xH100, depth 32 (smaller device batch, more accumulation).
# Downloads the pretraining corpus, trains the tokenizer, then base -> mid -> SFT with torchrun, evals, report.
#
#   bash run1000.sh            # NPROC=4 bash run1000.sh on fewer GPUs (gradient accumulation keeps the batch)
#
# Re-running resumes: finished stages are skipped and interrupted ones continue from their checkpoints.
# Settings in .mc_env (written by mc_setup) are sourced first.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
source ./recipes/common.sh

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done

NPROC=${NPROC:-8}
TAG=d32
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC")

recipe_setup --gpu
RUN="${WANDB_RUN:-dummy}"
stage_data_download 8 800
stage_tokenizer --vocab-size=65536
wait_for_data
stage_train base_train base "$TAG" "${TORCHRUN[@]}" -m scripts.base_train -- --run="$RUN" --depth=32 \
  --device-batch-size=8 --save-every=2000
stage_once base_loss "${TORCHRUN[@]}" -m scripts.base_loss
stage_once base_eval "${TORCHRUN[@]}" -m scripts.base_eval
stage_train mid_train mid "$TAG" "${TORCHRUN[@]}" -m scripts.mid_train -- --run="$RUN" --device-batch-size=8 \
  --save-every=500
stage_train chat_sft sft "$TAG" "${TORCHRUN[@]}" -m scripts.chat_sft -- --run="$RUN" --save-every=500
stage_once chat_eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft
python -m scripts.chat_cli -p "Why is the sky blue?"
stage_report
