#!/usr/bin/env bash
# The $1000 tier: 8xH100, depth 32. Downloads the pretraining corpus, trains the tokenizer, then the model stages.
#
#   bash run1000.sh
#
# Re-running resumes: finished stages are skipped and interrupted ones continue from their checkpoints.
# Settings in .mc_env (written by mc_setup) are sourced first.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
source ./recipes/common.sh

DEPTH=32
NPROC=${NPROC:-8}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done

recipe_setup --gpu
stage_data_download 8 800
stage_tokenizer --vocab-size=65536
stage_report
