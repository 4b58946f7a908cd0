"""
The exit abort of base_train: exit 134, "terminate called without an active exception", after the
checkpoint was saved. A data-loader producer thread (a daemon thread) was still freeing its
pyarrow ParquetFile when the interpreter finalised: the ParquetReader dealloc drops the GIL, and a
daemon thread that takes the GIL back during finalisation is ended by pthread_exit, whose unwinding
out of a C++ frame calls std::terminate (CPython < 3.14). The exit hook had not waited for it: the
thread took itself off the hook's list before its teardown (Thread.run dropping its arguments).

Here the free of the shard is made slow, so that the race goes the bad way every time, not in
about 1 run of 100.
"""

import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import nanochat.dataloader as dataloader
from nanochat.common import NanochatError
from nanochat.dataloader import DataLoader
from test_dataloader import TOK, make_corpus

TESTS = os.path.dirname(os.path.abspath(__file__))


class Frees:
    """What happened to the SlowToFree shards: `started` is set when a free begins, `done` counts
    the frees finished."""

    def __init__(self, free):
        self.free, self.started, self.done = free, threading.Event(), 0


class SlowToFree:
    """A ParquetFile (attributes forwarded) whose last reference, dropped off the main thread, runs
    frees.free() first: a stand-in for pyarrow's ParquetReader dealloc, which runs without the GIL."""

    def __init__(self, pf, frees):
        self._pf, self._frees = pf, frees

    def __getattr__(self, name):
        return getattr(self._pf, name)

    def __del__(self):
        if threading.current_thread() is not threading.main_thread():
            self._frees.started.set()
            self._frees.free()
            self._frees.done += 1


def slow_shards(monkeypatch, free):
    """Make the loader open its shards as SlowToFree; returns their Frees."""
    frees, open_shard = Frees(free), dataloader.open_shard
    monkeypatch.setattr(dataloader, "open_shard", lambda path: SlowToFree(open_shard(path), frees))
    return frees


def loader_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("dataloader")]


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data")  # "val" is one shard, read as one stream: one open shard, never swapped


# dropped at once, a read ahead may still run and free the shard; a moment later the producer does
@pytest.mark.parametrize("settle", [0.0, 0.5], ids=["reads-in-flight", "queue-full"])
def test_exit_hook_waits_until_a_dropped_loaders_threads_are_gone(corpus, monkeypatch, settle):
    # base_train's pattern: a loader read partly, then dropped (evaluation, the unigram count)
    frees = slow_shards(monkeypatch, free=lambda: time.sleep(0.5))
    monkeypatch.setattr(dataloader, "_exiting", False, raising=False)  # the hook below is not the real exit
    loader = DataLoader(TOK, 2, 8, "val", data_dir=corpus, buffer_docs=4, streams=1)
    next(loader)
    time.sleep(settle)
    del loader
    gc.collect()
    assert frees.started.wait(10), "the dropped loader's producer did not stop"
    dataloader._stop_producers()  # the atexit hook; after it the interpreter finalises
    assert frees.done == 1, "the exit hook returned while a loader thread was still freeing its shard"
    assert loader_threads() == []


def test_close_and_with_wait_for_the_threads(corpus, monkeypatch):
    frees = slow_shards(monkeypatch, free=lambda: time.sleep(0.2))
    with DataLoader(TOK, 2, 8, "val", data_dir=corpus, buffer_docs=4, streams=1) as loader:
        x0, _ = next(loader)
        state = loader.state_dict()
    assert frees.done == 1 and loader_threads() == []
    loader.close()  # closing again is a no-op
    x1, _ = next(loader)  # a closed loader restarts from where it stopped
    loader.close()
    assert frees.done == 2 and loader_threads() == []
    assert loader.state_dict() != state and not torch.equal(x0, x1)


def test_no_producer_starts_once_the_exit_hook_ran(corpus, monkeypatch):
    monkeypatch.setattr(dataloader, "_exiting", False, raising=False)
    dataloader._stop_producers()
    loader = DataLoader(TOK, 2, 8, "val", data_dir=corpus, buffer_docs=4, streams=1)
    with pytest.raises(NanochatError, match="exiting"):
        next(loader)
    assert loader_threads() == []


# The real abort, in a child process. The shard's free runs torch ops (pybind11 drops the GIL around
# each, as pyarrow's dealloc does) for 0.5 s; the main thread then lingers 2 s in finalisation (a
# __main__ global freed after it has begun), the window in which such a thread, not waited for,
# takes the GIL back and aborts the process.
CHILD = """
import sys, threading, time
sys.path.insert(0, sys.argv[2])
import torch
from test_exit_abort import Frees, SlowToFree
import nanochat.dataloader as dataloader
from test_dataloader import TOK

def free():
    a, deadline = torch.randn(256, 256), time.time() + 0.5
    while time.time() < deadline:
        a @ a

frees, open_shard = Frees(free), dataloader.open_shard
dataloader.open_shard = lambda path: SlowToFree(open_shard(path), frees)

class Linger:
    def __del__(self, sleep=time.sleep):  # bound now: module globals may be gone when it runs
        sleep(2)

linger = Linger()
loader = dataloader.DataLoader(TOK, 2, 8, "val", data_dir=sys.argv[1], buffer_docs=4, streams=1)
next(loader)
time.sleep(0.5)  # the producer fills its queue and the reads ahead finish: it alone holds the shard
del loader
assert frees.started.wait(10)
print("exiting", flush=True)
"""


@pytest.mark.slow
def test_base_train_exit_pattern_does_not_abort(corpus):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, corpus, TESTS], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "exiting" in out.stdout and "terminate called" not in out.stderr
