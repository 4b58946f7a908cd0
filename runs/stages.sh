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

# One local data root laid out like shared/data (pretrain/, tasks/, chat/, eval/core/, words/):
# the library resolves every data path under NANOCHAT_DATA_ROOT itself (explicit flags and
# variables win, nanochat.common.resolve_data_path); here it is made absolute, so that a relative
# root means the same in every stage. NANOCHAT_DATA_DIR is still set because the recipes test it
# to decide whether to download shards.
if [ -n "${NANOCHAT_DATA_ROOT:-}" ]; then
    NANOCHAT_DATA_ROOT=$(cd "$NANOCHAT_DATA_ROOT" && pwd)  # apart from export: a missing root fails under set -e
    export NANOCHAT_DATA_ROOT
    export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$NANOCHAT_DATA_ROOT/pretrain}
fi
