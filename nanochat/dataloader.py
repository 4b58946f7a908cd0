"""
The pretraining token loader: parquet shards -> packed rows of token ids, streamed, distributed and
exactly resumable.

Pipeline (per data stream):

    row groups of the split; data stream v of V takes the global row groups v, v + V, v + 2V, ...
    (a new epoch starts over when they run out)
      -> documents tokenised a row group at a time in a background thread, through the tokenizer
         (tiktoken underneath, its own thread pool), each prefixed with <|bos|>; empty documents
         are skipped
      -> a buffer of up to `buffer_docs` documents
      -> best-fit packing into rows of T + 1 tokens, in a second background thread
      -> batches of B rows: inputs = rows[:, :-1], targets = rows[:, 1:]      int64 [B, T]

Data streams and ranks: the split is read as V independent streams (row groups dealt round-robin,
each stream packed on its own), and rank r of W owns the streams r, r + W, r + 2W, ...; its
loader yields one batch from each of its streams in turn. Micro-batch j of the whole job (counted
over steps, accumulation steps and ranks as j = W * (local micro-batch) + rank) is therefore batch
j // V of stream j % V, whatever W is: 1 process accumulating 2 micro-batches and 2 ranks of one
micro-batch each train on the same rows at every step, and so give the same losses. V defaults to
the largest multiple of W that is at most max(W, min(DEFAULT_STREAMS, row groups of the split)):
8 on ../shared/data/pretrain for W = 1, 2, 4 and 8, so those world sizes see the same data.

Best-fit packing: documents are packed into training rows by best fit so that few are truncated
(Ding et al. 2024, "Fewer Truncations Improve Language Modeling"), here online over a bounded
buffer as in nanochat's BOS-aligned loader. Every row starts at the start of a document
(<|bos|>), and no document is split unless nothing fits:

    for each row of T + 1 tokens, while it has room r:
        refill the buffer to buffer_docs documents
        put in the longest document of length <= r        (ties: the one read first)
        if none fits: crop the shortest document to exactly r tokens, which fills the row
    before a row starts: a document read more than MAX_AGE_FACTOR * buffer_docs documents ago is
    put first (cropped to T + 1 if longer), so a long document cannot wait in the buffer forever.

What is cropped: only the end of a document, and only when no document in the buffer fits the
space left. With keep_tails=False (nanochat's choice) the cropped-off tail is dropped: training
sees the first T + 1 tokens of each long document and nothing after. That wastes a lot on corpora
of long documents: on ../shared/data/pretrain (38.2M tokens in the train split with a 32K BPE,
mean ~2.3K per document) 55% of the tokens are dropped at T=2048 and 85% at T=512; the loss
shrinks with the share of documents longer than T. With keep_tails=True the tail goes back into the
buffer as a new piece that starts with its own <|bos|> (one extra token per crop, nothing dropped;
the model then also sees document middles right after a <|bos|>). At the end of a finite pass
(num_epochs) the last incomplete batch is dropped.

Resume: state_dict() is JSON: the read position (epoch, global row group, row), the document
counter and, for every buffered piece, (row group, row, token offset, read index). Token ids are
not stored (one such position per stream the rank owns, plus which stream is next): load_state_dict() re-reads and re-tokenises the referenced documents (the age rule
keeps them recent: with buffer_docs=1000 on ../shared/data/pretrain they lie in the last ~20 row
groups read, a state is ~20 KB of JSON), and the loader then yields exactly the
batches the uninterrupted loader would have yielded. The rows of each stream do not depend on B,
so B may change across a resume (with more than one stream per rank the batches then interleave
the streams' rows differently, none repeated or skipped); T, the split, rank / world_size, the number of streams, buffer_docs,
keep_tails and the set of shards may not (NanochatError).
"""

import atexit
import bisect
import hashlib
import heapq
import itertools
import os
import queue
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanochat.common import NanochatError
from nanochat.dataset import get_data_dir, open_shard, read_row_group, split_files

