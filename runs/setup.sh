# The Python environment of the recipes, from a bare machine: check the prerequisites (one line
# each), create the virtual environment .venv (once), install the project into it and activate it.
# Sourced by speedrun.sh and runs/*.sh from the repository root; run it directly to check only:
#
#   bash runs/setup.sh --check          # the prerequisite lines; status 1 when one is missing
#
# What a bare node must have, and nothing else (docs/cloud.md, "A bare node"): python3 >= 3.10 with
# its venv module (Ubuntu: python3-venv, which brings ensurepip), network access to PyPI, and, to
# build the Rust BPE crate (rustbpe/), cargo + rustc and a C linker `cc`. `pip install -e ".[dev]"`
# builds the crate (maturin, release mode) and installs torch and the other dependencies.
#
#   NANOCHAT_WHEEL=path.whl    a prebuilt wheel of the project (`maturin build --release`, for this
#                              node's Python and platform; a relative path is from the repository
#                              root) installed instead of building: no Rust needed
#   NANOCHAT_INSTALL_RUST=0    refuse to install Rust; by default, when cargo is missing and no wheel is
#                              given, rustup installs a minimal stable toolchain into ~/.cargo (needs curl)
#   NANOCHAT_SETUP=0           no checks, no venv, no install: the `python` (and `torchrun`) on PATH,
#                              as they are (a managed environment, the tests)
#
# The install is skipped when .venv/.nanochat-setup holds the hash of what it was made from
# (pyproject.toml, the crate's sources, the wheel), so that re-running a recipe is offline and quick.

setup_say() { echo "setup: $*"; }

# setup_python_ok: python3 >= 3.10 with venv + ensurepip (Debian and Ubuntu ship venv without
# ensurepip unless python3-venv is installed, and `python3 -m venv` then fails half-way).
setup_python_ok() {
    local py ver
    if ! py=$(command -v python3); then
        setup_say "python3: not found: install Python >= 3.10 with venv (Ubuntu: sudo apt-get install -y python3 python3-venv)"
        return 1
    fi
    ver=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || ver="?"
    if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' 2>/dev/null; then
        setup_say "python3: $py is Python $ver; nanochat needs >= 3.10 (Ubuntu 22.04+ has it; or install python3.10+ and put it first on PATH)"
        return 1
    fi
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        setup_say "python3: $py (Python $ver) has no venv/ensurepip module: sudo apt-get install -y python${ver%.*}-venv"
        return 1
    fi
    setup_say "python3: $py (Python $ver) with venv: ok"
}

# setup_wheel_ok: NANOCHAT_WHEEL is a built (not editable) nanochat wheel for this python3.
setup_wheel_ok() {
    local why
    if [ ! -f "$NANOCHAT_WHEEL" ]; then
        setup_say "NANOCHAT_WHEEL=$NANOCHAT_WHEEL: no such file (make one with: maturin build --release)"
        return 1
    fi
    why=$(python3 - "$NANOCHAT_WHEEL" <<'EOF' 2>&1
import os, re, sys, zipfile
path = sys.argv[1]
m = re.fullmatch(r"nanochat-[^-]+-(cp\d+)-[^-]+-[^-]+\.whl", os.path.basename(path))
here = "cp%d%d" % sys.version_info[:2]
if not m:
    sys.exit("not a nanochat wheel (expected nanochat-VERSION-cpXY-ABI-PLATFORM.whl)")
if m.group(1) != here:
    sys.exit(f"built for {m.group(1)}, but python3 here is {here}: build it with maturin build --release -i python3.{sys.version_info[1]}")
try:
    names = zipfile.ZipFile(path).namelist()
except zipfile.BadZipFile:
    sys.exit("not a zip file")
if not any(re.fullmatch(r"nanochat_bpe/_core\..*(so|pyd)", n) for n in names):
    sys.exit("holds no nanochat_bpe/_core extension (an editable wheel? use maturin build --release)")
EOF
    ) || {
        setup_say "NANOCHAT_WHEEL=$NANOCHAT_WHEEL: ${why##*$'\n'}"
        return 1
    }
    setup_say "Rust: not needed, prebuilt wheel $NANOCHAT_WHEEL: ok"
}

