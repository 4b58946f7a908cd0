#!/usr/bin/env bash
# Run a phase of speedrun.sh (or all of it) on a Shadeform GPU instance, then delete the instance.
#
#   export SHADEFORM_API_KEY=...                         # https://platform.shadeform.ai -> API keys
#   bash scripts/launch_shadeform.sh --phase all         # cheapest available 8xH100, whole speedrun
#   bash scripts/launch_shadeform.sh --phase base --upload runs/my-d20 --out runs/my-d20 --env DEPTH=20
#   bash scripts/launch_shadeform.sh --phase all --dry-run   # print every request and command, run none
#   bash scripts/launch_shadeform.sh --phase all --wheel nanochat-0.1.0-cp312-cp312-manylinux_2_34_x86_64.whl
#
# Steps: pick the instance type (--gpu, --num-gpus; the cheapest available unless --cloud/--region
# pin it), register the local SSH key if Shadeform does not know it, create the instance, poll
# until it is active and answers SSH, rsync the repo (and --upload, the artefacts of earlier
# phases), start `PHASE=<phase> bash speedrun.sh` detached on the instance (setsid + nohup: it
# survives a dropped connection), stream its log, copy checkpoints, tokenizer and report back to
# --out, delete the instance.
#
# Preflight, before anything is rented: a phase after tok starts from the earlier phases' files,
# which only --upload brings (base: the tokenizer; mid: + the base checkpoint; sft: + mid; rl: + sft;
# eval: the report records); without them the launch stops with a one-line reason and no API call.
# On the instance, speedrun.sh sets up the bare node itself (runs/setup.sh: python3 venv, Rust via
# rustup unless --wheel brings a prebuilt wheel of the project; docs/cloud.md, "A bare node").
#
# The instance is deleted on every exit path: success, failure, Ctrl-C (INT), TERM, and the
# --max-hours guard (a watchdog that stops everything when the time is up). As a backstop the
# create request also sets Shadeform's auto_delete date to the deadline plus a margin, so a
# laptop that dies mid-run still does not leave a node billing.
#
# Environment: SHADEFORM_API_KEY (required unless --dry-run); SHADEFORM_API_URL (default
# https://api.shadeform.ai/v1, for tests). Needs bash, curl, python3 (JSON), ssh and rsync.
# Exit status: the phase's own status when it ran; 1 for an error here; 124 when --max-hours hit;
# 130 on Ctrl-C. Details: docs/cloud.md.
set -euo pipefail
# Messages go to fd 3, a copy of stderr: a trap that fires while a command runs with 2>/dev/null
# must still be heard.
exec 3>&2

