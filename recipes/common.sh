# Shared stage functions for run10.sh, speedrun.sh and run1000.sh (sourced, not run).
# Each stage is idempotent: it skips work whose result is already on disk, so re-running a recipe resumes.

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

# Install / refresh the environment, then load .mc_env and the venv into this shell.
recipe_setup() {
  log "setup ($*)"
  bash ./mc_setup "$@" --no-data
  # shellcheck disable=SC1091
  source ./.mc_env
  # shellcheck disable=SC1091
  source ./.venv/bin/activate
  export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
  mkdir -p "$NANOCHAT_BASE_DIR"
  if [ ! -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then
    python -m nanochat.report reset
  fi
}

stage_data_embedded() {
  log "data: embedded default corpus"
  python -m nanochat.dataset --source embedded
}

# stage_data_download FIRST TOTAL: fetch FIRST shards now (enough for the tokenizer), the rest in the background.
stage_data_download() {
  log "data: downloading $1 shards now, $2 in the background"
  python -m nanochat.dataset -n "$1"
  python -m nanochat.dataset -n "$2" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
  DATA_DOWNLOAD_PID=$!
}

stage_tokenizer() {
  if [ -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
    log "tokenizer: already trained, skipping"
    return
  fi
  log "tokenizer: training"
  python -m scripts.tok_train "$@"
  python -m scripts.tok_eval
}

# Training needs every shard: block until the background download is done, and fail loudly if it failed.
wait_for_data() {
  if [ -n "${DATA_DOWNLOAD_PID:-}" ]; then
    wait "$DATA_DOWNLOAD_PID" || die "background shard download failed; see $NANOCHAT_BASE_DIR/download.log"
    DATA_DOWNLOAD_PID=""
  fi
}

stage_report() {
  wait_for_data
  python -m nanochat.report generate
  log "report: report/report.md"
}

# last_step SOURCE TAG: the last completely saved step of base|mid|sft checkpoints/<TAG>, or -1.
last_step() {
  python - "$1" "$2" <<'PY'
import os, sys
from nanochat.checkpoint_manager import checkpoints_dir, list_steps
steps = list_steps(os.path.join(checkpoints_dir(sys.argv[1]), sys.argv[2]))
print(steps[-1] if steps else -1)
PY
}

# A finished stage leaves a marker so a re-run skips it; markers live beside the checkpoints they describe.
stage_marker() { echo "$NANOCHAT_BASE_DIR/recipe_stages/$1.done"; }

# stage_once NAME CMD...: run CMD unless stage NAME already finished.
stage_once() {
  local name="$1"; shift
  if [ -f "$(stage_marker "$name")" ]; then
    log "$name: done before, skipping"
    return
  fi
  log "$name"
  "$@"
  mkdir -p "$NANOCHAT_BASE_DIR/recipe_stages" && touch "$(stage_marker "$name")"
}

# stage_train NAME SOURCE TAG CMD...: a training stage. Finished -> skipped; interrupted -> CMD continues from
# the last complete checkpoint of SOURCE (base|mid|sft) / TAG. CMD is e.g. `python -m scripts.base_train ...`
# or `torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- ...`.
stage_train() {
  local name="$1" source="$2" tag="$3"; shift 3
  if [ -f "$(stage_marker "$name")" ]; then
    log "$name: done before, skipping"
    return
  fi
  local last resume=()
  last=$(last_step "$source" "$tag")
  if [ "$last" -ge 0 ]; then
    log "$name: resuming $source/$tag from step $last"
    resume=(--resume-from-step="$last")
  else
    log "$name: training $source/$tag"
  fi
  "$@" "${resume[@]+"${resume[@]}"}"
  mkdir -p "$NANOCHAT_BASE_DIR/recipe_stages" && touch "$(stage_marker "$name")"
}

# stage_mc_eval TAG [FLAGS...]: MegaContext against truncation, sink + window and full attention on the MC base
# checkpoint TAG (d<depth>_mc), into the report's "MegaContext evaluation" section. Recipes call it when --mc is on.
stage_mc_eval() {
  local tag="$1"; shift
  stage_once mc_eval python -m scripts.mc_eval -i base --model-tag="$tag" "$@"
}

# run_multi_gpu_recipe DEPTH SHARDS DEVICE_BATCH: the 8xH100 recipes (speedrun.sh, run1000.sh) differ only in these.
run_multi_gpu_recipe() {
  local depth="$1" shards="$2" dbs="$3"
  local tag="d$depth"
  local torchrun=(torchrun --standalone --nproc_per_node="${NPROC:-8}")
  recipe_setup --gpu
  local run="${WANDB_RUN:-dummy}"
  stage_data_download 8 "$shards"
  stage_tokenizer --vocab-size=65536
  wait_for_data
  stage_train base_train base "$tag" "${torchrun[@]}" -m scripts.base_train -- --run="$run" --depth="$depth" \
    --device-batch-size="$dbs" --save-every=2000
  stage_once base_loss "${torchrun[@]}" -m scripts.base_loss
  stage_once base_eval "${torchrun[@]}" -m scripts.base_eval
  stage_train mid_train mid "$tag" "${torchrun[@]}" -m scripts.mid_train -- --run="$run" --device-batch-size="$dbs" \
    --save-every=500
  stage_train chat_sft sft "$tag" "${torchrun[@]}" -m scripts.chat_sft -- --run="$run" --save-every=500
  stage_once chat_eval "${torchrun[@]}" -m scripts.chat_eval -- -i sft
  python -m scripts.chat_cli -p "Why is the sky blue?"
  if [ "${MC:-0}" = 1 ]; then stage_mc_eval "${tag}_mc"; fi
  stage_report
}
