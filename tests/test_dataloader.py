import gc
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from helpers.scripts_util import SHARED_DATA
from nanochat.common import NanochatError
from nanochat.dataloader import MAX_AGE_FACTOR, DataLoader
from nanochat.dataset import shard_name

BOS = 256
SHARED_PRETRAIN = os.path.join(SHARED_DATA, "pretrain")


class ByteTokenizer:
    """The tokenizer interface the loader uses, over a byte-level tiktoken encoding: one token per
    UTF-8 byte, <|bos|> = 256. Independent of nanochat/tokenizer.py on purpose."""

    def __init__(self):
        self.enc = tiktoken.Encoding(name="test-bytes", pat_str=r"""\S+|\s+""", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|bos|>": BOS})
        self.bos_token_id = BOS

    def encode(self, texts, prepend=None, num_threads=8):
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[prepend] + x for x in ids] if prepend is not None else ids


TOK = ByteTokenizer()
ROW_GROUP_SIZE = 4


def make_corpus(directory, docs_per_shard=(30, 30, 30), seed=0, max_len=70):
    """Shards of documents "<shard.row>" + random letters (lengths 0..max_len), every 7th one empty."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for s, n in enumerate(docs_per_shard):
        texts = ["" if r % 7 == 6 else f"<{s}.{r}>" + "".join(rng.choices("abcdefghij ", k=rng.randint(0, max_len))) for r in range(n)]
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), os.path.join(directory, shard_name(s)), row_group_size=ROW_GROUP_SIZE)
    return str(directory)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data")


def rank_row_groups(data_dir, split, rank, world_size):
    """[(global row group, [texts])] of one rank, in the order the loader reads them (one epoch)."""
    paths = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    paths = paths[-1:] if split == "val" else paths[:-1]
    groups = []
    for path in paths:
        pf = pq.ParquetFile(path)
        groups += [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.metadata.num_row_groups)]
    return [(g, groups[g]) for g in range(rank, len(groups), world_size)]


def doc_stream(data_dir, split, rank, world_size):
    """The rank's documents as token lists, epoch after epoch, forever."""
    groups = rank_row_groups(data_dir, split, rank, world_size)
    for _ in itertools.count():
        for _, texts in groups:
            for text in texts:
                if text:
                    yield [BOS] + list(text.encode())


def reference_rows(docs, cap, buffer_docs, keep_tails, n_rows):
    """The packing algorithm of nanochat/dataloader.py's docstring, written plainly with list scans."""
    max_age = MAX_AGE_FACTOR * buffer_docs
    buffer, read, rows, stats = [], 0, [], Counter()  # buffer: [tokens, read index]
    while len(rows) < n_rows:
        row = []
        while len(row) < cap:
            while len(buffer) < buffer_docs:
                buffer.append([next(docs), read])
                read += 1
            room = cap - len(row)
            oldest = min(buffer, key=lambda p: p[1])
            fits = [p for p in buffer if len(p[0]) <= room]
            if not row and read - oldest[1] > max_age:
                piece = oldest
                stats["aged"] += 1
            elif fits:
                piece = max(fits, key=lambda p: (len(p[0]), -p[1]))
                stats["ties"] += sum(len(p[0]) == len(piece[0]) and p[0] != piece[0] for p in fits) > 0
            else:
                piece = min(buffer, key=lambda p: (len(p[0]), p[1]))
            buffer.remove(piece)
            row += piece[0][:room]
            if len(piece[0]) > room:
                stats["cropped"] += 1
                if keep_tails:
                    buffer.append([[BOS] + piece[0][room:], piece[1]])
        rows.append(row)
    return rows, stats


def loader_rows(loader, n_batches):
    """The loader's next n_batches as rows of T + 1 tokens (list of lists)."""
    rows = []
    for _ in range(n_batches):
        x, y = next(loader)
        rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    return rows