API_URL=${SHADEFORM_API_URL:-https://api.shadeform.ai/v1}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PHASES="all tok base mid sft rl eval"

PHASE=all
GPU=H100
NUM_GPUS=8
CLOUD=""
REGION=""
INSTANCE_TYPE=""
OS_IMAGE=""
MAX_HOURS=8
BOOT_TIMEOUT_MIN=30
POLL_SECONDS=${SHADEFORM_POLL_SECONDS:-15}
SSH_KEY=""
NAME=""
OUT=""
UPLOAD=""
DOWNLOAD=all
WHEEL=""
DRY_RUN=0
EXTRA_ENV=()

usage() {
    cat <<EOF
usage: $0 --phase {all,tok,base,mid,sft,rl,eval} [options]
  --phase P            speedrun.sh phase to run (default: all)
  --gpu TYPE           GPU type as Shadeform names it: H100, H200, A100_80G, B200, ... (default: H100)
  --num-gpus N         GPUs on the instance; speedrun.sh gets NPROC=N (default: 8)
  --cloud NAME         only this underlying cloud (default: the cheapest available of any)
  --region NAME        only this region
  --instance-type T    this shade_instance_type (default: the cheapest matching --gpu/--num-gpus)
  --os IMAGE           OS image of the instance (default: the cloud's default)
  --max-hours H        stop and delete the instance after H hours, whatever happens (default: $MAX_HOURS)
  --boot-timeout-min M give up when the instance is not active and reachable after M minutes (default: $BOOT_TIMEOUT_MIN)
  --poll-seconds S     seconds between status and log polls (default: $POLL_SECONDS)
  --ssh-key PATH       private key for the instance; PATH.pub is registered with Shadeform if missing
                       (default: ~/.ssh/id_ed25519, else ~/.ssh/id_rsa)
  --name NAME          instance name (default: nanochat-<phase>-<date>)
  --out DIR            local directory that receives the results (default: shadeform-runs/<name>)
  --upload DIR         a local base dir (the --out of an earlier phase) copied to the instance first
  --download WHAT      all (checkpoints, tokenizer, report, logs) | report (report and logs) | none (default: all)
  --env K=V            extra environment for speedrun.sh, e.g. --env DEPTH=26 (repeatable)
  --wheel PATH         a prebuilt nanochat wheel (maturin build --release, for the instance's Python
                       and platform) installed there instead of building the Rust crate: no Rust needed
  --dry-run            print every API request and command without running any
EOF
}

die() {
    echo "error: $*" >&3
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --phase) PHASE=${2:?--phase needs a value}; shift 2 ;;
        --gpu) GPU=${2:?--gpu needs a value}; shift 2 ;;
        --num-gpus) NUM_GPUS=${2:?--num-gpus needs a value}; shift 2 ;;
        --cloud) CLOUD=${2:?--cloud needs a value}; shift 2 ;;
        --region) REGION=${2:?--region needs a value}; shift 2 ;;
        --instance-type) INSTANCE_TYPE=${2:?--instance-type needs a value}; shift 2 ;;
        --os) OS_IMAGE=${2:?--os needs a value}; shift 2 ;;
        --max-hours) MAX_HOURS=${2:?--max-hours needs a value}; shift 2 ;;
        --boot-timeout-min) BOOT_TIMEOUT_MIN=${2:?--boot-timeout-min needs a value}; shift 2 ;;
        --poll-seconds) POLL_SECONDS=${2:?--poll-seconds needs a value}; shift 2 ;;
        --ssh-key) SSH_KEY=${2:?--ssh-key needs a value}; shift 2 ;;
        --name) NAME=${2:?--name needs a value}; shift 2 ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --upload) UPLOAD=${2:?--upload needs a value}; shift 2 ;;
        --download) DOWNLOAD=${2:?--download needs a value}; shift 2 ;;
        --env) EXTRA_ENV+=("${2:?--env needs K=V}"); shift 2 ;;
        --wheel) WHEEL=${2:?--wheel needs a value}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done

# ------------------------------------------------------------------------------------------ checks
case " $PHASES " in *" $PHASE "*) ;; *) die "--phase $PHASE: expected one of ${PHASES// /, }" ;; esac
case "$DOWNLOAD" in all | report | none) ;; *) die "--download $DOWNLOAD: expected all, report or none" ;; esac
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "--num-gpus $NUM_GPUS: expected a positive integer"
# the numbers, checked, in seconds; and the auto_delete date: our deadline plus 30 minutes (a
# backstop on Shadeform's side should this script die without deleting the instance)
read -r MAX_SECONDS BOOT_SECONDS AUTO_DELETE <<<"$(python3 -c '
import datetime, sys
out = []
for flag, value, unit in zip(("--max-hours", "--boot-timeout-min", "--poll-seconds"), sys.argv[1:4], (3600, 60, 1)):
    try:
        v = float(value)
    except ValueError:
        v = -1
    if not v > 0:
        sys.exit(f"error: {flag} {value}: expected a positive number")
    out.append(max(1, int(v * unit)))
deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=out[0] + 1800)
print(out[0], out[1], deadline.isoformat(timespec="seconds"))
' "$MAX_HOURS" "$BOOT_TIMEOUT_MIN" "$POLL_SECONDS" 2>&3)" || exit 1
[ -n "${AUTO_DELETE:-}" ] || exit 1
for kv in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $kv: expected NAME=value"
done
[ -z "$UPLOAD" ] || [ -d "$UPLOAD" ] || die "--upload $UPLOAD: no such directory"
if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
    [[ "$(basename "$WHEEL")" =~ ^nanochat-[^-]+-cp[0-9]+-.*\.whl$ ]] || die "--wheel $WHEEL: not a nanochat wheel (nanochat-VERSION-cpXY-ABI-PLATFORM.whl, from maturin build --release)"
fi
# Preflight: a fresh instance has nothing but the repository, so a phase after tok needs the earlier
# phases' files in --upload; without them speedrun.sh would fail on the instance after the boot
# and the upload were paid for. Every missing input is named in one line, before any API call.
MISSING=()  # "what|where": what the phase needs, and the path under --upload that holds it
has() { [ -n "$UPLOAD" ] && compgen -G "$UPLOAD/$1" >/dev/null; }
need_tokenizer() { has tokenizer/tokenizer.tiktoken && has tokenizer/tokenizer.json || MISSING+=("the tokenizer|tokenizer/"); }
need_checkpoint() { has "checkpoints/$1/*/step_*[0-9]/model.pt" || MISSING+=("the $1 checkpoint|checkpoints/$1/"); }
case "$PHASE" in
    base) need_tokenizer ;;
    mid) need_tokenizer; need_checkpoint base ;;
    sft) need_tokenizer; need_checkpoint mid ;;
    rl) need_tokenizer; need_checkpoint sft ;;
    eval) has "report/*.json" || MISSING+=("the earlier phases' report records|report/") ;;
