import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import NanochatError, run_main
from nanochat.dataset import download_shard, download_shards, get_data_dir, list_parquet_files, parquets_iter_batched, shard_name, split_files


def write_shard(path, texts, row_group_size):
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)


def make_shards(directory, rows_per_shard, row_group_size=2):
    """Shards whose documents name their shard and row: "s{shard}r{row}"."""
    os.makedirs(directory, exist_ok=True)
    for s, n in enumerate(rows_per_shard):
        write_shard(os.path.join(directory, shard_name(s)), [f"s{s}r{r}" for r in range(n)], row_group_size)
    return str(directory)


# ------------------------------------------------------------------------------------------------
# data directory and splits


def test_data_dir_precedence(base_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert get_data_dir() == os.path.join(str(base_dir), "base_data")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "env"))
    assert get_data_dir() == str(tmp_path / "env")
    assert get_data_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")


def test_list_ignores_partial_files_and_sorts(tmp_path):
    d = make_shards(tmp_path, [3, 3])
    os.rename(os.path.join(d, shard_name(0)), os.path.join(d, shard_name(5)))
    (tmp_path / "shard_00009.parquet.12345.tmp").write_bytes(b"half a download")
    (tmp_path / "notes.txt").write_text("not a shard")
    assert [os.path.basename(p) for p in list_parquet_files(d)] == [shard_name(1), shard_name(5)]
    assert split_files("val", d) == [os.path.join(d, shard_name(5))]
    assert split_files("train", d) == [os.path.join(d, shard_name(1))]


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(NanochatError, match=f"data directory not found: {tmp_path / 'nope'}"):
        list_parquet_files(str(tmp_path / "nope"))
    (tmp_path / "only.tmp").write_bytes(b"x")
    with pytest.raises(NanochatError, match=f"no parquet shards .* {tmp_path}"):
        list_parquet_files(str(tmp_path))


def test_single_shard_is_val_only(tmp_path):
    d = make_shards(tmp_path, [4])
    assert sum(parquets_iter_batched("val", data_dir=d), []) == [f"s0r{r}" for r in range(4)]
    with pytest.raises(NanochatError, match="only one shard .* no training split"):
        next(parquets_iter_batched("train", data_dir=d))
    with pytest.raises(NanochatError, match="unknown split 'test'"):
        next(parquets_iter_batched("test", data_dir=d))


@pytest.mark.parametrize("start,step", [(0, 1), (1, 2), (0, 3), (2, 3), (4, 4), (6, 5), (20, 1)])
def test_row_group_striding_across_shards(tmp_path, start, step):
    # train = shards 0..2 with 3, 1 and 4 row groups (row_group_size 2); shard 3 is val
    d = make_shards(tmp_path, [5, 2, 8, 1])
    all_groups = [[f"s{s}r{r}" for r in range(i, min(i + 2, n))] for s, n in enumerate([5, 2, 8]) for i in range(0, n, 2)]
    assert list(parquets_iter_batched("train", data_dir=d)) == all_groups
    assert list(parquets_iter_batched("train", start, step, data_dir=d)) == all_groups[start::step]


def test_ranks_partition_the_documents(tmp_path):
    d = make_shards(tmp_path, [7, 3, 9, 2])
    world = 3
    per_rank = [sum(parquets_iter_batched("train", r, world, data_dir=d), []) for r in range(world)]
    everything = sum(parquets_iter_batched("train", data_dir=d), [])
    assert sorted(sum(per_rank, [])) == sorted(everything) and len(everything) == 19


def test_null_rows_read_as_empty(tmp_path):
    write_shard(tmp_path / shard_name(0), ["a", None, "c"], 8)
    assert list(parquets_iter_batched("val", data_dir=str(tmp_path))) == [["a", "", "c"]]


# ------------------------------------------------------------------------------------------------
# bad shards: one line naming the file


def bad_shard(tmp_path, kind):
    make_shards(tmp_path, [2, 2])
    path = tmp_path / shard_name(0)
    if kind == "empty":
        pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    elif kind == "no_text":
        pq.write_table(pa.table({"content": ["a", "b"]}), path)
    elif kind == "not_string":
        pq.write_table(pa.table({"text": [1, 2]}), path)
    elif kind == "garbage":
        path.write_bytes(b"this is not parquet at all" * 10)
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def corrupt_row_group(path, index):
    """Overwrite the page header of row group `index` (the footer stays valid)."""
    start = pq.read_metadata(path).row_group(index).column(0).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    open(path, "wb").write(bytes(data))


