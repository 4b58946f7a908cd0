"""
Conversations -> packed training rows for midtraining: BOS-aligned rows, best-fit packing, the
loss mask as targets of -1, disjoint conversations per rank, exactly resumable.

    conversations (a tasks.common.Task: index -> conversation), in the order `indices`
    rank r of W takes indices[r::W]; an epoch is one pass over them, the next pass is the same order
      -> each rendered by Tokenizer.render_conversation(conversation, max_tokens=T + 1): it starts
         with <|bos|>, and one longer than a row is cut to exactly T + 1 tokens
      -> a buffer of up to `buffer_size` rendered conversations (oldest first)
      -> best-fit packing into rows of T + 1 tokens (fill_row)
      -> batches of B rows: inputs = row[:-1], targets = row[1:] where the mask of row[1:] is 1, else -1

Best fit (Ding et al. 2024, "Fewer Truncations Improve Language Modeling"; nanochat's BOS-aligned
loader): while a row has room r, put in the longest buffered conversation of length <= r (ties: the
oldest). When none fits the rest of the row is padding (input <|bos|>, target -1): a conversation
is never split across rows, and the buffer makes padding rare (measured on the default mid recipe
at T = 256 with the 8K runcpu tokenizer: 1.4% of the tokens of a 2,400-row run). A conversation
with no trained token inside the first T + 1 tokens (a user turn longer than the row) is skipped.
Cropping a conversation to fill the row (what the pretraining loader does with documents) was
rejected: the assistant's reply comes last, so a cropped conversation loses mostly the tokens that
carry a loss, and the part that stays is mostly untrained prompt.

Resume: state_dict() is small JSON, (epoch, cursor, the buffered conversation indices); the
conversations are rendered again on load, so a resumed loader yields exactly the batches of the
uninterrupted one. It records a fingerprint of this rank's index list, T and the rank layout;
load_state_dict() refuses a state made for different data or settings.
"""

import hashlib

import numpy as np
import torch

from nanochat.common import NanochatError

STATE_FORMAT, STATE_VERSION = "nanochat-chat-loader", 1


def fill_row(buffer, cap, pad_id):
    """
    Pack one row by best fit, taking conversations out of `buffer` (a list of (key, ids, mask),
    oldest first, each len(ids) <= cap; modified in place).
    Returns (ids, mask, keys, n_pad): two lists of exactly cap ints, the keys of the conversations
    placed (in row order) and the number of padding tokens at the end of the row (id pad_id, mask 0).
    An empty buffer gives an all-padding row.
    Raises ValueError for a conversation longer than cap.
    """
    ids, mask, keys = [], [], []
    while buffer:
        room = cap - len(ids)
        best = -1
        for i, (_, conv_ids, _) in enumerate(buffer):
            n = len(conv_ids)
            if n > cap:
                raise ValueError(f"conversation of {n} tokens does not fit a row of {cap}")
            if n <= room and (best < 0 or n > len(buffer[best][1])):  # strict >: ties keep the oldest
                best = i
        if best < 0:
            break
        key, conv_ids, conv_mask = buffer.pop(best)
        ids.extend(conv_ids)
        mask.extend(conv_mask)
        keys.append(key)
    pad = cap - len(ids)
    return ids + [pad_id] * pad, mask + [0] * pad, keys, pad


