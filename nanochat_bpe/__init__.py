"""
nanochat's byte-level BPE trainer: the Rust extension built from rustbpe/ (module
`nanochat_bpe._core`), re-exported here.

This package exists only because maturin's mixed Rust/Python layout (the Python packages
nanochat/, scripts/, tasks/ installed by the same `pip install -e .`) needs the extension to live
inside a package directory. The name is not `rustbpe` so that the PyPI package `rustbpe` can be
installed beside it for benchmarks. API and docs: rustbpe/src/python.rs, docs/tokenizer.md.
"""

from nanochat_bpe._core import (  # noqa: F401
    GPT4_PATTERN,
    MAX_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    NANOCHAT_PATTERN,
    Tokenizer,
    __version__,
)

__all__ = ["GPT4_PATTERN", "MAX_VOCAB_SIZE", "MIN_VOCAB_SIZE", "NANOCHAT_PATTERN", "Tokenizer", "__version__"]
