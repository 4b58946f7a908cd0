"""
The pretraining corpus: parquet shards of documents, one document per row in a string column `text`.

    <data_dir>/shard_00000.parquet ... shard_NNNNN.parquet

Shards are taken in sorted file-name order; the LAST shard is the validation split, all others are
the training split. Only files whose names end in `.parquet` count: downloads in progress are
written to `*.tmp` files and renamed into place when complete, so a `.parquet` file is always whole.

Data directory: the explicit argument (a script's `--data-dir`) > $NANOCHAT_DATA_DIR >
$NANOCHAT_DATA_ROOT/pretrain > <base_dir>/base_data (nanochat.common.resolve_data_path).

Download the first N FineWeb-Edu shards (the default source: the Hugging Face dataset
karpathy/fineweb-edu-100b-shuffle, 1823 shards of ~100 MB):

    python -m nanochat.dataset -n 8 [--data-dir D] [--workers 4] [--base-url URL]
"""

import argparse
import glob
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow.parquet as pq

from nanochat.common import NanochatError, get_base_dir, resolve_data_path, run_main

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
NUM_SHARDS = 1823  # shard_00000 ... shard_01822 in the default source
SPLITS = ("train", "val")
TEXT_COLUMN = "text"


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir=None):
    """The shard directory: data_dir (a --data-dir flag) > $NANOCHAT_DATA_DIR > $NANOCHAT_DATA_ROOT/pretrain >
    <base_dir>/base_data. Not created here: readers report a missing directory, the downloader creates it."""
    return resolve_data_path(data_dir, "NANOCHAT_DATA_DIR", "pretrain", lambda: os.path.join(get_base_dir(), "base_data"))


def list_parquet_files(data_dir=None):
    """
    Sorted paths of the complete shards (`*.parquet`) in the data directory; temp files of
    downloads in progress (`*.tmp`) are ignored.
    Raises NanochatError if the directory does not exist or holds no shard.
    """
    data_dir = get_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        raise NanochatError(f"data directory not found: {data_dir} (download shards with: python -m nanochat.dataset -n 8, or pass --data-dir / set NANOCHAT_DATA_DIR or NANOCHAT_DATA_ROOT)")
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, "*.parquet")) if os.path.isfile(p))
    if not paths:
        raise NanochatError(f"no parquet shards (*.parquet) in data directory {data_dir}")
    return paths


def split_files(split, data_dir=None):
    """The shards of a split: "val" is the last shard, "train" all the others.
    Raises NanochatError on an unknown split, or for "train" when there is only one shard."""
    if split not in SPLITS:
        raise NanochatError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    paths = list_parquet_files(data_dir)
    if split == "val":
        return paths[-1:]
    if len(paths) < 2:
        raise NanochatError(f"only one shard in {os.path.dirname(paths[0])} ({os.path.basename(paths[0])}): it is the validation split, so there is no training split; add at least one more shard")
    return paths[:-1]


