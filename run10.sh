#!/usr/bin/env bash
# Single-machine recipe: setup -> data -> tokenizer -> base -> mid -> SFT -> evals -> chat sample -> report.
#
#   bash run10.sh --gpu cpu     # the embedded default on a CPU laptop (the README's main command; ~20 min)
#   bash run10.sh --gpu 5090    # depth 12 on a 32 GB consumer GPU
#   bash run10.sh --gpu h100    # depth 12 on one H100: twice the device batch, half the accumulation
#   bash run10.sh --gpu cpu --mc --block_size 8   # with MegaContext: --mc and its knobs reach every training stage
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
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *)
      take_mc_option "$@"
      [ "$MC_TAKEN" -gt 0 ] || unknown_option "run10.sh takes --gpu 5090|h100|cpu and --mc" "$1"
      shift "$MC_TAKEN" ;;
  esac
done
check_mc_options
mc_stage_args
case "$gpu" in
  cpu) setup_flag=--cpu ;;
  5090|h100) setup_flag=--gpu; require_gpus 1 "run10.sh --gpu $gpu" ;;
  "") die "say which hardware: --gpu cpu | --gpu 5090 | --gpu h100" ;;
  *) die "unknown --gpu '$gpu' (expected 5090, h100 or cpu)" ;;
esac

recipe_setup "$setup_flag"
RUN="${WANDB_RUN:-dummy}"

if [ "$gpu" = cpu ]; then
  # The CPU profile: a depth-4 model on Shakespeare + offline chat data, small enough for 2 cores.
  TAG=d4$MC_SUFFIX
  mc_chat_stage_args "$TAG"
  stage_data_embedded
  stage_tokenizer
  stage_train "base_train$MC_SUFFIX" base "$TAG" python -m scripts.base_train --run="$RUN" --depth=4 \
    --max-seq-len=256 --device-batch-size=8 --total-batch-size=2048 --num-iterations=400 --warmdown-ratio=0.5 \
    --eval-every=100 --eval-tokens=16384 --sample-every=400 --save-every=100 --core-metric-every=-1 \
    "${MC_STAGE_ARGS[@]+"${MC_STAGE_ARGS[@]}"}"
  stage_once base_eval python -m scripts.base_eval --eval=core,bpb,sample --core-source=offline --max-per-task=50
  stage_train "mid_train$MC_SUFFIX" mid "$TAG" python -m scripts.mid_train --run="$RUN" --data=offline --max-seq-len=256 \
    --device-batch-size=8 --total-batch-size=2048 --num-iterations=40 --eval-every=-1 --eval-tokens=8192 \
    --save-every=20 "${MC_CHAT_ARGS[@]+"${MC_CHAT_ARGS[@]}"}"
  stage_train "chat_sft$MC_SUFFIX" sft "$TAG" python -m scripts.chat_sft --run="$RUN" --data=offline --max-seq-len=256 \
    --device-batch-size=8 --target-examples-per-step=16 --num-iterations=30 --eval-every=-1 --eval-steps=4 \
    --save-every=15 "${MC_CHAT_ARGS[@]+"${MC_CHAT_ARGS[@]}"}"
  stage_once chat_eval python -m scripts.chat_eval -i sft --run="$RUN" --data=offline -x 50
else
  # One GPU, depth 12 (~3 B tokens at the default data:param ratio); the H100 fits twice the device batch.
  TAG=d12$MC_SUFFIX
  mc_chat_stage_args "$TAG"
  if [ "$gpu" = h100 ]; then DBS=32; else DBS=16; fi
  stage_data_download 8 240
  stage_tokenizer --vocab-size=65536
  wait_for_data
  stage_train "base_train$MC_SUFFIX" base "$TAG" python -m scripts.base_train --run="$RUN" --depth=12 \
    --device-batch-size="$DBS" --save-every=1000 "${MC_STAGE_ARGS[@]+"${MC_STAGE_ARGS[@]}"}"
  stage_once base_loss python -m scripts.base_loss
  stage_once base_eval python -m scripts.base_eval
  stage_train "mid_train$MC_SUFFIX" mid "$TAG" python -m scripts.mid_train --run="$RUN" --device-batch-size="$DBS" \
    --save-every=500 "${MC_CHAT_ARGS[@]+"${MC_CHAT_ARGS[@]}"}"
  stage_train "chat_sft$MC_SUFFIX" sft "$TAG" python -m scripts.chat_sft --run="$RUN" --save-every=500 \
    "${MC_CHAT_ARGS[@]+"${MC_CHAT_ARGS[@]}"}"
  stage_once chat_eval python -m scripts.chat_eval -i sft --run="$RUN"
fi

python -m scripts.chat_cli -p "Why is the sky blue?" ${MC_SUFFIX:+--mc --model-tag="$TAG"}
if [ "${MC:-0}" = 1 ]; then  # --mc: measure MegaContext against the simple alternatives at the same budget
  if [ "$gpu" = cpu ]; then
    # 96 entries hold a 16-window history at the CPU profile's block size 8 and two gist levels
    stage_mc_eval "$TAG" --history=1,4,16 --wc-budget=96 --max-docs=4 --recall-cases=4 --oracle-candidates=32
  else
    stage_mc_eval "$TAG"
  fi
fi
stage_report
