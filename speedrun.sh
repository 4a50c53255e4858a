#!/usr/bin/env bash
# The $100 tier: 8xH100, depth 20.
# Downloads the pretraining corpus, trains the tokenizer, then base -> mid -> SFT with torchrun, evals, report.
#
#   bash speedrun.sh            # NPROC=4 bash speedrun.sh on fewer GPUs (gradient accumulation keeps the batch)
#   bash speedrun.sh --mc --block_size 32   # with MegaContext: --mc and its knobs reach every training stage
#
# Re-running resumes: finished stages are skipped and interrupted ones continue from their checkpoints.
# Settings in .mc_env (written by mc_setup) are sourced first.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
source ./recipes/common.sh

parse_mc_only_args "$0" "$@"

run_multi_gpu_recipe 20 240 32