def test_corrupt_row_group_error_names_file_and_row_group(tmp_path):
    d = make_shards(tmp_path, [6])
    corrupt_row_group(os.path.join(d, shard_name(0)), 1)
    batches = parquets_iter_batched("val", data_dir=d)
    assert next(batches) == ["s0r0", "s0r1"]
    with pytest.raises(NanochatError, match=f"corrupt parquet shard {os.path.join(d, shard_name(0))} \\(row group 1\\)"):
        next(batches)


@pytest.mark.parametrize("kind,message", [("empty", "empty shard"), ("no_text", "no 'text' column"), ("not_string", "expected string"), ("garbage", "corrupt parquet"), ("truncated", "corrupt parquet")])
def test_bad_shard_errors_name_the_file(tmp_path, kind, message):
    path = bad_shard(tmp_path, kind)
    with pytest.raises(NanochatError) as info:
        list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    assert message in str(info.value) and path in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# download, against a local HTTP server


class ShardServer:
    """A local HTTP server for shard_*.parquet files. fail_first: answer that many requests per file
    with `failure` ("500", "404", "truncate": a cut-off body, "html": a 200 page that is not parquet)."""

    def __init__(self, files, fail_first=0, failure="500"):
        self.files, self.fail_first, self.failure = files, fail_first, failure
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                if server.requests.count(name) <= server.fail_first:
                    if server.failure in ("500", "404"):
                        self.send_error(int(server.failure))
                        return
                    if server.failure == "html":
                        body = b"<html>rate limited</html>"
                    elif server.failure == "truncate":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 3])
                        self.close_connection = True
                        return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/x/resolve/main"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path_factory):
    """Three small parquet shards as bytes, keyed by file name."""
    src = tmp_path_factory.mktemp("served")
    make_shards(src, [3, 4, 5])
    return {shard_name(i): (src / shard_name(i)).read_bytes() for i in range(3)}


def leftovers(directory):
    return sorted(f for f in os.listdir(directory) if not f.endswith(".parquet"))


def test_download_then_skip(tmp_path, served):
    out = tmp_path / "data"
    with ShardServer(served) as server:
        download_shards(3, str(out), base_url=server.url, workers=2, backoff=0.0, log=lambda *_: None)
        assert sorted(server.requests) == sorted(served)
        for name, body in served.items():
            assert (out / name).read_bytes() == body
        download_shards(2, str(out), base_url=server.url, workers=2, backoff=0.0, log=lambda *_: None)
        assert len(server.requests) == 3  # complete files are not fetched again
    assert [len(g) for g in parquets_iter_batched("train", data_dir=str(out))] == [2, 1, 2, 2]
    assert leftovers(out) == []


@pytest.mark.parametrize("failure", ["500", "truncate", "html"])
def test_download_retries_until_success(tmp_path, served, failure):
    with ShardServer(served, fail_first=2, failure=failure) as server:
        assert download_shard(1, str(tmp_path), base_url=server.url, attempts=3, backoff=0.01) == "downloaded"
        assert server.requests == [shard_name(1)] * 3
    assert (tmp_path / shard_name(1)).read_bytes() == served[shard_name(1)]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["500", "truncate", "html"])
def test_download_gives_up_cleanly(tmp_path, served, failure):
    with ShardServer(served, fail_first=10**6, failure=failure) as server:
        with pytest.raises(NanochatError, match=f"failed to download {server.url}/{shard_name(0)} after 3 attempt"):
            download_shard(0, str(tmp_path), base_url=server.url, attempts=3, backoff=0.01)
        assert len(server.requests) == 3
    assert os.listdir(tmp_path) == []  # no partial file, no temp file


def test_download_404_is_not_retried(tmp_path, served):
    with ShardServer(served, fail_first=10**6, failure="404") as server:
        with pytest.raises(NanochatError, match="after 1 attempt.*404"):
            download_shard(2, str(tmp_path), base_url=server.url, attempts=5, backoff=0.01)
        assert len(server.requests) == 1


def test_cli_downloads_and_reports_failure(tmp_path, served, capsys):
    out = tmp_path / "data"
    with ShardServer(served) as server:
        dataset.main(["-n", "2", "--data-dir", str(out), "--base-url", server.url, "--workers", "2"])
    assert sorted(os.listdir(out)) == [shard_name(0), shard_name(1)]
    capsys.readouterr()
    # shard 3 does not exist on the server: the run fails after trying everything, exit code 1
    with ShardServer(served) as server:
        with pytest.raises(SystemExit) as info:
            run_main(lambda: dataset.main(["-n", "4", "--data-dir", str(out), "--base-url", server.url, "--attempts", "2", "--backoff", "0"]))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 4 shards failed") and shard_name(3) in err and "\n" not in err
    assert sorted(os.listdir(out)) == [shard_name(i) for i in range(3)]
    with pytest.raises(NanochatError, match="-n 0"):
        dataset.main(["-n", "0", "--data-dir", str(out)])
