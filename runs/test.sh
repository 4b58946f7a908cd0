#!/usr/bin/env bash
# Set up (venv + install) and run every test: the Rust crate's checks, then pytest.
#   bash runs/test.sh            # everything (what CI runs)
#   bash runs/test.sh -k gpt     # extra arguments go to pytest
#   bash runs/test.sh -m "not slow"   # the fast loop (about a minute); CI runs the slow tests too
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup.sh

echo "== rustbpe: cargo fmt / clippy / test"
(cd rustbpe && cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test --release --quiet)

echo "== pytest"
python -m pytest -q "$@"
