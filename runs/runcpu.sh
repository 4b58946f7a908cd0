#!/usr/bin/env bash
# The whole recipe of speedrun.sh at toy scale on a CPU (15-25 minutes on 2 cores), ending with a
# reply from the chat CLI. A demo of the machinery, not a useful model: it trains ~2M tokens where
# the speedrun trains ~10B.
#
#   NANOCHAT_DATA_ROOT=../shared/data bash runs/runcpu.sh     # local data (pretrain/, tasks/, chat/, ...)
#   bash runs/runcpu.sh                                       # downloads 4 FineWeb-Edu shards instead
#   bash runs/runcpu.sh --name Ada --creator me               # a model named Ada (speedrun.sh generates its identity set;
#                                                             # the same as NAME_IDENTITY=Ada CREATOR=me); it is then asked
#                                                             # its name 10 times and says in how many replies the name appears
#
# Configuration for a 2-core CPU; the measurements behind it are in docs/LOG.md:
# - vocab 8192: on a CPU the lm_head matmul dominates a small model (V x n_embd per token); 8K
#   tokens still compress prose to ~4 bytes/token, while 32K would double the step time at depth 4.
# - depth 4 (n_embd 256, 2 heads of 128): ~3.9K tokens/s in fp32 on 2 cores (base_train 7.5 min);
#   depth 6 runs at about half that.
# - seq_len 256: attention grows with it, and a 7M-parameter model gains little context past 256.
# - 200 steps of 8192 tokens (1.6M tokens, 0.3 per matmul parameter, far below Chinchilla's 20:
#   the time budget is the limit), warmdown over the last 40%.
# - every other stage gets a minute or two: mid 30 steps, SFT 150 steps of 16 conversations (fewer and
#   the model rarely learns to end its reply with <|assistant_end|>), RL 6
#   steps of 4 questions x 4 samples, evals on 10-20 items per task.
set -euo pipefail
cd "$(dirname "$0")/.."

while [ $# -gt 0 ]; do
    case "$1" in
        --name) [ $# -ge 2 ] || { echo "error: --name needs a value" >&2; exit 2; }; export NAME_IDENTITY=$2; shift 2 ;;
        --creator) [ $# -ge 2 ] || { echo "error: --creator needs a value" >&2; exit 2; }; export CREATOR=$2; shift 2 ;;
        *) echo "error: unknown argument $1 (runs/runcpu.sh takes --name NAME and --creator WHO)" >&2; exit 2 ;;
    esac
done

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat/runcpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export NPROC=1 DEPTH=4 NUM_SHARDS=4 TOK_SHARDS=2 SKIP_RL=${SKIP_RL:-0} GPU_HOUR_PRICE=0
export TOK_ARGS="--max-chars 50000000 --vocab-size 8192"
export BASE_ARGS="--depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 8192 --num-iterations 200 --eval-every 100 --eval-tokens 262144 --save-every 100"
export BASE_EVAL_ARGS="--max-per-task 20 --split-tokens 131072 --device-batch-size 16"
export MID_ARGS="--max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 --num-iterations 30 --val-conversations 64"
export SFT_ARGS="--max-seq-len 256 --device-batch-size 8 --total-batch-size 4096 --num-iterations 150 --val-conversations 64 --eval-every 50 --init-lr-frac 0.5"
# A named model trains SFT on tasks/recipes/sft_mix.yaml, whose identity category is "all": every one of
# the 2,000 generated identity conversations (9% of the mix) instead of sft.json's 300 (1.4%). At
# 2,400 conversations of SFT the model then gave its name in 10 of 10 replies, against 3 of 10 (docs/LOG.md).
if [ -n "${NAME_IDENTITY:-}" ]; then
    SFT_ARGS="$SFT_ARGS --recipe tasks/recipes/sft_mix.yaml"
fi
export RL_ARGS="--num-iterations 6 --questions-per-step 4 --num-samples 4 --max-new-tokens 64 --device-batch-size 16 --eval-every -1 --eval-problems 8 --eval-samples 2 --format-reward 0.1"
export CHAT_EVAL_ARGS="--max-problems 10 --max-new-tokens 48 --tasks ARC-Easy,MMLU,GSM8K,SpellingBee"

bash speedrun.sh
.venv/bin/python -m scripts.chat_cli -p "What is the capital of France?" --max-tokens 256
if [ -n "${NAME_IDENTITY:-}" ]; then
    # 10 sampled replies (temperature 0.6, top-k 50, seeds 1..10); the name counts as a whole word
    hits=0
    for seed in 1 2 3 4 5 6 7 8 9 10; do
        out=$(.venv/bin/python -m scripts.chat_cli -p "What is your name?" --max-tokens 64 --seed "$seed")
        echo "$out"
        if grep -v '^User: ' <<<"$out" | grep -qw -- "$NAME_IDENTITY"; then hits=$((hits + 1)); fi
    done
    echo "== the name $NAME_IDENTITY is in $hits of 10 replies to \"What is your name?\""
fi
echo "== stage times (s)"
cat "$NANOCHAT_BASE_DIR/stages/times.tsv"
