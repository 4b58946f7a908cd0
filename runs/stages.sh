# Stage runner shared by speedrun.sh and runs/*.sh (sourced, not run).
#
#   run_stage NAME command args...
#
# runs the command once: on success it writes $NANOCHAT_BASE_DIR/stages/NAME.done, and a later
# invocation of the recipe skips the stage, so re-running a recipe after a failure resumes at the
# stage that failed. Each stage's wall time is printed and appended to stages/times.tsv.
# FORCE=1 re-runs every stage.

: "${NANOCHAT_BASE_DIR:?NANOCHAT_BASE_DIR must be set before sourcing runs/stages.sh}"
mkdir -p "$NANOCHAT_BASE_DIR/stages"

run_stage() {
    local name=$1
    shift
    local marker="$NANOCHAT_BASE_DIR/stages/$name.done"
    if [ -f "$marker" ] && [ "${FORCE:-0}" != 1 ]; then
        echo "== [$name] already done ($marker), skipping"
        return 0
    fi
    echo "== [$name] $*"
    local t0=$SECONDS
    "$@"
    local dt=$((SECONDS - t0))
    echo "== [$name] done in ${dt}s"
    printf '%s\t%s\n' "$name" "$dt" >>"$NANOCHAT_BASE_DIR/stages/times.tsv"
    touch "$marker"
}

# Point every data path at one local data root laid out like shared/data (pretrain/, tasks/,
# chat/, eval/core/, words/) when NANOCHAT_DATA_ROOT is given; explicit variables win.
if [ -n "${NANOCHAT_DATA_ROOT:-}" ]; then
    NANOCHAT_DATA_ROOT=$(cd "$NANOCHAT_DATA_ROOT" && pwd)
    export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$NANOCHAT_DATA_ROOT/pretrain}
    export NANOCHAT_TASKS_DIR=${NANOCHAT_TASKS_DIR:-$NANOCHAT_DATA_ROOT/tasks}
    export NANOCHAT_CHAT_DIR=${NANOCHAT_CHAT_DIR:-$NANOCHAT_DATA_ROOT/chat}
    export NANOCHAT_EVAL_DIR=${NANOCHAT_EVAL_DIR:-$NANOCHAT_DATA_ROOT/eval/core}
    export NANOCHAT_WORDS_FILE=${NANOCHAT_WORDS_FILE:-$NANOCHAT_DATA_ROOT/words/words_alpha.txt}
fi
