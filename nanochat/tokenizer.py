"""
The tokenizer: byte-level BPE trained by our Rust crate (`nanochat_bpe`, in rustbpe/), encoded at
run time by tiktoken built from the same merge ranks.

On disk (in <base_dir>/tokenizer/ by default), no pickle:
- tokenizer.tiktoken: one line per mergeable token, "<base64 bytes> <rank>" (tiktoken's own format)
- tokenizer.json: {"format": "nanochat-tokenizer", "version": 1, "pattern": str, "special_tokens": {name: id}}

Special tokens come after the mergeable ranks, in the order of SPECIAL_TOKENS.
"""

import base64
import hashlib
import json
import os

import tiktoken
import torch

from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the engine writes the tool's output back (never trained on)
    "<|output_end|>",
]

# The GPT-4 split pattern with numbers split into runs of at most 2 digits instead of 3: at our
# small vocab sizes (32K-64K) fewer tokens go to spending on 3-digit numbers (nanochat's choice).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"


class Tokenizer:
    """
    A tiktoken.Encoding plus nanochat's special tokens and chat rendering.

    Token ids are Python ints; the vocabulary is mergeable_ranks (byte tokens and merges) followed by
    SPECIAL_TOKENS.
    """

    def __init__(self, mergeable_ranks, pattern, special_tokens=None):
        if special_tokens is None:
            n = len(mergeable_ranks)
            special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.mergeable_ranks = mergeable_ranks  # dict[bytes, int]
        self.pattern = pattern
        self.special_tokens = special_tokens  # dict[str, int]
        self.enc = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.bos_token_id = special_tokens["<|bos|>"]

    # ------------------------------------------------------------------------------------------
    # training, saving, loading

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Train BPE on an iterator of str; vocab_size counts the special tokens too."""
        import nanochat_bpe  # the Rust trainer, only needed here

        n_merge_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merge_vocab < 256:
            raise NanochatError(f"--vocab-size {vocab_size} is too small: need >= {256 + len(SPECIAL_TOKENS)}")
        trainer = nanochat_bpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_merge_vocab, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, directory):
        """Write the rank file and the JSON meta atomically into directory."""
        os.makedirs(directory, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write_bytes(os.path.join(directory, RANKS_FILE), "".join(lines).encode())
        meta = {"format": "nanochat-tokenizer", "version": 1, "pattern": self.pattern, "special_tokens": self.special_tokens}
        atomic_write_bytes(os.path.join(directory, META_FILE), json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, directory):
        """Load a saved tokenizer. Raises NanochatError on a missing or corrupt file."""
        ranks_path, meta_path = os.path.join(directory, RANKS_FILE), os.path.join(directory, META_FILE)
        for path in (ranks_path, meta_path):
            if not os.path.isfile(path):
                raise NanochatError(f"tokenizer file not found: {path} (train one with: python -m scripts.tok_train)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            pattern, special_tokens = meta["pattern"], {k: int(v) for k, v in meta["special_tokens"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NanochatError(f"corrupt tokenizer meta {meta_path}: {e!r}") from None
        ranks = {}
        with open(ranks_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    tok_b64, rank = line.split()
                    ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
                except ValueError:
                    raise NanochatError(f"corrupt tokenizer rank file {ranks_path}:{lineno}") from None
        if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
            raise NanochatError(f"corrupt tokenizer rank file {ranks_path}: ranks are not 0..{len(ranks) - 1}")
        if sorted(special_tokens.values()) != list(range(len(ranks), len(ranks) + len(special_tokens))) or set(SPECIAL_TOKENS) - set(special_tokens):
            raise NanochatError(f"corrupt tokenizer meta {meta_path}: special tokens do not follow the ranks")
        return cls(ranks, pattern, special_tokens)

    def fingerprint(self):
        """
        A stable id of this tokenizer, for checkpoints to record and check on load: the first 16 hex
        digits (str) of the sha256 of the mergeable ranks (each token's bytes and rank, in rank
        order), the special tokens (name and id) and the split pattern, serialised as compact JSON.
        The same for a tokenizer and its saved-and-loaded copy on any machine; different when any
        merge, rank, special token or the pattern differs. Changing this recipe would orphan the
        fingerprints already stored in checkpoints, so tests pin its value.
        """
        ranks = sorted([rank, base64.b64encode(tok).decode()] for tok, rank in self.mergeable_ranks.items())
        content = {"ranks": ranks, "special_tokens": sorted(self.special_tokens.items()), "pattern": self.pattern}
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------
    # encoding

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode_special(self, name):
        return self.special_tokens[name]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        Encode a str (-> list[int]) or a list of str (-> list[list[int]], tiktoken's threads).
        Special-token text in the input is encoded as ordinary text, never as a special token.
        prepend / append: a token id (or special token name) added to each sequence.
        """
        if isinstance(prepend, str):
            prepend = self.encode_special(prepend)
        if isinstance(append, str):
            append = self.encode_special(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, prepend)
            if append is not None:
                ids.append(append)
            return ids
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            batch = [[prepend] + ids for ids in batch]
        if append is not None:
            for ids in batch:
                ids.append(append)
        return batch

    def decode(self, ids):
        return self.enc.decode(ids)

    def id_to_token(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self, device="cpu"):
        """int32 [vocab_size]: UTF-8 byte length of each token, 0 for special tokens (for bpb)."""
        nbytes = torch.zeros(self.vocab_size, dtype=torch.int32)
        for tok, rank in self.mergeable_ranks.items():
            nbytes[rank] = len(tok)
        return nbytes.to(device)

    # ------------------------------------------------------------------------------------------
    # chat rendering

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Render {"messages": [...]} into (ids, mask), two lists of equal length <= max_tokens.

        mask[i] == 1 where ids[i] is a training target: assistant text, the assistant's python tool
        calls (<|python_start|> code <|python_end|>) and <|assistant_end|>. Everything else is 0:
        <|bos|>, user turns, <|assistant_start|>, and tool outputs (<|output_start|> ... <|output_end|>),
        which the engine writes at inference time. An optional leading system message is merged
        into the first user turn. Sequences longer than max_tokens are cut at max_tokens (the tail
        is dropped; callers that care check len(ids) == max_tokens).
        Raises NanochatError on a malformed conversation.
        """
        messages = list(conversation["messages"])
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise NanochatError("a system message must be followed by a user message")
            messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]
        if not messages:
            raise NanochatError("conversation has no messages")
        ids, mask = [self.bos_token_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        S = self.special_tokens
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise NanochatError(f"message {i} has role {message['role']!r}, expected {expected!r} (roles must alternate)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise NanochatError(f"user message {i} content must be a string")
                add([S["<|user_start|>"]] + self.encode(content) + [S["<|user_end|>"]], 0)
                continue
            add([S["<|assistant_start|>"]], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([S["<|python_start|>"]] + self.encode(text) + [S["<|python_end|>"]], 1)
                elif kind == "python_output":
                    add([S["<|output_start|>"]] + self.encode(text) + [S["<|output_end|>"]], 0)
                else:
                    raise NanochatError(f"unknown assistant content part type {kind!r}")
            add([S["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Token ids that prime the model for the next assistant reply: the conversation without its
        last assistant message (if any), then <|assistant_start|>."""
        messages = list(conversation["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 30)
        return ids + [self.special_tokens["<|assistant_start|>"]]


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer(directory=None):
    """The tokenizer trained by scripts/tok_train.py (default: <base_dir>/tokenizer)."""
    return Tokenizer.load(directory or get_tokenizer_dir())
