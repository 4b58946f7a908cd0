# Sourced by the runs/*.sh recipes: create the virtual environment .venv (once) and install the
# project into it. `pip install -e ".[dev]"` builds the Rust BPE crate (rustbpe/, via maturin) in
# release mode and installs torch and the other dependencies from PyPI.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[dev]"