def pieces(row):
    """Split a row at each <|bos|>: the byte strings of the documents (or parts) in it."""
    out, cur = [], None
    for t in row:
        if t == BOS:
            if cur is not None:
                out.append(bytes(cur))
            cur = []
        else:
            cur.append(t)
    return out + [bytes(cur)]


# ------------------------------------------------------------------------------------------------
# what the batches look like


def test_batches_are_shifted_rows_starting_with_bos(corpus):
    loader = DataLoader(TOK, 3, 16, "train", data_dir=corpus, buffer_docs=8, tokenizer_threads=2)
    for _ in range(6):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == BOS).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
    loader.close()


@pytest.mark.parametrize("keep_tails", [False, True])
@pytest.mark.parametrize("max_len", [12, 70])
def test_packing_matches_reference(tmp_path, keep_tails, max_len):
    # rank 1 of 2, several epochs of the train split. Documents of 7..19 tokens: many length ties
    # (the order among them matters); of 7..77 tokens: most longer than a row (crops, and with the
    # small buffer the age rule fires).
    corpus = make_corpus(tmp_path / "data", docs_per_shard=(60, 60, 10), max_len=max_len)
    B, T, buffer_docs, n_batches = 2, 24, 6, 40
    loader = DataLoader(TOK, B, T, "train", rank=1, world_size=2, data_dir=corpus, buffer_docs=buffer_docs, keep_tails=keep_tails, streams=2)
    got = loader_rows(loader, n_batches)
    want, stats = reference_rows(doc_stream(corpus, "train", 1, 2), T + 1, buffer_docs, keep_tails, B * n_batches)
    assert got == want
    assert stats["cropped"] > 0 and loader.state_dict()["streams"][0]["epoch"] >= 1
    if max_len == 12:
        assert stats["ties"] > 0
    else:
        assert stats["aged"] > 0
    loader.close()


