import pytest

from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer


def byte_tokenizer():
    """A real Tokenizer with only the 256 byte tokens (no merges) plus the special tokens."""
    return Tokenizer({bytes([i]): i for i in range(256)}, SPLIT_PATTERN)


@pytest.fixture
def byte_tok():
    return byte_tokenizer()


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """An isolated NANOCHAT_BASE_DIR for the test."""
    d = tmp_path / "base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(autouse=True)
def _no_identity_override(monkeypatch):
    """Identity() reads $NANOCHAT_IDENTITY_FILE before its default file: no test inherits the user's."""
    monkeypatch.delenv("NANOCHAT_IDENTITY_FILE", raising=False)