def open_shard(path):
    """
    Open a shard and check it: readable parquet, a string column `text`, at least one row.
    Returns the pyarrow.parquet.ParquetFile. Raises NanochatError naming the file otherwise.
    """
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise NanochatError(f"shard not found: {path}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for anything unreadable
        raise NanochatError(f"corrupt parquet shard {path}: {_one_line(e)}") from None
    schema = pf.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise NanochatError(f"shard {path} has no '{TEXT_COLUMN}' column (columns: {', '.join(schema.names) or 'none'})")
    col_type = str(schema.field(TEXT_COLUMN).type)
    if col_type not in ("string", "large_string"):
        raise NanochatError(f"shard {path}: column '{TEXT_COLUMN}' has type {col_type}, expected string")
    if pf.metadata.num_rows == 0 or pf.metadata.num_row_groups == 0:
        raise NanochatError(f"empty shard (no rows): {path}")
    return pf


def read_row_group(pf, path, index):
    """The documents of row group `index` of an opened shard as a list of str (null rows become "").
    Raises NanochatError naming the file and row group if the data cannot be decoded.
    use_threads=False: one column gains nothing from Arrow's thread pool, and a pool worker still
    finishing at interpreter exit can abort the process (apache/arrow#34314)."""
    try:
        column = pf.read_row_group(index, columns=[TEXT_COLUMN], use_threads=False).column(TEXT_COLUMN)
    except Exception as e:
        raise NanochatError(f"corrupt parquet shard {path} (row group {index}): {_one_line(e)}") from None
    if column.null_count:
        column = column.fill_null("")
    return column.to_pylist()


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """
    Yield the documents of a split one row group at a time (list of str), one pass.

    Row groups are numbered globally across the split's shards in order (shard 0's row groups,
    then shard 1's, ...); this yields row groups start, start + step, start + 2 * step, ... so that
    DDP rank r of W reads its own row groups with start=r, step=W.
    Raises NanochatError for a missing data directory, a bad split, or an empty / corrupt shard or
    one without a `text` column (naming the file).
    """
    if start < 0 or step < 1:
        raise NanochatError(f"parquets_iter_batched: need start >= 0 and step >= 1, got start={start} step={step}")
    offset = 0  # global index of the current shard's first row group
    for path in split_files(split, data_dir):
        pf = open_shard(path)
        n = pf.metadata.num_row_groups
        first = start - offset if start >= offset else (start - offset) % step  # first of ours in this shard
        for index in range(first, n, step):
            yield read_row_group(pf, path, index)
        offset += n


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------------------------------------
# download


def download_shard(index, data_dir, base_url=BASE_URL, attempts=5, backoff=2.0, timeout=60.0):
    """
    Download shard `index` into data_dir unless it is already there.

    The body is streamed to a temp file in data_dir, checked (byte count against Content-Length,
    parquet footer readable) and renamed into place, so an existing shard is always complete and is
    skipped. A failed attempt is retried after an exponential backoff (backoff, 2 * backoff,
    4 * backoff, ... seconds), up to `attempts` attempts in all; 4xx answers other than 408 / 429
    (e.g. 404) are final. timeout: seconds without data before an attempt fails.
    Returns "skipped" or "downloaded". Raises NanochatError after the last failed attempt; no
    partial file is left behind.
    """
    name = shard_name(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        return "skipped"
    url = f"{base_url.rstrip('/')}/{name}"
    last_error = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    expected = response.headers.get("Content-Length")
                    n_bytes = 0
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        n_bytes += len(chunk)
                if expected is not None and n_bytes != int(expected):
                    raise OSError(f"truncated body: {n_bytes} of {expected} bytes")
                f.flush()
                os.fsync(f.fileno())
            try:
                pq.read_metadata(tmp)  # the footer: catches an error page or a cut-off body
            except Exception as e:
                raise OSError(f"not a valid parquet file: {_one_line(e)}") from None
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, path)
            return "downloaded"
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, IncompleteRead
            last_error = e
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                break  # a permanent answer (e.g. 404): retrying would not help
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise NanochatError(f"failed to download {url} after {attempt + 1} attempt(s): {_one_line(last_error)}")


def download_shards(num_shards, data_dir=None, base_url=BASE_URL, workers=4, attempts=5, backoff=2.0, timeout=60.0, log=print):
    """
    Download the first num_shards shards (-1: all NUM_SHARDS) into data_dir with `workers` threads.
    Every shard is attempted; raises NanochatError afterwards if any of them failed.
    Returns the data directory.
    """
    if num_shards == -1:
        num_shards = NUM_SHARDS
    if not 1 <= num_shards <= NUM_SHARDS:
        raise NanochatError(f"-n {num_shards}: expected 1..{NUM_SHARDS}, or -1 for all shards")
    if workers < 1:
        raise NanochatError(f"--workers {workers}: expected >= 1")
    data_dir = get_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    failures, done = [], 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, data_dir, base_url, attempts, backoff, timeout): i for i in range(num_shards)}
        for future in as_completed(futures):
            done += 1
            name = shard_name(futures[future])
            try:
                outcome = future.result()
            except NanochatError as e:
                failures.append(str(e))
                outcome = "FAILED"
            elapsed = time.time() - t0
            eta = elapsed / done * (num_shards - done)
            log(f"[{done}/{num_shards}] {name}: {outcome} | {elapsed:.0f}s elapsed, eta {eta:.0f}s")
    if failures:
        raise NanochatError(f"{len(failures)} of {num_shards} shards failed to download into {data_dir}; first: {failures[0]}")
    return data_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Download the first N FineWeb-Edu pretraining shards")
    p.add_argument("-n", "--num-shards", type=int, default=-1, help=f"number of shards to download, from the first; -1 = all {NUM_SHARDS}")
    p.add_argument("--data-dir", type=str, default=None, help="where to put the shards (default: $NANOCHAT_DATA_DIR or <base_dir>/base_data)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--base-url", type=str, default=BASE_URL, help="URL prefix; shard i is fetched from <base-url>/shard_{i:05d}.parquet")
    p.add_argument("--attempts", type=int, default=5, help="download attempts per shard before giving up")
    p.add_argument("--backoff", type=float, default=2.0, help="seconds to wait before the first retry; doubles on each further retry")
    args = p.parse_args(argv)
    print(vars(args))
    if args.attempts < 1 or args.backoff < 0:
        raise NanochatError(f"--attempts must be >= 1 and --backoff >= 0, got {args.attempts} and {args.backoff}")
    data_dir = download_shards(args.num_shards, args.data_dir, args.base_url, args.workers, args.attempts, args.backoff)
    print(f"shards are in {data_dir}")


if __name__ == "__main__":
    run_main(main)