STATE_FORMAT, STATE_VERSION = "nanochat-dataloader", 2  # 2: one position per data stream
DEFAULT_STREAMS = 8  # data streams of a split (see the module docstring): one per GPU of an 8-GPU node
# A buffered document older than this many buffers' worth of reads goes first into the next row.
# Simulated on ../shared/data/pretrain: packing efficiency unchanged (within 1%), and the documents
# a resume must re-read fall from everything read so far to the last ~2 buffers.
MAX_AGE_FACTOR = 2
PREFETCH_ROW_GROUPS = 2  # row groups read and tokenised ahead of the one being packed
PREFETCH_BATCHES = 4  # packed batches ready ahead of the training loop
# Tokenised row groups are shared within the process: a stream whose row groups are fewer than its
# buffer holds reads them again in its next epochs, and every new loader of a split (an evaluation,
# the unigram baseline) reads the row groups an earlier one read. An entry lives while a buffered
# document still refers to its tokens (weakly held) and, besides, the most recent entries up to
# RECENT_TOKENS tokens in all (128 MiB of int32) are held strongly. The same tokens either way: a
# document is tokenised on its own, and the key holds the shard file's size and mtime.
RECENT_TOKENS = 1 << 25
_TOKENIZED = {}  # (id(tokenizer), bos, path, size, mtime_ns, index) -> (weakref(tokenizer), rows, lengths, weakref(flat))
_RECENT = OrderedDict()  # key -> flat: the strongly held entries, the least recently used first
_TOKENIZED_LOCK = threading.Lock()

# Producer threads -> their stop events, from their start until a join has seen them end. They are
# daemon threads, so that a dropped or unfinished loader never keeps the process alive; but CPython
# before 3.14 ends a daemon thread still running at finalisation with pthread_exit when it next
# takes the GIL, and unwinding out of a C++ frame that way calls std::terminate: exit 134,
# "terminate called without an active exception", after the checkpoint was saved. pyarrow's
# ParquetReader dealloc is such a frame (it drops the GIL while the C++ reader is destroyed; gdb on
# a core of the abort), and so is every torch op. Hence:
# - the exit hook stops and joins every producer, and only a join ends a registration. The earlier
#   version let a thread take itself off the list in its own `finally`, with its teardown still
#   ahead (Thread.run drops its arguments, and with them the ParquetFile, after the target
#   returns): the hook did not wait for that teardown (1 of 140 short base_train runs aborted);
# - a producer ends by joining its reader thread and freeing its shard (_DocStream.close), so all
#   of a loader's C++ work is over when its producer is joined;
# - no producer starts once the hook has taken its list.
# Loaders are not joined in __del__ (it may run on any thread, at any allocation): close() and
# `with` join at once, a dropped loader's producer stops by itself and is joined at exit.
_PRODUCERS = {}
_PRODUCERS_LOCK = threading.Lock()
_exiting = False  # set by the exit hook: no producer may start after it has taken its list


def _start_producer(thread, stop):
    """Register and start a producer thread, atomically with respect to the exit hook.
    Raises NanochatError once the interpreter is exiting."""
    with _PRODUCERS_LOCK:
        if _exiting:
            raise NanochatError("DataLoader: the interpreter is exiting, no new producer thread can start")
        for t in [t for t in _PRODUCERS if not t.is_alive()]:  # started and ended: nothing left to wait for
            del _PRODUCERS[t]
        thread.start()  # then registered: the hook can only join a started thread, and cannot run in between
        _PRODUCERS[thread] = stop


@atexit.register
def _stop_producers():
    global _exiting
    with _PRODUCERS_LOCK:
        _exiting = True
        producers = list(_PRODUCERS.items())
    for _, stop in producers:
        stop.set()
    for thread, _ in producers:
        thread.join()  # no timeout: between two checks of `stop` a producer reads at most a batch or a row group
    with _PRODUCERS_LOCK:
        for thread, _ in producers:
            _PRODUCERS.pop(thread, None)


