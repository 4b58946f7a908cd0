#!/usr/bin/env bash
# The whole pipeline at toy scale on a CPU (about 25 minutes on 2 cores): tokenizer -> base
# pretraining -> chat SFT -> a reply from the chat CLI. It is a demo of the machinery, not a
# useful model: it trains ~2M tokens where the speedrun trains ~10B.
#
#   NANOCHAT_DATA_ROOT=../shared/data bash runs/runcpu.sh     # local data (pretrain/, tasks/, chat/, ...)
#   bash runs/runcpu.sh                                       # downloads 4 FineWeb-Edu shards instead
#
# Configuration chosen for a 2-core CPU (measured: docs/LOG.md), each knob the largest that keeps
# the run inside its budget:
# - vocab 8192: on CPU the lm_head matmul dominates a small model; 8K tokens still compress
#   English prose ~4 bytes/token, while 32K-65K would double the step time at depth 4.
# - depth 4 (n_embd 256, 2 heads of 128): ~3K tokens/s fp32 on 2 cores; depth 6 runs at half that.
# - seq_len 256: attention cost grows with it and a 7M-parameter model gains little past 256.
# - 250 steps x 8192 tokens (2M tokens, ~0.3 tokens per parameter... far from Chinchilla's 20, the
#   budget is the limit), LR schedule warmdown over the last 40%.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat/runcpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
source runs/setup.sh
source runs/stages.sh

if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then
    run_stage download python -m nanochat.dataset -n 4
fi
run_stage tok_train python -m scripts.tok_train --max-chars 50000000 --vocab-size 8192
run_stage base_train python -m scripts.base_train \
    --depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 8192 \
    --num-iterations 250 --eval-every 125 --eval-tokens 262144 --save-every 125 --resume-if-exists
run_stage chat_sft python -m scripts.chat_sft \
    --max-seq-len 256 --device-batch-size 8 --batch-size 16 --num-iterations 100 \
    --val-conversations 128 --eval-every 50 --init-lr-frac 0.5
python -m scripts.chat_cli -p "What is the capital of France?" --temperature 0 --max-tokens 64
echo "== stage times (s)"
cat "$NANOCHAT_BASE_DIR/stages/times.tsv"