esac
if [ ${#MISSING[@]} -gt 0 ]; then
    what=${MISSING[0]%%|*} where=${MISSING[0]#*|}
    for m in "${MISSING[@]:1}"; do what+=" and ${m%%|*}"; where+=" and ${m#*|}"; done
    if [ -z "$UPLOAD" ]; then
        die "--phase $PHASE needs $what: pass --upload <base dir with $where> (the --out of the earlier phases' launch)"
    fi
    die "--phase $PHASE needs $what: --upload $UPLOAD has no $where (the --out of the earlier phases' launch, with --download all)"
fi
if [ -z "$SSH_KEY" ]; then
    for k in "$HOME/.ssh/id_ed25519" "$HOME/.ssh/id_rsa"; do
        if [ -f "$k" ]; then SSH_KEY=$k; break; fi
    done
fi
if [ "$DRY_RUN" = 0 ]; then
    for tool in curl python3 ssh rsync; do
        command -v "$tool" >/dev/null || die "$tool is not installed (needed to talk to the instance)"
    done
    [ -n "${SHADEFORM_API_KEY:-}" ] || die "SHADEFORM_API_KEY is not set (create a key at https://platform.shadeform.ai)"
    [ -n "$SSH_KEY" ] && [ -f "$SSH_KEY" ] || die "no SSH key: pass --ssh-key or create ~/.ssh/id_ed25519 (ssh-keygen -t ed25519)"
    [ -f "$SSH_KEY.pub" ] || die "--ssh-key $SSH_KEY: the public key $SSH_KEY.pub is missing"
fi
SSH_KEY=${SSH_KEY:-$HOME/.ssh/id_ed25519}
STAMP=$(date -u +%Y%m%d-%H%M%S)
NAME=${NAME:-nanochat-$PHASE-$STAMP}
OUT=${OUT:-shadeform-runs/$NAME}
START=$SECONDS
REMOTE_REPO=nanochat              # relative to the remote home directory
REMOTE_BASE=.cache/nanochat       # NANOCHAT_BASE_DIR on the instance (the library's default)
REMOTE_WHEELS=nanochat-wheels     # --wheel goes here, beside the repository (whose rsync deletes strays)
LOG=$REMOTE_BASE/launch-$PHASE.log
EXIT_FILE=$REMOTE_BASE/launch-$PHASE.exit

log() { echo "== $*" >&3; }

# ------------------------------------------------------------------------------------------ clean-up
INSTANCE_ID=""
CHILD=""
WATCHDOG_PID=""

delete_instance() {
    local id=$1 try
    for try in 1 2 3 4 5; do
        if api POST "/instances/$id/delete" >/dev/null; then
            log "instance $id deleted"
            return 0
        fi
        sleep "$((try * 2))"
    done
    echo "WARNING: could not delete instance $id: it may still be running and billing." >&3
    echo "WARNING: delete it at https://platform.shadeform.ai/instances or: curl -X POST $API_URL/instances/$id/delete -H 'X-API-KEY: ...'" >&3
    return 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM USR1
    [ -z "$CHILD" ] || kill "$CHILD" 2>/dev/null || true
    [ -z "$WATCHDOG_PID" ] || kill "$WATCHDOG_PID" 2>/dev/null || true
    if [ -n "$INSTANCE_ID" ]; then
        log "deleting instance $INSTANCE_ID"
        delete_instance "$INSTANCE_ID" || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted: stopping" >&3; exit 130' INT
trap 'echo "terminated: stopping" >&3; exit 143' TERM
trap 'echo "error: --max-hours $MAX_HOURS reached: stopping" >&3; exit 124' USR1

# Long commands run in the background and are waited for: bash runs a trap only between
# commands, but `wait` returns at once when a signal arrives, so Ctrl-C and the watchdog act
# immediately even during a stuck rsync or ssh (the trap then kills the child).
run() {
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

pause() { run sleep "$1"; }

start_watchdog() {
    local parent=$$
    (
        sleep "$MAX_SECONDS" </dev/null >/dev/null 2>&1 &
        s=$!
        trap 'kill "$s" 2>/dev/null; exit 0' TERM
        wait "$s" && kill -USR1 "$parent" 2>/dev/null
    ) </dev/null >/dev/null 2>&1 3>&- &
    WATCHDOG_PID=$!
}

# ------------------------------------------------------------------------------------------ the API
quote() {  # shell-quote each argument, readably: plain words as they are, the rest in '...'
    local a out=()
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    printf '%s' "${out[*]}"
}

show() { echo "+ $(quote "$@")" >&3; }  # a command as it would be typed (never the API key)

# api METHOD PATH [JSON]: the response body on stdout; a clear message and status 1 on failure.
api() {
    local method=$1 path=$2 body=${3:-} url out code
    url="$API_URL$path"
    if [ "$DRY_RUN" = 1 ]; then
        show curl -X "$method" "$url" -H "X-API-KEY: \$SHADEFORM_API_KEY" ${body:+-H "Content-Type: application/json" --data "$body"}
        return 0
    fi
    # the key goes through stdin (curl -K -), not the command line other users can read in ps
    if ! out=$(printf 'header = "X-API-KEY: %s"\n' "$SHADEFORM_API_KEY" | curl -sS --max-time 60 -K - -X "$method" \
        -H "Content-Type: application/json" ${body:+--data "$body"} -w '\n%{http_code}' "$url" 2>&1); then
        echo "error: cannot reach the Shadeform API at $API_URL ($method $path): ${out##*$'\n'}" >&3
        return 1
    fi
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    case "$code" in
        2??) printf '%s' "$out" ;;
        401 | 403)
            echo "error: Shadeform rejected the API key (HTTP $code on $method $path): check SHADEFORM_API_KEY" >&3
            return 1
            ;;
        *)
            echo "error: Shadeform API $method $path failed (HTTP $code): $(printf '%s' "$out" | py_error_message)" >&3
            return 1
            ;;
    esac
}

py_error_message() {  # the message of an error body: its "error"/"message" field, else the raw text
    python3 -c '
import json, sys
raw = sys.stdin.read()
try:
    body = json.loads(raw)
    print(body.get("error") or body.get("message") or body.get("detail") or raw if isinstance(body, dict) else raw)
except ValueError:
    print(raw.strip()[:500])
'
}

# ------------------------------------------------------------------------------------------ 1. instance type
if [ "$DRY_RUN" = 0 ]; then start_watchdog; fi
log "phase $PHASE on ${NUM_GPUS}x $GPU (max $MAX_HOURS h); results -> $OUT"
if [ -n "$INSTANCE_TYPE" ] && [ -n "$CLOUD" ] && [ -n "$REGION" ]; then
    CHOICE="$CLOUD $REGION $INSTANCE_TYPE ?"
else
    query="gpu_type=$GPU&num_gpus=$NUM_GPUS&available=true${CLOUD:+&cloud=$CLOUD}"
    types=$(api GET "/instances/types?$query") || exit 1
    if [ "$DRY_RUN" = 1 ]; then
        CHOICE="${CLOUD:-<cheapest-cloud>} ${REGION:-<region>} ${INSTANCE_TYPE:-<${GPU}x${NUM_GPUS}>} ?"
    else
        # cheapest (hourly_price, cents) type with an available region matching the filters
        CHOICE=$(printf '%s' "$types" | python3 -c '
import json, sys
gpu, n, cloud, region, itype = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
data = json.load(sys.stdin)
types = data.get("instance_types", []) if isinstance(data, dict) else data
best = None
for t in types:
    c = t.get("configuration", {})
    if c.get("gpu_type") != gpu or int(c.get("num_gpus", 0)) != n:
        continue
    if (cloud and t.get("cloud") != cloud) or (itype and t.get("shade_instance_type") != itype):
        continue
    for a in t.get("availability", []):
        if a.get("available") and (not region or a.get("region") == region):
            cents = t.get("hourly_price")
            key = (cents if cents is not None else float("inf"), t["cloud"], a["region"])
            price = f"{cents / 100:.2f}" if cents is not None else "?"
            if best is None or key < best[0]:
                best = (key, " ".join((t["cloud"], a["region"], t["shade_instance_type"], price)))
if best is None:
    sys.exit(3)
print(best[1])
' "$GPU" "$NUM_GPUS" "$CLOUD" "$REGION" "$INSTANCE_TYPE") || {
            [ $? = 3 ] || die "unexpected /instances/types response: ${types:0:300}"
            die "no ${NUM_GPUS}x $GPU instance available${CLOUD:+ on $CLOUD}${REGION:+ in $REGION}${INSTANCE_TYPE:+ of type $INSTANCE_TYPE} right now: try later, another --cloud/--region, or another --gpu"
        }
    fi
fi
read -r CLOUD_PICK REGION_PICK TYPE_PICK PRICE <<<"$CHOICE"
if [ "$PRICE" != "?" ]; then
    log "instance type: $TYPE_PICK on $CLOUD_PICK/$REGION_PICK at \$$PRICE/h"
else
    log "instance type: $TYPE_PICK on $CLOUD_PICK/$REGION_PICK"
fi

# ------------------------------------------------------------------------------------------ 2. SSH key
if [ "$DRY_RUN" = 1 ]; then
    api GET /sshkeys >/dev/null
    api POST /sshkeys/add "{\"name\": \"nanochat-launch\", \"public_key\": \"<contents of $SSH_KEY.pub, when Shadeform does not know it>\"}" >/dev/null
    KEY_ID="<ssh-key-id>"
else
    PUBKEY=$(cat "$SSH_KEY.pub")
    keys=$(api GET /sshkeys) || exit 1
    KEY_ID=$(printf '%s' "$keys" | python3 -c '
import json, sys
mine = sys.argv[1].split()[:2]  # type and key material; the comment may differ
data = json.load(sys.stdin)
keys = data.get("ssh_keys", []) if isinstance(data, dict) else data
print(next((k["id"] for k in keys if k.get("public_key", "").split()[:2] == mine), ""))
' "$PUBKEY")
    if [ -z "$KEY_ID" ]; then
        body=$(python3 -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "public_key": sys.argv[2]}))' "nanochat-$(hostname -s 2>/dev/null || echo local)-$STAMP" "$PUBKEY")
        KEY_ID=$(api POST /sshkeys/add "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') || die "could not register $SSH_KEY.pub with Shadeform"
        log "registered $SSH_KEY.pub with Shadeform (key $KEY_ID)"
    fi
fi

# ------------------------------------------------------------------------------------------ 3. create, wait for active
CREATE=$(python3 -c '
import json, sys
cloud, region, itype, name, key, os_image, auto_delete = sys.argv[1:8]
body = {"cloud": cloud, "region": region, "shade_instance_type": itype, "shade_cloud": True, "name": name,
        "ssh_key_id": key, "auto_delete": {"date_threshold": auto_delete}}
if os_image:
    body["os"] = os_image
print(json.dumps(body))
' "$CLOUD_PICK" "$REGION_PICK" "$TYPE_PICK" "$NAME" "$KEY_ID" "$OS_IMAGE" "$AUTO_DELETE")
if [ "$DRY_RUN" = 1 ]; then
    api POST /instances/create "$CREATE" >/dev/null
    INSTANCE_ID="<instance-id>"
    api GET "/instances/$INSTANCE_ID/info" >/dev/null
    SSH_USER="<ssh_user>" IP="<ip>" SSH_PORT=22
else
    created=$(api POST /instances/create "$CREATE") || die "instance not created (nothing to clean up)"
    INSTANCE_ID=$(printf '%s' "$created" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') || die "unexpected create response: $created"
    log "created instance $INSTANCE_ID ($NAME); waiting for it to become active"
    status=""
    while :; do
        info=$(api GET "/instances/$INSTANCE_ID/info") || info=""
        if [ -n "$info" ]; then
            read -r status IP SSH_USER SSH_PORT <<<"$(printf '%s' "$info" | python3 -c '
import json, sys
i = json.load(sys.stdin)
print(i.get("status", "?"), i.get("ip") or "-", i.get("ssh_user") or "-", i.get("ssh_port") or 22)
')"
            [ "$status" = active ] && [ "$IP" != - ] && break
            case "$status" in deleted | error | failed) die "instance $INSTANCE_ID went to status '$status' before becoming active" ;; esac
        fi
        [ $((SECONDS - START)) -lt "$BOOT_SECONDS" ] || die "instance $INSTANCE_ID did not become active within $BOOT_TIMEOUT_MIN min (last status: ${status:-unknown})"
        pause "$POLL_SECONDS"
    done
    log "instance active at $SSH_USER@$IP:$SSH_PORT"
fi

SSH_OPTS=(-i "$SSH_KEY" -p "$SSH_PORT" -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=15 -o ServerAliveInterval=30)
HOST="$SSH_USER@$IP"
remote() {  # remote COMMAND-STRING
    if [ "$DRY_RUN" = 1 ]; then show ssh "${SSH_OPTS[@]}" "$HOST" "$1"; return 0; fi
    run ssh "${SSH_OPTS[@]}" "$HOST" "$1"
}
xfer() {  # xfer rsync-args...
    if [ "$DRY_RUN" = 1 ]; then show rsync "$@"; return 0; fi
    run rsync "$@"
}
RSYNC_SSH="ssh $(quote "${SSH_OPTS[@]}")"

if [ "$DRY_RUN" = 0 ]; then
    until remote true 2>/dev/null; do
        [ $((SECONDS - START)) -lt "$BOOT_SECONDS" ] || die "instance $INSTANCE_ID is active but $HOST does not answer SSH after $BOOT_TIMEOUT_MIN min"
        pause "$POLL_SECONDS"
    done
else
    remote true
fi

# ------------------------------------------------------------------------------------------ 4. upload, run, stream
log "copying the repository to $HOST:$REMOTE_REPO"
xfer -az --delete --filter=':- .gitignore' --exclude .git/ -e "$RSYNC_SSH" "$REPO/" "$HOST:$REMOTE_REPO/"
remote "mkdir -p $REMOTE_BASE && rm -f $EXIT_FILE"
if [ -n "$UPLOAD" ]; then
    log "copying $UPLOAD to $HOST:$REMOTE_BASE"
    xfer -az --exclude 'launch-*.exit' -e "$RSYNC_SSH" "$UPLOAD/" "$HOST:$REMOTE_BASE/"
fi
envs="PHASE=$PHASE NPROC=$NUM_GPUS NANOCHAT_BASE_DIR=\$HOME/$REMOTE_BASE"
if [ -n "$WHEEL" ]; then
    log "copying $WHEEL to $HOST:$REMOTE_WHEELS"
    xfer -az -e "$RSYNC_SSH" "$WHEEL" "$HOST:$REMOTE_WHEELS/"  # rsync creates the one missing directory
    envs+=" NANOCHAT_WHEEL=\$HOME/$REMOTE_WHEELS/$(quote "$(basename "$WHEEL")")"
fi
for kv in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do
    envs+=" ${kv%%=*}=$(quote "${kv#*=}")"
done
# setsid + nohup: the run is its own session, immune to the SSH connection going away; its exit
# status lands in EXIT_FILE when it ends.
inner="cd $REMOTE_REPO && env $envs bash speedrun.sh > \$HOME/$LOG 2>&1; echo \$? > \$HOME/$EXIT_FILE"
remote "setsid nohup bash -c $(quote "$inner") > /dev/null 2>&1 < /dev/null &"
log "started PHASE=$PHASE bash speedrun.sh on the instance; streaming $LOG"

PHASE_RC=""
if [ "$DRY_RUN" = 1 ]; then
    remote "tail -c +1 $LOG; cat $EXIT_FILE"
    PHASE_RC=0
else
    offset=0
    last_ok=$SECONDS
    chunk=$(mktemp)
    while :; do
        if remote "tail -c +$((offset + 1)) $LOG 2>/dev/null || true" >"$chunk" 2>/dev/null; then
            last_ok=$SECONDS
            cat "$chunk"
            offset=$((offset + $(wc -c <"$chunk")))
            if rc=$(remote "cat $EXIT_FILE 2>/dev/null" 2>/dev/null) && [ -n "$rc" ]; then
                remote "tail -c +$((offset + 1)) $LOG 2>/dev/null || true" 2>/dev/null || true  # the last lines
                PHASE_RC=$rc
                break
            fi
        else
            # a dropped connection is not a failed run: the job goes on (setsid); keep polling for 10 min
            [ $((SECONDS - last_ok)) -lt 600 ] || die "lost SSH to $HOST for 10 min"
            echo "(ssh to $HOST failed; retrying)" >&3
        fi
        pause "$POLL_SECONDS"
    done
    rm -f "$chunk"
    log "phase $PHASE finished with status $PHASE_RC"
fi

# ------------------------------------------------------------------------------------------ 5. results
if [ "$DOWNLOAD" != none ]; then
    [ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
    what=("$HOST:$REMOTE_BASE/report" "$HOST:$REMOTE_BASE/stages" "$HOST:$REMOTE_BASE/launch-$PHASE.log")
    [ "$DOWNLOAD" = report ] || what+=("$HOST:$REMOTE_BASE/checkpoints" "$HOST:$REMOTE_BASE/tokenizer")
    log "copying results to $OUT"
    xfer -az --ignore-missing-args -e "$RSYNC_SSH" "${what[@]}" "$OUT/" || echo "warning: copying the results back failed" >&3
fi
if [ "$DRY_RUN" = 1 ]; then
    api POST "/instances/$INSTANCE_ID/delete" >/dev/null
    INSTANCE_ID=""  # nothing was created
fi
log "done in $(((SECONDS - START) / 60)) min"
exit "$PHASE_RC"