# setup_rust_ok: cargo and rustc (on PATH or in ~/.cargo/bin, where rustup puts them), or the means
# to install them; and the C linker that rustc links the extension with.
setup_rust_ok() {
    local ok=0
    if [ -d "$HOME/.cargo/bin" ] && ! command -v cargo >/dev/null; then
        PATH=$HOME/.cargo/bin:$PATH
    fi
    if command -v cargo >/dev/null && command -v rustc >/dev/null; then
        setup_say "Rust: $(cargo --version 2>/dev/null || echo cargo), $(rustc --version 2>/dev/null || echo rustc): ok"
    elif [ "${NANOCHAT_INSTALL_RUST:-1}" = 0 ]; then
        setup_say "Rust: cargo not found and NANOCHAT_INSTALL_RUST=0: install Rust (https://rustup.rs), or pass a prebuilt wheel as NANOCHAT_WHEEL=path (maturin build --release)"
        ok=1
    elif ! command -v curl >/dev/null; then
        setup_say "Rust: cargo not found, and no curl to install it with rustup: sudo apt-get install -y curl, install Rust (https://rustup.rs), or pass NANOCHAT_WHEEL=path"
        ok=1
    else
        setup_say "Rust: cargo not found: setup installs it with rustup into ~/.cargo (NANOCHAT_INSTALL_RUST=0 to refuse): ok"
    fi
    if command -v cc >/dev/null; then
        setup_say "C linker: $(command -v cc): ok"
    else
        setup_say "C linker: cc not found (rustc links the extension with it): sudo apt-get install -y build-essential, or pass NANOCHAT_WHEEL=path"
        ok=1
    fi
    return "$ok"
}

# setup_check: every prerequisite, one line each; status 1 when one is missing.
setup_check() {
    local ok=0
    setup_python_ok || return 1  # the rest asks python3
    if [ -n "${NANOCHAT_WHEEL:-}" ]; then
        setup_wheel_ok || ok=1
    else
        setup_rust_ok || ok=1
    fi
    return "$ok"
}

# setup_stamp: the hash of what the install is made from.
setup_stamp() {
    python - "${NANOCHAT_WHEEL:-}" <<'EOF'
import glob, hashlib, os, sys
h = hashlib.sha256()
files = ["pyproject.toml", "rustbpe/Cargo.toml", "rustbpe/Cargo.lock", *sorted(glob.glob("rustbpe/src/**/*.rs", recursive=True))]
for path in files + [p for p in sys.argv[1:] if p]:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
print(h.hexdigest())
EOF
}

setup_main() {
    if [ "${NANOCHAT_SETUP:-1}" = 0 ]; then
        if ! python -c 'import torch, nanochat' 2>/dev/null; then
            setup_say "NANOCHAT_SETUP=0 but $(command -v python || echo python) cannot import torch and nanochat: activate an environment that has them"
            return 1
        fi
        setup_say "NANOCHAT_SETUP=0: using $(command -v python) as it is"
        return 0
    fi
    case "${NANOCHAT_WHEEL:-}" in "" | /*) ;; *) NANOCHAT_WHEEL=$PWD/$NANOCHAT_WHEEL ;; esac  # pip wants a path, not a name
    local fresh=0
    if [ -x .venv/bin/python ]; then
        # shellcheck disable=SC1091
        source .venv/bin/activate
        if [ "$(cat .venv/.nanochat-setup 2>/dev/null)" = "$(setup_stamp)" ]; then
            setup_say ".venv is up to date"
            return 0
        fi
        # an existing venv to (re-)install into (new dependencies, a changed crate): python3 is its own
        setup_check || return 1
    else
        setup_check || return 1
        fresh=1
    fi
    if [ -z "${NANOCHAT_WHEEL:-}" ] && ! command -v cargo >/dev/null; then
        setup_say "installing Rust with rustup (stable, minimal profile) into ~/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --no-modify-path || return 1
        PATH=$HOME/.cargo/bin:$PATH
        command -v cargo >/dev/null || { setup_say "Rust: rustup did not install cargo into ~/.cargo/bin (see its output above)"; return 1; }
    fi
    if [ "$fresh" = 1 ]; then
        python3 -m venv .venv || return 1
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    python -m pip install --quiet --upgrade pip || return 1
    if [ -n "${NANOCHAT_WHEEL:-}" ]; then
        # the wheel brings the dependencies and the built extension; the extension is also put beside
        # the sources (as an editable install does), because the recipes run from the repository root,
        # where ./nanochat_bpe/ comes first on sys.path
        python -m pip install --quiet "$NANOCHAT_WHEEL[dev]" || return 1
        python - "$NANOCHAT_WHEEL" <<'EOF' || return 1
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for name in z.namelist():
    if re.fullmatch(r"nanochat_bpe/_core\..*(so|pyd)", name):
        z.extract(name, ".")
EOF
    else
        python -m pip install --quiet -e ".[dev]" || return 1
    fi
    setup_stamp >.venv/.nanochat-setup
    setup_say "installed into .venv"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    cd "$(dirname "$0")/.." || exit 1
    case "${1:-}" in
        --check) setup_check; exit ;;
        *) echo "usage: bash runs/setup.sh --check   (the recipes source it to set up .venv)" >&2; exit 2 ;;
    esac
fi
setup_main || return 1
