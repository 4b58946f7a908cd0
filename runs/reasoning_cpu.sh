#!/bin/bash
# Reasoning that learns on a CPU: base -> SFT -> RSFT -> GRPO on MultiHop (tasks/multihop.py), a
# verifiable multi-hop task over a generated knowledge graph, with accuracy and path coverage per
# difficulty bucket (easy 1-2 hops, medium 3, hard 4-5) after every stage. About 20 minutes on 2
# cores, set-up included (17.6 measured: docs/LOG.md).
#
#     NANOCHAT_DATA_ROOT=../shared/data bash runs/reasoning_cpu.sh      # local data (else 2 shards are downloaded)
#     FORCE=1 bash runs/reasoning_cpu.sh                                # re-run every stage
#
# The stages (each skipped when done, so a re-run resumes; runs/stages.sh):
# - tok_train: a 4,096-token BPE on 20M characters of the pretraining text.
# - base_train: depth 4 for $BASE_STEPS steps of 8K tokens: enough English for the format to stick.
# - chat_sft: MultiHop train conversations (tasks/recipes/multihop_sft.json) at the full base LRs
#   (at 0.3x of them the model stopped at 22% accuracy, docs/LOG.md): the TRACE + ANSWER format and
#   the lookup of each hop's fact in the prompt.
# - chat_rsft: rejection sampling on MultiHop train prompts of every bucket (matched to the
#   evaluation's mix: the distribution report says so), K samples each, fine-tuning on the correct ones.
# - chat_rl: GRPO from the RSFT model, reward = the verifier's answer check, on a fixed set of
#   $RL_PROMPTS train prompts revisited every 10 steps: its training reward rises on them. On fresh
#   prompts it stayed flat, as did the held-out pass@1 either way (docs/LOG.md).
# - chat_eval after each: MultiHop test, pass@1 at the rollouts' temperature (0.7) averaged over 4
#   samples per problem (DeepSeek-R1's pass@1: steadier than one greedy reply, and the expected
#   reward RSFT and GRPO optimise), per-bucket with its 95% interval and the coverage
#   (nanochat/chat_eval.py bucket_table); RSFT and GRPO also paired with the stages before them on
#   the same problems and seeds (--paired-with: the per-problem difference and its 95% interval, the
#   test of "beat it"); the report card ends with the stages compared. The base model, which never
#   answers (and so always writes all 96 tokens), gets one sample on 400 of the problems.
set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-reasoning}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
NAME=${NAME:-reasoning}              # run name in the registry (python -m scripts.lab list)
BASE_STEPS=${BASE_STEPS:-120}
SFT_STEPS=${SFT_STEPS:-300}
SFT_LR_FRAC=${SFT_LR_FRAC:-1.0}
RSFT_STEPS=${RSFT_STEPS:-60}
RSFT_LR_FRAC=${RSFT_LR_FRAC:-0.1}
RL_STEPS=${RL_STEPS:-30}
RL_PROMPTS=${RL_PROMPTS:-320}        # GRPO's prompts: 30 steps x 32 = 3 passes over them
EVAL_PROBLEMS=${EVAL_PROBLEMS:-1000}  # MultiHop test problems per evaluation (all of test: 400 easy, 198 medium, 402 hard)
EVAL_SAMPLES=${EVAL_SAMPLES:-4}    # samples per test problem at T 0.7 (pass@1 is their mean)

source runs/setup.sh
source runs/stages.sh
if [ -z "$(ls -A "$NANOCHAT_BASE_DIR/stages" 2>/dev/null)" ]; then
    python -m nanochat.report reset
fi
if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then
    python -m nanochat.dataset -n 2
fi

EVAL_ARGS="--tasks MultiHop --max-problems $EVAL_PROBLEMS --max-new-tokens 96 --temperature 0.7 --num-samples $EVAL_SAMPLES --batch-size 32"
# Sampling at T 0.7: more right answers with their whole trace than at T 1, the same answers' mix.
SAMPLE_ARGS="--task MultiHop --num-samples 8 --max-new-tokens 96 --temperature 0.7 --device-batch-size 32 --eval-every -1 --eval-problems 32 --eval-samples 1"

run_stage tok_train python -m scripts.tok_train --max-chars 20000000 --vocab-size 4096 $([ "${FORCE:-0}" = 1 ] && echo --force)
run_stage base_train python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 16 --total-batch-size 8192 \
    --num-iterations "$BASE_STEPS" --eval-every -1 --eval-tokens 131072 --num-prompts 0 --name "$NAME-base" --resume-if-exists
run_stage chat_eval_base python -m scripts.chat_eval --source base $EVAL_ARGS --num-samples 1 --max-problems $((EVAL_PROBLEMS < 400 ? EVAL_PROBLEMS : 400))
run_stage chat_sft python -m scripts.chat_sft --source base --recipe tasks/recipes/multihop_sft.json --max-seq-len 256 \
    --device-batch-size 16 --total-batch-size 4096 --num-iterations "$SFT_STEPS" --init-lr-frac "$SFT_LR_FRAC" --eval-every -1 --val-conversations 64 \
    --name "$NAME-sft" --resume-if-exists
run_stage chat_eval_sft python -m scripts.chat_eval --source sft $EVAL_ARGS
# RSFT keeps a right answer only with its whole reasoning path (--rsft-min-coverage 1): right answers
# without the trace, trained on, taught the model to drop it (coverage fell to 0.02, docs/LOG.md).
# It skips the prompts solved 8 times out of 8 (--rsft-max-pass-rate 0.99): they were two thirds of
# the winners and taught nothing new.
run_stage chat_rsft python -m scripts.chat_rsft $SAMPLE_ARGS --questions-per-step 32 --num-iterations "$RSFT_STEPS" --init-lr-frac "$RSFT_LR_FRAC" \
    --rsft-min-coverage 1 --rsft-max-pass-rate 0.99 --name "$NAME-rsft" --resume-if-exists
run_stage chat_eval_rsft python -m scripts.chat_eval --source rsft $EVAL_ARGS --paired-with sft
# GRPO: 32 prompts x 4 samples a step (the step's reward moves less with its prompt mix than at 16 x 8),
# on $RL_PROMPTS prompts, each visited 3 times: their reward rises from the first visit to the last
# (chat_rl prints it, paired per prompt). After RSFT it moved the held-out pass@1 by less than its
# interval at every LR, length and prompt mix tried, revisited or fresh (docs/LOG.md): at this size
# GRPO learns its prompts, not more of the skill. (160 prompts, 6 visits each: a larger rise, and
# 3 points lost on held-out easy problems.)
run_stage chat_rl python -m scripts.chat_rl $SAMPLE_ARGS --num-samples 4 --source rsft --questions-per-step 32 --max-prompts "$RL_PROMPTS" \
    --num-iterations "$RL_STEPS" --name "$NAME-grpo" --resume-if-exists
run_stage chat_eval_rl python -m scripts.chat_eval --source rl $EVAL_ARGS --paired-with sft,rsft

python -m nanochat.report generate --gpu-hour-price 0
echo "== report: $NANOCHAT_BASE_DIR/report/report.md"
echo "== stage times (s)"
cat "$NANOCHAT_BASE_DIR/stages/times.tsv"
