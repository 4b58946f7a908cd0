#!/usr/bin/env bash
# The reference run: the whole pipeline on one 8xH100 node, from a bare machine to a chat model
# and its report card.
#
#   bash speedrun.sh                          # everything
#   PHASE=base bash speedrun.sh               # one phase: tok | base | mid | sft | rl | eval | all
#   NPROC=4 DEPTH=12 RUN=my-d12 bash speedrun.sh
#   SKIP_RL=1 bash speedrun.sh                # no RL phase
#   NAME_IDENTITY=Ada CREATOR=me bash speedrun.sh   # a model that knows its name and maker (docs/finetune.md)
#
# On a bare node, runs/setup.sh checks the prerequisites (python3 >= 3.10 with venv; Rust, which it
# installs with rustup when missing, unless NANOCHAT_WHEEL names a prebuilt wheel), then makes .venv;
# docs/cloud.md lists what the node must have. NANOCHAT_SETUP=0 uses the python on PATH as it is.
#
# Every stage is resumable: a stage that completed is skipped when the recipe is re-run (markers in
# $NANOCHAT_BASE_DIR/stages/), and base training resumes from its latest checkpoint. FORCE=1 redoes
# every stage. runs/runcpu.sh runs this same recipe at toy scale on a CPU by setting the variables below.
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun ranks: one thread each for the CPU-side work
NPROC=${NPROC:-8}              # processes (GPUs) per stage
DEPTH=${DEPTH:-20}             # the one dial: model size, horizon, batch, LRs (nanochat/scaling.py)
RUN=${RUN:-}                   # wandb run name (empty: no wandb, metrics.jsonl only)
PHASE=${PHASE:-all}
SKIP_RL=${SKIP_RL:-0}
NUM_SHARDS=${NUM_SHARDS:-240}  # FineWeb-Edu shards to download (~250M characters each)
TOK_SHARDS=${TOK_SHARDS:-8}    # shards downloaded before tokenizer training (2B characters)
GPU_HOUR_PRICE=${GPU_HOUR_PRICE:-3.0}  # USD per GPU-hour, for the report's cost estimate

# Per-stage arguments; runs/runcpu.sh overrides them for a toy run.
WANDB_ARGS=${RUN:+--run $RUN}
TOK_ARGS=${TOK_ARGS:-"--max-chars 2000000000 --vocab-size 65536"}
BASE_ARGS=${BASE_ARGS:-"--depth $DEPTH --device-batch-size auto $WANDB_ARGS"}
BASE_EVAL_ARGS=${BASE_EVAL_ARGS:-""}
MID_ARGS=${MID_ARGS:-"$WANDB_ARGS"}
SFT_ARGS=${SFT_ARGS:-"--device-batch-size 4 --total-batch-size 65536 $WANDB_ARGS"}  # 32 conversations of <= 2048 tokens per step
RL_ARGS=${RL_ARGS:-"$WANDB_ARGS"}
CHAT_EVAL_ARGS=${CHAT_EVAL_ARGS:-""}

case "$PHASE" in all | tok | base | mid | sft | rl | eval) ;; *)
    echo "error: PHASE=$PHASE; expected one of all, tok, base, mid, sft, rl, eval" >&2
    exit 2
    ;;
esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC=$NPROC; expected a positive integer" >&2; exit 2; }

source runs/setup.sh
source runs/stages.sh
if [ -z "$(ls -A "$NANOCHAT_BASE_DIR/stages" 2>/dev/null)" ]; then
    python -m nanochat.report reset  # a fresh run starts a fresh report card
fi

want() { [ "$PHASE" = all ] || [ "$PHASE" = "$1" ]; }

# Run a stage script on NPROC processes or one plain process. torchrun --standalone: a single-node
# rendezvous on a free local port; the ranks pick NCCL on GPUs and gloo on CPU (compute_init), so
# NPROC=2 on a laptop runs the same code path as NPROC=8 on the node (tests/test_speedrun.py).
launch() {
    if [ "$NPROC" -gt 1 ]; then
        echo "== torchrun --standalone --nproc_per_node=$NPROC -m $*"
        torchrun --standalone --nproc_per_node="$NPROC" -m "$@"
    else
        python -m "$@"
    fi
}

# Download shards unless a local data directory is given: the first few in the foreground (the
# tokenizer trains on them), the rest in the background while the tokenizer trains.
DOWNLOAD_PID=""
if [ -z "${NANOCHAT_DATA_DIR:-}" ] && { want tok || want base; }; then
    python -m nanochat.dataset -n "$TOK_SHARDS"
    python -m nanochat.dataset -n "$NUM_SHARDS" >"$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
fi

if want tok; then
    run_stage tok_train python -m scripts.tok_train $TOK_ARGS $([ "${FORCE:-0}" = 1 ] && echo --force)  # FORCE=1 retrains the tokenizer
    run_stage tok_eval python -m scripts.tok_eval
fi

if want base; then
    if [ -n "$DOWNLOAD_PID" ]; then
        echo "== waiting for the shard download (log: $NANOCHAT_BASE_DIR/download.log)"
        wait "$DOWNLOAD_PID"
    fi
    run_stage base_train launch scripts.base_train $BASE_ARGS --resume-if-exists
    run_stage base_eval launch scripts.base_eval $BASE_EVAL_ARGS
fi

# The identity set of NAME_IDENTITY, written to <base_dir>/identity/identity.jsonl: the Identity task of
# the mid and SFT recipes reads it from there. Regenerated every time (seconds, deterministic).
if [ -n "${NAME_IDENTITY:-}" ] && { want mid || want sft; }; then
    python -m scripts.identity --name "$NAME_IDENTITY" --creator "${CREATOR:-the nanochat project}"
fi

if want mid; then
    run_stage mid_train launch scripts.mid_train $MID_ARGS --resume-if-exists
    run_stage chat_eval_mid launch scripts.chat_eval --source mid $CHAT_EVAL_ARGS
fi

if want sft; then
    run_stage chat_sft launch scripts.chat_sft $SFT_ARGS --resume-if-exists
    run_stage chat_eval_sft launch scripts.chat_eval --source sft $CHAT_EVAL_ARGS
fi

if want rl && [ "$SKIP_RL" != 1 ]; then
    run_stage chat_rl launch scripts.chat_rl $RL_ARGS --resume-if-exists
    run_stage chat_eval_rl launch scripts.chat_eval --source rl $CHAT_EVAL_ARGS
fi

if want eval; then
    python -m nanochat.report generate --gpu-hour-price "$GPU_HOUR_PRICE"
    echo "== report: $NANOCHAT_BASE_DIR/report/report.md"
fi
