# Shared stage functions for run10.sh, speedrun.sh and run1000.sh (sourced, not run).
# Each stage is idempotent: it skips work whose result is already on disk, so re-running a recipe resumes.

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

# require_gpus N RECIPE: stop at once, before anything is installed, unless nvidia-smi lists at least N GPUs
# (a CUDA recipe would otherwise set up a multi-GB CUDA venv and fail much later).
require_gpus() {
  local want="$1" recipe="$2" have
  have="$({ nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)"
  [ "$have" -gt 0 ] || die "bash $recipe needs an NVIDIA GPU, and nvidia-smi finds none on this machine.
  Run the CPU profile instead:  bash run10.sh --gpu cpu"
  [ "$have" -ge "$want" ] || die "bash $recipe runs on $want GPUs and nvidia-smi lists $have: NPROC=$have bash $recipe"
}

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
  mc_stage_args
  local tag="d$depth$MC_SUFFIX" mc=("${MC_STAGE_ARGS[@]+"${MC_STAGE_ARGS[@]}"}")
  mc_chat_stage_args "$tag"
  local mc_chat=("${MC_CHAT_ARGS[@]+"${MC_CHAT_ARGS[@]}"}")
  local torchrun=(torchrun --standalone --nproc_per_node="${NPROC:-8}")
  require_gpus "${NPROC:-8}" "${0##*/}"
  recipe_setup --gpu
  local run="${WANDB_RUN:-dummy}"
  stage_data_download 8 "$shards"
  stage_tokenizer --vocab-size=65536
  wait_for_data
  stage_train "base_train$MC_SUFFIX" base "$tag" "${torchrun[@]}" -m scripts.base_train -- --run="$run" \
    --depth="$depth" --device-batch-size="$dbs" --save-every=2000 "${mc[@]+"${mc[@]}"}"
  stage_once base_loss "${torchrun[@]}" -m scripts.base_loss
  stage_once base_eval "${torchrun[@]}" -m scripts.base_eval
  stage_train "mid_train$MC_SUFFIX" mid "$tag" "${torchrun[@]}" -m scripts.mid_train -- --run="$run" \
    --device-batch-size="$dbs" --save-every=500 "${mc_chat[@]+"${mc_chat[@]}"}"
  stage_train "chat_sft$MC_SUFFIX" sft "$tag" "${torchrun[@]}" -m scripts.chat_sft -- --run="$run" --save-every=500 \
    "${mc_chat[@]+"${mc_chat[@]}"}"
  stage_once chat_eval "${torchrun[@]}" -m scripts.chat_eval -- -i sft --run="$run"
  python -m scripts.chat_cli -p "Why is the sky blue?" ${MC_SUFFIX:+--mc --model-tag="$tag"}
  if [ "${MC:-0}" = 1 ]; then stage_mc_eval "$tag"; fi
  stage_report
}

# ---------------------------------------------------------------------------------------------------------------
# MegaContext: `--mc` plus its knobs, passed through to every training stage. The names are the flags of
# megacontext/config.py's add_mc_args (tests/test_recipes_mc.py keeps the two lists equal).
MC_KNOBS=(block_size mc_max_lod mc_tree mc_tree_dir gistnet_type gistnet_layers gistnet_pooling gistnet_head
  lensnet_type lensnet_layers lensnet_head allocator_type allocator_soft_max_length allocator_recent_tokens
  allocator_scores allocator_expand_threshold allocator_collapse_threshold allocator_max_replacements allocator_iterations
  allocator_sample_top_k allocator_sample_temperature allocator_cooldown mc_wc_max mc_positional mc_refocus_interval
  mc_aux_dtype mc_num_random_variants mc_train_wc_length mc_wc_anneal_fraction mc_max_counterfactuals
  mc_lens_loss_weight mc_variant_loss_weight mc_gist_content_weight mc_gist_detach_input mc_variant_trains_base
  mc_lens_temperature mc_lens_adv_norm_beta mc_lens_kl_weight mc_lens_budget_smooth_weight mc_lens_budget_smooth_beta
  mc_lens_hard_negative_ratio mc_lr mc_telemetry_jsonl mc_auto_batch)
MC=0
MC_ARGS=()

# take_mc_option ARGS...: if $1 is --mc or an MC knob (`--knob V`, `--knob=V`, dash or underscore spelling),
# record it and set MC_TAKEN to the words used (1 or 2); otherwise MC_TAKEN=0.
take_mc_option() {
  MC_TAKEN=0
  local opt="$1" name known
  if [ "$opt" = --mc ]; then MC=1; MC_TAKEN=1; return; fi
  case "$opt" in --*) ;; *) return ;; esac
  name="${opt#--}"; name="${name%%=*}"; name="${name//-/_}"
  for known in "${MC_KNOBS[@]}"; do
    if [ "$name" = "$known" ]; then
      if [[ "$opt" == *=* ]]; then
        MC_ARGS+=("--$name=${opt#*=}"); MC_TAKEN=1
      else
        [ $# -ge 2 ] || die "$opt needs a value"
        MC_ARGS+=("--$name=$2"); MC_TAKEN=2
      fi
      return
    fi
  done
}

# unknown_option SCRIPT_USAGE OPT: the error for anything neither the recipe nor MegaContext knows.
unknown_option() {
  die "unknown option '$2' ($1; with --mc also --$(printf '%s|--' "${MC_KNOBS[@]}" | sed 's/|--$//'))"
}

# check_mc_options: knobs without --mc would silently do nothing; refuse them before any work.
check_mc_options() {
  if [ "$MC" = 0 ] && [ ${#MC_ARGS[@]} -gt 0 ]; then
    die "MegaContext knobs (${MC_ARGS[*]}) need --mc"
  fi
}

# parse_mc_only_args SCRIPT ARGS...: the command line of a recipe that takes nothing but --mc and its knobs
# (speedrun.sh, run1000.sh); -h prints the script's header comment.
parse_mc_only_args() {
  local script="$1"; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) sed -n '2,9p' "$script"; exit 0 ;;
      *)
        take_mc_option "$@"
        [ "$MC_TAKEN" -gt 0 ] || unknown_option "$(basename "$script") takes --mc" "$1"
        shift "$MC_TAKEN" ;;
    esac
  done
  check_mc_options
}

# mc_stage_args: the flags every training stage gets (none without --mc); MC_SUFFIX separates MC checkpoints and
# stage markers (d12 -> d12_mc) so an MC run never resumes or skips on a vanilla one.
mc_stage_args() {
  if [ "$MC" = 1 ]; then
    MC_STAGE_ARGS=(--mc "${MC_ARGS[@]+"${MC_ARGS[@]}"}")
    MC_SUFFIX=_mc
  else
    MC_STAGE_ARGS=()
    MC_SUFFIX=""
  fi
}

# mc_chat_stage_args TAG: MC_STAGE_ARGS plus, under --mc, the MC model tag mid / SFT start from and save under.
mc_chat_stage_args() {
  MC_CHAT_ARGS=("${MC_STAGE_ARGS[@]+"${MC_STAGE_ARGS[@]}"}")
  if [ "$MC" = 1 ]; then MC_CHAT_ARGS+=(--model-tag="$1"); fi
}