def test_ranks_read_disjoint_row_groups(corpus):
    B, T = 2, 24
    seen = []
    for rank in range(2):
        # 30 rows per shard = 8 row groups: global row group g is rows 4 * (g % 8) .. of shard g // 8
        own = {(g // 8, (g % 8) * ROW_GROUP_SIZE + i): text.encode() for g, texts in rank_row_groups(corpus, "train", rank, 2) for i, text in enumerate(texts) if text}
        loader = DataLoader(TOK, B, T, "train", rank=rank, world_size=2, data_dir=corpus, buffer_docs=6, num_epochs=1, streams=2)
        markers, n_cut = set(), 0
        for x, _ in loader:
            for row in x.tolist():
                for piece in pieces(row):
                    assert any(doc.startswith(piece) for doc in own.values()), f"not the start of one of this rank's documents: {piece!r}"
                    m = re.match(rb"<(\d+)\.(\d+)>", piece)
                    if m:
                        markers.add((int(m.group(1)), int(m.group(2))))
                    else:
                        n_cut += 1  # cropped inside its "<shard.row>" marker
        assert markers <= own.keys()
        assert len(own.keys() - markers) <= n_cut + B  # the rest fell in the dropped last partial batch
        seen.append(markers)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("streams", [None, 4])
def test_rows_do_not_depend_on_the_world_size(corpus, streams):
    # Micro-batch j of the job is batch j // V of stream j % V: rank r's local micro-batch i is
    # the job's micro-batch W * i + r, for every world size W that divides V.
    B, T, n = 2, 20, 16
    one = DataLoader(TOK, B, T, "train", data_dir=corpus, buffer_docs=6, streams=streams)
    want = [next(one) for _ in range(n)]
    assert one.streams == (streams or 8) and len({x[0, :8].tolist().__repr__() for x, _ in want}) > 1
    one.close()
    for world_size in (2, 4):
        for rank in range(world_size):
            loader = DataLoader(TOK, B, T, "train", rank=rank, world_size=world_size, data_dir=corpus, buffer_docs=6, streams=streams)
            for i in range(n // world_size):
                x, y = next(loader)
                assert torch.equal(x, want[world_size * i + rank][0]) and torch.equal(y, want[world_size * i + rank][1]), (world_size, rank, i)
            loader.close()
    # each stream reads only its own row groups: stream v of 4 the global row groups v, v + 4, ...
    if streams == 4:
        x, _ = want[1]
        first = {(int(m.group(1)), int(m.group(2))) for m in re.finditer(rb"<(\d+)\.(\d+)>", bytes(t for t in x.flatten().tolist() if t < 256))}
        assert first and all(((s * 8 + r // ROW_GROUP_SIZE) % 4) == 1 for s, r in first)


def test_one_pass_with_kept_tails_delivers_every_token(corpus):
    B, T = 2, 16
    loader = DataLoader(TOK, B, T, "val", data_dir=corpus, buffer_docs=5, num_epochs=1, keep_tails=True, streams=1)
    rows = []
    for x, y in loader:
        rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    with pytest.raises(StopIteration):
        next(loader)
    docs = [text.encode() for _, texts in rank_row_groups(corpus, "val", 0, 1) for text in texts if text]
    delivered = sum(len(p) for row in rows for p in pieces(row))
    assert sum(map(len, docs)) - B * (T + 1) < delivered <= sum(map(len, docs))
    assert all(any(p in d for d in docs) for row in rows for p in pieces(row))


# ------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("keep_tails", [False, True])
@pytest.mark.parametrize("streams", [2, 4])  # rank 0 of 2 owns one stream, or two taken in turn
def test_resume_gives_the_same_batches(corpus, keep_tails, streams):
    kwargs = dict(data_dir=corpus, buffer_docs=6, keep_tails=keep_tails, rank=0, world_size=2, streams=streams)
    loader = DataLoader(TOK, 2, 20, "train", **kwargs)
    batches, states = [], [loader.state_dict()]
    for _ in range(30):
        batches.append(next(loader))
        states.append(json.loads(json.dumps(loader.state_dict())))
    loader.close()
    assert states[-1]["streams"][0]["epoch"] >= 1 and any(s["streams"][0]["buffer"] for s in states)
    for k in (0, 1, 7, 18, 29):
        resumed = DataLoader(TOK, 2, 20, "train", state=states[k], **kwargs)
        for x, y in batches[k:]:
            rx, ry = next(resumed)
            assert torch.equal(rx, x) and torch.equal(ry, y), f"resumed at batch {k} diverged"
        resumed.close()


def test_resume_with_another_batch_size(corpus):
    # one stream: its rows do not depend on B (with several, B sets how they interleave)
    a = DataLoader(TOK, 4, 20, "train", data_dir=corpus, buffer_docs=6, streams=1)
    first = loader_rows(a, 2)
    state = a.state_dict()
    rest = loader_rows(a, 4)
    b = DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=state, streams=1)
    assert loader_rows(b, 8) == rest
    assert first != rest[:8]
    a.close()
    b.close()


def test_load_state_dict_rewinds_a_running_loader(corpus):
    loader = DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6)
    loader_rows(loader, 3)
    state = loader.state_dict()
    after = loader_rows(loader, 5)
    loader.load_state_dict(state)
    assert loader_rows(loader, 5) == after
    loader.close()


def test_state_mismatch_is_refused(corpus, tmp_path):
    loader = DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6)
    next(loader)
    state = loader.state_dict()
    loader.close()
    for kwargs, message in [(dict(T=21), "seq_len was 20, now 21"), (dict(world_size=2), "world_size was 1, now 2"), (dict(keep_tails=True), "keep_tails"), (dict(buffer_docs=7), "buffer_docs")]:
        args = dict(B=2, T=20, buffer_docs=6) | kwargs
        with pytest.raises(NanochatError, match=message):
            DataLoader(TOK, args.pop("B"), args.pop("T"), "train", data_dir=corpus, state=state, **args)
    with pytest.raises(NanochatError, match="not a nanochat dataloader state"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state={"epoch": 0})
    def edit(**kwargs):  # the state with its first stream's position changed
        return state | {"streams": [state["streams"][0] | kwargs] + state["streams"][1:]}

    with pytest.raises(NanochatError, match="malformed"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=edit(buffer=[["x"]]))
    with pytest.raises(NanochatError, match="malformed buffer entry"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=edit(buffer=[[]]))
    with pytest.raises(NanochatError, match="out of range"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=edit(row_group=99))
    with pytest.raises(NanochatError, match="num_streams was 8, now 4"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=state, streams=4)
    with pytest.raises(NanochatError, match="7 stream positions"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=state | {"streams": state["streams"][1:]})
    with pytest.raises(NanochatError, match="version was 1, now 2"):  # a state of the one-stream loader
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=state | {"version": 1})
    # one more shard: the old val shard becomes training data, so the stream cannot be the same
    make_corpus(corpus, docs_per_shard=(30, 30, 30, 5))
    with pytest.raises(NanochatError, match="shards of the split changed"):
        DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6, state=state)


# ------------------------------------------------------------------------------------------------
# bad input and clean-up


def test_bad_arguments_and_data(corpus, tmp_path):
    with pytest.raises(NanochatError, match="B >= 1"):
        DataLoader(TOK, 0, 8, "train", data_dir=corpus)
    with pytest.raises(NanochatError, match="rank=2 world_size=2"):
        DataLoader(TOK, 1, 8, "train", rank=2, world_size=2, data_dir=corpus)
    with pytest.raises(NanochatError, match="unknown split"):
        DataLoader(TOK, 1, 8, "test", data_dir=corpus)
    with pytest.raises(NanochatError, match="8 row groups, fewer than the 9 ranks"):
        DataLoader(TOK, 1, 8, "val", rank=0, world_size=9, data_dir=corpus)
    with pytest.raises(NanochatError, match="streams=3 must be a multiple of world_size=2"):
        DataLoader(TOK, 1, 8, "val", rank=0, world_size=2, data_dir=corpus, streams=3)
    with pytest.raises(NanochatError, match="streams=10 .* at most the 8 row groups"):
        DataLoader(TOK, 1, 8, "val", data_dir=corpus, streams=10)
    with pytest.raises(NanochatError, match="data directory not found"):
        DataLoader(TOK, 1, 8, "train", data_dir=str(tmp_path / "missing"))
    bad = os.path.join(corpus, shard_name(1))
    with open(bad, "wb") as f:
        f.write(b"PAR1 not really")
    with pytest.raises(NanochatError, match=f"corrupt parquet shard {bad}"):
        DataLoader(TOK, 1, 8, "train", data_dir=corpus)


def test_no_documents_is_an_error_not_a_hang(tmp_path):
    for s in range(2):
        pq.write_table(pa.table({"text": pa.array(["", None, ""], type=pa.string())}), tmp_path / shard_name(s), row_group_size=2)
    loader = DataLoader(TOK, 1, 8, "train", data_dir=str(tmp_path))
    with pytest.raises(NanochatError, match="hold no non-empty document"):
        next(loader)


def test_corrupt_row_group_is_reported_while_streaming(corpus):
    path = os.path.join(corpus, shard_name(0))
    start = pq.read_metadata(path).row_group(3).column(0).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    open(path, "wb").write(bytes(data))
    loader = DataLoader(TOK, 2, 16, "train", data_dir=corpus, buffer_docs=4)  # the footer is fine
    with pytest.raises(NanochatError, match=f"corrupt parquet shard {path} \\(row group 3\\)"):
        for _ in range(100):
            next(loader)


def test_errors_in_the_background_reach_the_caller(corpus):
    class Broken(ByteTokenizer):
        def encode(self, texts, prepend=None, num_threads=8):
            raise ValueError("tokenizer exploded")

    loader = DataLoader(Broken(), 2, 8, "train", data_dir=corpus)
    with pytest.raises(ValueError, match="tokenizer exploded"):
        next(loader)
    with pytest.raises(StopIteration):
        next(loader)


def test_dropped_loader_stops_its_thread(corpus):
    loader = DataLoader(TOK, 2, 8, "val", rank=0, world_size=3, data_dir=corpus, buffer_docs=4)
    next(loader)
    name = loader._thread.name
    del loader
    gc.collect()
    deadline = time.time() + 10
    while any(t.name == name for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(t.name == name for t in threading.enumerate())


# An atexit hook registered before nanochat.dataloader is imported runs after the loader's own
# (hooks run last-in first-out): it sees which producer threads are still alive at finalisation.
EXIT_PROBE = """
import atexit, sys, threading
atexit.register(lambda: print("alive at exit:", sorted(t.name for t in threading.enumerate() if t.name.startswith("dataloader-"))))
sys.path.insert(0, sys.argv[2])
from test_dataloader import TOK
from nanochat.dataloader import DataLoader
loaders = [DataLoader(TOK, 2, 8, split, data_dir=sys.argv[1], buffer_docs=4) for split in ("train", "val")]
for loader in loaders:
    next(loader)  # each producer is now busy filling its queue ahead
"""


def test_producer_threads_are_joined_before_exit(corpus):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, corpus, os.path.dirname(os.path.abspath(__file__))], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "alive at exit: []" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------
# real data and devices


@pytest.mark.skipif(not os.path.isdir(SHARED_PRETRAIN), reason="needs ../shared/data/pretrain")
def test_real_shards():
    # A small buffer reads only the first row groups of the validation shard.
    B, T = 2, 256
    loader = DataLoader(TOK, B, T, "val", data_dir=SHARED_PRETRAIN, buffer_docs=32, tokenizer_threads=2, streams=1)
    rows = loader_rows(loader, 4)
    state = loader.state_dict()["streams"][0]
    loader.close()
    assert state["row_group"] in (0, 1) and state["epoch"] == 0
    val = pq.ParquetFile(os.path.join(SHARED_PRETRAIN, sorted(f for f in os.listdir(SHARED_PRETRAIN) if f.endswith(".parquet"))[-1]))
    docs = [t.encode() for g in range(2) for t in val.read_row_group(g).column("text").to_pylist() if t]
    for row in rows:
        assert row[0] == BOS and len(row) == T + 1
        for p in pieces(row):
            assert any(d.startswith(p) for d in docs)  # every piece is a document's beginning


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(corpus):
    cpu = DataLoader(TOK, 2, 20, "train", data_dir=corpus, buffer_docs=6)
    gpu = DataLoader(TOK, 2, 20, "train", device="cuda", data_dir=corpus, buffer_docs=6)
    for _ in range(5):
        (cx, cy), (gx, gy) = next(cpu), next(gpu)
        assert gx.device.type == "cuda" and gx.dtype == torch.int64
        assert torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)
    cpu.close()
    gpu.close()


def test_tokenised_row_groups_are_shared_within_the_process(corpus):
    """A row group is tokenised once, however many epochs a stream's buffer spans and however many
    loaders of the same tokenizer read it, with the same batches as a tokenizer that reads it anew;
    a rewritten shard is tokenised again."""

    class Counting(ByteTokenizer):
        def __init__(self):
            super().__init__()
            self.docs = 0

        def encode(self, texts, prepend=None, num_threads=8):
            self.docs += len(texts)
            return super().encode(texts, prepend, num_threads)

    def batches(tok):  # val: 8 row groups, 26 non-empty documents; 8 streams, so each buffer spans many epochs
        with DataLoader(tok, 2, 16, "val", data_dir=corpus, buffer_docs=64) as loader:
            return [x.tolist() for x, _ in itertools.islice(loader, 20)]

    tok = Counting()
    first = batches(tok)
    assert tok.docs == 26
    assert batches(tok) == first and tok.docs == 26  # a second loader: nothing tokenised again
    other = Counting()
    assert batches(other) == first and other.docs == 26
    make_corpus(corpus, seed=1)  # the same file names, other documents
    changed = batches(tok)
    assert changed != first and tok.docs > 26