def estimate_tokens(conversations, indices, tokenizer, cap, sample=2000):
    """
    Estimated total rendered tokens (each conversation cut to cap) of conversations[indices], from
    an evenly spaced sample of at most `sample` of them: rendering a whole mixture (~10^5
    conversations) would cost more start-up time than the estimate is worth. Returns an int.
    """
    stride = max(1, len(indices) // sample)
    lengths = [len(tokenizer.render_conversation(conversations[i], max_tokens=cap)[0]) for i in indices[::stride][:sample]]
    return round(len(indices) * sum(lengths) / max(1, len(lengths)))


def rows_to_batch(rows):
    """rows: list of (ids, mask), each of length T + 1. Returns (inputs, targets), int64 [B, T] on the
    CPU: inputs = ids[:-1], targets = ids[1:] where mask[1:] is 1, else -1."""
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    targets = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return ids[:, :-1].contiguous(), targets


class ConversationLoader:
    """
    Iterator of (inputs, targets), int64 [B, T] on `device`, built from conversations as in the
    module docstring.

    conversations: indexable, conversations[i] -> {"messages": [...]} (a tasks.common.Task).
    indices: the conversation indices to use, in order (e.g. the training part of a shuffled
        mixture); rank r of world_size takes indices[r::world_size].
    tokenizer: a nanochat.tokenizer.Tokenizer. B, T: rows per batch, tokens per row (seq_len).
    buffer_size: conversations the packer chooses from.
    num_epochs: None loops forever (training); k stops after k passes, the last batch may have
        fewer than B rows (evaluation: every conversation exactly once).
    state: a state_dict() to resume from.
    Raises NanochatError when a rank gets no conversations or on a state that does not match.
    """

    def __init__(self, conversations, indices, tokenizer, B, T, device="cpu", rank=0, world_size=1, buffer_size=100, num_epochs=None, state=None):
        if B < 1 or T < 1 or buffer_size < 1 or not 0 <= rank < world_size:
            raise NanochatError(f"ConversationLoader: need B, T, buffer_size >= 1 and 0 <= rank < world_size, got B={B} T={T} buffer_size={buffer_size} rank={rank} world_size={world_size}")
        self.conversations, self.tokenizer = conversations, tokenizer
        self.B, self.T, self.cap = B, T, T + 1
        self.device = torch.device(device)
        self.rank, self.world_size, self.buffer_size, self.num_epochs = rank, world_size, buffer_size, num_epochs
        self.my_indices = [int(i) for i in indices[rank::world_size]]
        if not self.my_indices:
            raise NanochatError(f"ConversationLoader: {len(indices)} conversations leave none for rank {rank} of {world_size}")
        self.fingerprint = hashlib.sha256(",".join(map(str, self.my_indices)).encode()).hexdigest()[:16]
        self.epoch, self.cursor = 0, 0  # the next conversation to read: my_indices[cursor] of this epoch
        self.buffer = []  # (index, ids, mask), oldest first
        self.skipped = 0  # conversations without a trained token inside a row (this process)
        self.rows_packed = self.pad_tokens = 0  # packing statistics (this process)
        if state is not None:
            self.load_state_dict(state)

    # ---------------------------------------------------------------------------------- state

    def _header(self):
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "seq_len": self.T, "rank": self.rank, "world_size": self.world_size, "buffer_size": self.buffer_size, "indices": self.fingerprint}

    def state_dict(self):
        """JSON-serialisable position after the last batch returned."""
        return self._header() | {"epoch": self.epoch, "cursor": self.cursor, "buffer": [key for key, _, _ in self.buffer]}

    def load_state_dict(self, state):
        """Continue from a state_dict(). Raises NanochatError if it was made for other data or settings."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise NanochatError("chat loader state: not a nanochat chat loader state")
        for key, value in self._header().items():
            if state.get(key) != value:
                what = "the conversations (recipe, seed or held-out split) changed" if key == "indices" else f"{key} was {state.get(key)!r}, now {value!r}"
                raise NanochatError(f"chat loader state does not match this loader ({what}); exact resume needs the same data and settings")
        try:
            self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
            self.buffer = [(int(i), *self._render(int(i))) for i in state["buffer"]]
        except (KeyError, TypeError, ValueError, IndexError):
            raise NanochatError("chat loader state: malformed position or buffer") from None

    def progress(self):
        """Epochs consumed by this rank so far, as a float (conversations still buffered not counted)."""
        return self.epoch + (self.cursor - len(self.buffer)) / len(self.my_indices)

    # ---------------------------------------------------------------------------------- iteration

    def _render(self, index):
        return self.tokenizer.render_conversation(self.conversations[index], max_tokens=self.cap)

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            if self.cursor == len(self.my_indices):
                if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                    return
                self.epoch, self.cursor = self.epoch + 1, 0
            index = self.my_indices[self.cursor]
            self.cursor += 1
            ids, mask = self._render(index)
            if not any(mask[1:]):
                self.skipped += 1
                continue
            self.buffer.append((index, ids, mask))

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.B):
            self._refill()
            if not self.buffer:
                break
            ids, mask, _, n_pad = fill_row(self.buffer, self.cap, self.tokenizer.bos_token_id)
            rows.append((ids, mask))
            self.rows_packed += 1
            self.pad_tokens += n_pad
        if not rows:
            raise StopIteration
        x, y = rows_to_batch(rows)
        return x.to(self.device), y.to(self.device)


def holdout_split(n, n_val, seed, world_size=1):
    """
    A seeded shuffle of range(n) split into (val indices, train indices): the first n_val held
    out. Raises NanochatError when too few are left for world_size ranks.
    """
    order = np.random.default_rng(seed).permutation(n).tolist()
    val_idx, train_idx = order[:n_val], order[n_val:]
    if len(train_idx) < world_size or 0 < len(val_idx) < world_size:
        raise NanochatError(f"{n} conversations with --val-conversations {n_val} leave too few for {world_size} ranks")
    return val_idx, train_idx