class DataLoader:
    """
    Iterator of (inputs, targets), both int64 [B, T] on `device`, targets = inputs shifted by one
    (row[:, :-1] and row[:, 1:] of rows of T + 1 tokens); on CUDA copied from pinned memory with
    non_blocking=True.

    tokenizer: has .bos_token_id and .encode(list_of_str, prepend=id, num_threads=k) -> list of
        lists of ids (nanochat.tokenizer.Tokenizer).
    B, T: rows per batch, tokens per row (seq_len). split: "train" | "val" (nanochat.dataset).
    rank, world_size: this process's share of the data streams (DDP).
    streams: the number V of data streams the split is read as, a multiple of world_size; None for
        the default (module docstring). The same V gives the same rows whatever the world size.
    data_dir: the shard directory (nanochat.dataset.get_data_dir semantics).
    tokenizer_threads: threads tiktoken uses per row group. buffer_docs: documents the packer
        chooses from. keep_tails: keep the cropped-off end of a document (see the module docstring).
    num_epochs: None loops over the split forever (training, and evaluation that takes a fixed
        number of batches); k stops (StopIteration) after k passes.
    state: a state_dict() to resume from.

    Threads: two per loader, started by the first next(). close(), or leaving a `with DataLoader(...)
    as loader:` block, stops them and waits until they have ended; a dropped loader's threads stop
    by themselves, and whatever still runs at interpreter exit is stopped and joined then.

    Raises NanochatError on bad arguments, a missing / empty / corrupt shard directory, a split
    with fewer row groups than ranks or streams, a number of streams that is not a multiple of the
    world size, or a state that does not match this loader; errors found
    while streaming (a row group that cannot be decoded) are raised by __next__.
    """

    def __init__(self, tokenizer, B, T, split, device="cpu", rank=0, world_size=1, data_dir=None, tokenizer_threads=4, buffer_docs=1000, state=None, num_epochs=None, keep_tails=False, streams=None):
        if B < 1 or T < 1:
            raise NanochatError(f"DataLoader: need B >= 1 and T >= 1, got B={B} T={T}")
        if not 0 <= rank < world_size:
            raise NanochatError(f"DataLoader: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if buffer_docs < 1 or tokenizer_threads < 1 or (num_epochs is not None and num_epochs < 1):
            raise NanochatError(f"DataLoader: need buffer_docs, tokenizer_threads and num_epochs >= 1, got {buffer_docs}, {tokenizer_threads}, {num_epochs}")
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.tokenizer_threads, self.buffer_docs, self.keep_tails, self.num_epochs = tokenizer_threads, buffer_docs, keep_tails, num_epochs
        self.data_dir = get_data_dir(data_dir)

        # Every shard of the split is opened once here: bad shards fail now, with their name.
        self.row_groups = []  # global row group index -> (path, index within the shard)
        fingerprint = hashlib.sha256()
        for path in split_files(split, self.data_dir):
            meta = open_shard(path).metadata
            self.row_groups += [(path, i) for i in range(meta.num_row_groups)]
            fingerprint.update(f"{os.path.basename(path)}:{meta.num_row_groups}:{meta.num_rows};".encode())
        self.fingerprint = fingerprint.hexdigest()[:16]
        n = len(self.row_groups)
        if n < world_size:  # checked on every rank, so that all of them stop
            raise NanochatError(f"the {split} split in {self.data_dir} has {n} row groups, fewer than the {world_size} ranks: every rank needs at least one")
        if streams is None:
            streams = world_size * max(1, min(DEFAULT_STREAMS, n) // world_size)
        if streams < 1 or streams % world_size or streams > n:
            raise NanochatError(f"DataLoader: streams={streams} must be a multiple of world_size={world_size} and at most the {n} row groups of the {split} split in {self.data_dir}")
        self.streams = streams
        # the global row groups of each stream this rank owns, in read order
        self.stream_row_groups = [list(range(v, n, streams)) for v in range(rank, streams, world_size)]

        self._position = {"next": 0, "streams": [{"epoch": 0, "row_group": groups[0], "row": 0, "docs_read": 0, "buffer": []} for groups in self.stream_row_groups]}
        self._thread = self._queue = self._stop = None
        self._finished = False
        if state is not None:
            self.load_state_dict(state)

    # ---------------------------------------------------------------------------------- state

    def _header(self):
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_streams": self.streams,
            "seq_len": self.T,
            "buffer_docs": self.buffer_docs,
            "keep_tails": self.keep_tails,
            "shards": self.fingerprint,
        }

    def state_dict(self):
        """JSON-serialisable state after the last batch returned (see the module docstring)."""
        streams = [{k: p[k] for k in ("epoch", "row_group", "row", "docs_read")} | {"buffer": [list(b) for b in p["buffer"]]} for p in self._position["streams"]]
        return self._header() | {"next": self._position["next"], "streams": streams}

    def load_state_dict(self, state):
        """Continue from a state_dict(); the next batch is the one that followed it.
        Raises NanochatError if the state is malformed or was made by a different configuration."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise NanochatError("dataloader state: not a nanochat dataloader state")
        for key, value in self._header().items():
            if state.get(key) != value:
                what = "the shards of the split changed" if key == "shards" else f"{key} was {state.get(key)!r}, now {value!r}"
                raise NanochatError(f"dataloader state does not match this loader ({what}); exact resume needs the same data and settings")
        try:
            streams = []
            for p in state["streams"]:
                streams.append({k: int(p[k]) for k in ("epoch", "row_group", "row", "docs_read")})
                streams[-1]["buffer"] = [tuple(int(v) for v in b) for b in p["buffer"]]
            position = {"next": int(state["next"]), "streams": streams}
        except (KeyError, TypeError, ValueError):
            raise NanochatError("dataloader state: malformed position or buffer") from None
        if len(streams) != len(self.stream_row_groups) or not 0 <= position["next"] < len(streams):
            raise NanochatError(f"dataloader state: {len(streams)} stream positions (next {position['next']}), this rank owns {len(self.stream_row_groups)} streams")
        for p, groups in zip(streams, self.stream_row_groups):
            if any(len(b) != 4 for b in p["buffer"]):
                raise NanochatError("dataloader state: malformed buffer entry (expected [row group, row, start, read index])")
            if p["row_group"] not in groups or any(not 0 <= b[0] < len(self.row_groups) for b in p["buffer"]):
                raise NanochatError("dataloader state: row group out of range for this rank's streams")
        self.close()  # a running producer was reading from the old position
        self._position, self._finished = position, False

    # ---------------------------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is None:
            self._finished = True
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            self.close()
            raise item
        rows, self._position = item
        if self.device.type == "cuda":
            rows = rows.to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            rows = rows.to(self.device)
        # int32 over the bus (half the bytes), int64 on the device; slicing + cast makes each contiguous
        return rows[:, :-1].to(torch.int64), rows[:, 1:].to(torch.int64)

    def _start(self):
        streams = [_DocStream(self, groups, p) for groups, p in zip(self.stream_row_groups, self._position["streams"])]
        packers = [_Packer(stream, self.T + 1, self.tokenizer.bos_token_id, self.buffer_docs, self.keep_tails) for stream in streams]
        self._queue, self._stop = queue.Queue(maxsize=PREFETCH_BATCHES), threading.Event()
        pin = self.device.type == "cuda"
        # The thread gets no reference to self, so a dropped loader is collected and stops it.
        self._thread = threading.Thread(target=_produce, args=(packers, self._position, self.B, pin, self._queue, self._stop), daemon=True, name=f"dataloader-{self.split}-{self.rank}")
        _start_producer(self._thread, self._stop)

    def close(self):
        """Stop the background threads and wait for them to end, their files closed; a no-op if none
        runs. A later next() restarts from the current state."""
        thread, stop = self._thread, self._stop
        self._thread = self._queue = self._stop = None
        if stop is not None:
            stop.set()
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        # only signalled here: the exit hook (or the producer itself) finishes the job, see _PRODUCERS
        if getattr(self, "_stop", None) is not None:
            self._stop.set()


def _put(q, item, stop):
    """Put unless the loader was closed; True if the item was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(packers, position, B, pin, out, stop):
    """Background thread: pack batches of B rows into int32 [B, T + 1] (pinned) tensors, one batch
    from each stream's packer in turn, and queue (rows, position after them); None at the end of a
    finite pass (of the stream next in turn), or the exception raised."""
    try:
        for packer, p in zip(packers, position["streams"]):
            packer.restore(p, stop)
        positions, k = list(position["streams"]), position["next"]
        while not stop.is_set():
            packer = packers[k]
            rows = torch.empty((B, packer.cap), dtype=torch.int32, pin_memory=pin)
            array = rows.numpy()
            for i in range(B):
                if not packer.fill_row(array[i]):
                    _put(out, None, stop)
                    return
            positions[k], k = packer.position(), (k + 1) % len(packers)
            if not _put(out, (rows, {"next": k, "streams": list(positions)}), stop):
                return
    except BaseException as e:  # handed to the training loop, which raises it
        _put(out, e, stop)
    finally:
        for packer in packers:
            packer.stream.close()  # its worker joined and its ParquetFile freed here, while a join still waits for us


class _DocStream:
    """
    One data stream's documents in read order, each as (global row group, row, tokens): tokens an int32
    array that starts with <|bos|>. Row groups are read and tokenised PREFETCH_ROW_GROUPS ahead in
    a worker thread (tiktoken releases the GIL while it encodes).
    """

    def __init__(self, loader, my_row_groups, position):
        self.row_groups, self.my_row_groups = loader.row_groups, my_row_groups
        self.tokenizer, self.threads, self.num_epochs = loader.tokenizer, loader.tokenizer_threads, loader.num_epochs
        self.bos, self.rank = loader.tokenizer.bos_token_id, loader.rank
        self._empty_run = 0  # row groups in a row that held no document
        self.epoch, self.k, self.row = position["epoch"], my_row_groups.index(position["row_group"]), position["row"]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataloader-tokenize")
        self._ahead = deque()  # futures of the next row groups, in order
        self._next_k = (self.epoch, self.k)  # the next (epoch, k) to submit
        self._current = None  # (epoch, k, rows, docs) of the row group being consumed
        self._shard = (None, None)  # (path, ParquetFile) of the last shard read, reused

    def close(self):
        """Cancel the reads not started, wait for the one running, free the open shard. Called by the
        producer as it ends: nothing of the stream is then left to run or to free after it."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        self._current, self._shard = None, (None, None)

    def position(self):
        """(epoch, global row group, row) of the next document."""
        return self.epoch, self.my_row_groups[self.k], self.row

    def _done(self, epoch):
        return self.num_epochs is not None and epoch >= self.num_epochs

    def _submit_ahead(self):
        while len(self._ahead) < PREFETCH_ROW_GROUPS and not self._done(self._next_k[0]):
            epoch, k = self._next_k
            self._ahead.append((epoch, k, self._pool.submit(self.read, self.my_row_groups[k])))
            self._next_k = (epoch + 1, 0) if k + 1 == len(self.my_row_groups) else (epoch, k + 1)

    def read(self, g, rows=None):
        """Tokenise row group g (only the given rows, if any): (rows, docs), empty documents skipped.
        Served from the process's tokenised row groups when it holds g (see RECENT_TOKENS)."""
        path, index = self.row_groups[g]
        try:
            st = os.stat(path)
            key = (id(self.tokenizer), self.bos, path, st.st_size, st.st_mtime_ns, index)
        except OSError:
            key = None  # open_shard below reports it
        entry = _tokenized_get(key, self.tokenizer)
        if entry is None:
            if self._shard[0] != path:
                self._shard = (path, open_shard(path))
            texts = read_row_group(self._shard[1], path, index)
            keep = [r for r in range(len(texts)) if texts[r]]
            ids = self.tokenizer.encode([texts[r] for r in keep], prepend=self.bos, num_threads=self.threads)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
            entry = (keep, lengths.tolist(), flat)
            _tokenized_put(key, self.tokenizer, entry)
        keep, lengths, flat = entry
        ends = itertools.accumulate(lengths)
        docs = [flat[e - n : e] for e, n in zip(ends, lengths)]
        if rows is None:
            return keep, docs
        doc_of = dict(zip(keep, docs))
        wanted = [r for r in rows if r in doc_of]
        return wanted, [doc_of[r] for r in wanted]

    def next_doc(self):
        """The next (global row group, row, tokens), or None at the end of a finite pass."""
        while True:
            if self._done(self.epoch):
                return None
            if self._current is None or self._current[:2] != (self.epoch, self.k):
                self._submit_ahead()
                epoch, k, future = self._ahead.popleft()
                assert (epoch, k) == (self.epoch, self.k)
                self._submit_ahead()  # keep the worker busy while this row group is packed
                rows, docs = future.result()
                self._current = (epoch, k, rows, docs)
            _, k, rows, docs = self._current
            i = bisect.bisect_left(rows, self.row)
            if i < len(rows):
                self.row = rows[i] + 1
                self._empty_run = 0
                return self.my_row_groups[k], rows[i], docs[i]
            self._empty_run += 1  # a whole pass without a document would loop forever
            if self._empty_run > len(self.my_row_groups):
                raise NanochatError(f"the row groups of a data stream of rank {self.rank} in {os.path.dirname(self.row_groups[self.my_row_groups[0]][0])} hold no non-empty document")
            self.row = 0  # this row group is used up: on to the next one
            self.epoch, self.k = (self.epoch + 1, 0) if self.k + 1 == len(self.my_row_groups) else (self.epoch, self.k + 1)


def _tokenized_get(key, tokenizer):
    """(rows, lengths, flat) of a tokenised row group the process still holds, or None."""
    if key is None:
        return None
    with _TOKENIZED_LOCK:
        entry = _TOKENIZED.get(key)
        if entry is None:
            return None
        tok_ref, keep, lengths, flat_ref = entry
        flat = flat_ref()
        if flat is None or tok_ref() is not tokenizer:  # freed, or another tokenizer at a reused id
            del _TOKENIZED[key]
            _RECENT.pop(key, None)
            return None
        if key in _RECENT:
            _RECENT.move_to_end(key)
        return keep, lengths, flat


def _tokenized_put(key, tokenizer, entry):
    """Remember a tokenised row group (see RECENT_TOKENS); a tokenizer without weak references is not cached."""
    keep, lengths, flat = entry
    if key is None:
        return
    try:
        tok_ref = weakref.ref(tokenizer)
    except TypeError:
        return
    with _TOKENIZED_LOCK:
        for k in [k for k, e in _TOKENIZED.items() if e[3]() is None or e[0]() is None]:  # freed entries
            del _TOKENIZED[k]
            _RECENT.pop(k, None)
        _TOKENIZED[key] = (tok_ref, keep, lengths, weakref.ref(flat))
        _RECENT[key] = flat
        _RECENT.move_to_end(key)
        total = sum(len(f) for f in _RECENT.values())
        while total > RECENT_TOKENS and len(_RECENT) > 1:
            _, old = _RECENT.popitem(last=False)
            total -= len(old)


class _Packer:
    """
    Best-fit packing of buffered documents into rows (the algorithm in the module docstring).

    A piece is the not-yet-used part of a document: (doc, start) with doc the document's int32
    tokens (doc[0] is <|bos|>); start == 0 is the whole document, start > 0 a kept tail, written
    as <|bos|> + doc[start:]. Pieces are kept in a list sorted by (length, read index) for
    O(log n) best-fit look-ups and in a heap of read indices for the age check.
    """

    def __init__(self, stream, cap, bos, buffer_docs, keep_tails):
        self.stream, self.cap, self.bos, self.buffer_docs, self.keep_tails = stream, cap, bos, buffer_docs, keep_tails
        self.max_age = MAX_AGE_FACTOR * buffer_docs
        self.keys = []  # sorted (length, seq)
        self.pieces = {}  # seq -> [doc, start, row group, row]
        self.ages = []  # heap of seq (lazily deleted)
        self.docs_read = 0

    def restore(self, position, stop=None):
        """Rebuild the buffer of a saved position by re-reading and re-tokenising its documents;
        returns early, the buffer incomplete, once `stop` (a threading.Event) is set."""
        self.docs_read = position["docs_read"]
        by_row_group = {}
        for g, row, start, seq in position["buffer"]:
            by_row_group.setdefault(g, []).append((row, start, seq))
        for g, entries in by_row_group.items():
            if stop is not None and stop.is_set():
                return
            rows, docs = self.stream.read(g, sorted(row for row, _, _ in entries))
            doc_of = dict(zip(rows, docs))
            for row, start, seq in entries:
                if row not in doc_of or start >= len(doc_of[row]):
                    raise NanochatError(f"dataloader state: document (row group {g}, row {row}) is not in the data; the shards changed")
                self._add(seq, doc_of[row], start, g, row)

    def position(self):
        epoch, g, row = self.stream.position()
        buffer = sorted((p[2], p[3], p[1], seq) for seq, p in self.pieces.items())
        return {"epoch": epoch, "row_group": g, "row": row, "docs_read": self.docs_read, "buffer": buffer}

    def _length(self, doc, start):
        return len(doc) if start == 0 else len(doc) - start + 1

    def _add(self, seq, doc, start, g, row):
        self.pieces[seq] = [doc, start, g, row]
        bisect.insort(self.keys, (self._length(doc, start), seq))
        heapq.heappush(self.ages, seq)

    def _refill(self):
        while len(self.keys) < self.buffer_docs:
            item = self.stream.next_doc()
            if item is None:
                return
            g, row, doc = item
            self._add(self.docs_read, doc, 0, g, row)
            self.docs_read += 1

    def _oldest(self):
        while self.ages[0] not in self.pieces:
            heapq.heappop(self.ages)
        return self.ages[0]

    def _place(self, i, out, pos, room):
        """Write buffered piece keys[i] at out[pos:], cropped to room tokens; returns tokens written."""
        length, seq = self.keys.pop(i)
        doc, start, g, row = self.pieces.pop(seq)
        n = min(length, room)
        if start == 0:
            out[pos : pos + n] = doc[:n]
            tail = n
        else:
            out[pos] = self.bos
            out[pos + 1 : pos + n] = doc[start : start + n - 1]
            tail = start + n - 1
        if n < length and self.keep_tails:
            self._add(seq, doc, tail, g, row)  # same read index: its age keeps counting
        return n

    def fill_row(self, out):
        """Fill out (int32 [cap]) with the next row; False at the end of a finite pass."""
        pos = 0
        while pos < self.cap:
            self._refill()
            if not self.keys:
                return False
            room = self.cap - pos
            if pos == 0 and self.docs_read - self._oldest() > self.max_age:
                seq = self._oldest()
                i = bisect.bisect_left(self.keys, (self._length(*self.pieces[seq][:2]), seq))
            else:
                # the longest piece that fits; among equal lengths the one read first
                j = bisect.bisect_right(self.keys, (room, float("inf")))
                i = bisect.bisect_left(self.keys, (self.keys[j - 1][0], -1)) if j else 0  # j == 0: none fits, crop the shortest
            pos += self._place(i, out, pos, room)
        return True
