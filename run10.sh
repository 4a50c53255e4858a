#!/usr/bin/env bash
# Single-machine recipe: setup -> data -> tokenizer -> base pretraining -> ... -> report.
#
#   bash run10.sh --gpu cpu     # the embedded default on a CPU laptop (the README's main command)
#   bash run10.sh --gpu 5090    # depth 12 on a 32 GB consumer GPU
#   bash run10.sh --gpu h100    # depth 12 on one H100: twice the device batch, same token budget
#
# Re-running resumes: finished stages are skipped and interrupted ones continue from their checkpoints.
# Settings in .mc_env (written by mc_setup) are sourced first, so WANDB_RUN / NANOCHAT_BASE_DIR carry over.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
source ./recipes/common.sh

gpu=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) gpu="${2:-}"; shift 2 ;;
    --gpu=*) gpu="${1#*=}"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (run10.sh takes --gpu 5090|h100|cpu)" ;;
  esac
done
case "$gpu" in
  cpu) setup_flag=--cpu ;;
  5090|h100) setup_flag=--gpu ;;
  "") die "say which hardware: --gpu cpu | --gpu 5090 | --gpu h100" ;;
  *) die "unknown --gpu '$gpu' (expected 5090, h100 or cpu)" ;;
esac

recipe_setup "$setup_flag"

if [ "$gpu" = cpu ]; then
  stage_data_embedded
  stage_tokenizer
else
  stage_data_download 8 240
  stage_tokenizer --vocab-size=65536
fi

stage_report
