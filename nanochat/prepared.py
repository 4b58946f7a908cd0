"""
Prepared data sets: a recipe's mixture written once to <base_dir>/prepared/<name>/data.jsonl (one
conversation per line, the format of tasks/customjson.py), with a manifest.json that records what it
was made from, so that a training run can tell whether the data set still is what its recipe gives.
scripts/data.py writes them (it builds the mixture from tasks/); mid_train and chat_sft read them
with --prepared NAME. This module never imports tasks/.

manifest.json:
    {"format": "nanochat-prepared", "version": 1, "name": str, "created": ISO time (UTC),
     "command": the command that rewrites it ("python -m scripts.data prepare NAME"),
     "recipe": {"path": str, "bytes": int, "sha256": str}, "seed": int, "tokenizer": fingerprint,
     "data": {"file": "data.jsonl", "rows": int, "bytes": int, "sha256": str},
     "sources": [{"task": str, "category": str, "args": dict, "rows": int, "weight": number | "all",
                  "files": [{"path": str, "bytes": int, "sha256": str}, ...]}, ...],
     "categories": [{"name": str, "rows": int, "tokens": int, "row_share": float, "token_share": float,
                     "target": float (share of rows asked for) | "all"}, ...],
     "tokens": int}

A prepared set is STALE when a source file changed or is gone, the recipe file was edited, the
tokenizer changed (token counts and shares were computed with it) or data.jsonl is not the file the
manifest describes. Every check hashes the files in full: sha256 runs at ~1 GB/s, and the whole of
shared/data (79 MB, 190 files) hashes in 0.07 s warm, so a size/mtime shortcut would buy nothing and
could miss an edit that keeps both.
"""

import datetime
import hashlib
import json
import os

from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir, print0
from nanochat.registry import file_hash
from nanochat.tokenizer import get_tokenizer

FORMAT, VERSION = "nanochat-prepared", 1
DATA_FILE, MANIFEST_FILE = "data.jsonl", "manifest.json"


def prepared_root():
    """<base_dir>/prepared: one folder per prepared data set."""
    return os.path.join(get_base_dir(), "prepared")


def prepared_dir(name):
    """The folder of prepared data set `name`. Raises NanochatError for a name that is not a plain folder name."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name:
        raise NanochatError(f"a prepared data set name must be a plain folder name, got {name!r}")
    return os.path.join(prepared_root(), name)


def manifest_path(name):
    return os.path.join(prepared_dir(name), MANIFEST_FILE)


def fix_command(name):
    return f"python -m scripts.data prepare {name}"


def file_record(path):
    """{"path": absolute path, "bytes": size, "sha256": hex digest} of a file."""
    path = os.path.abspath(path)
    return {"path": path, "bytes": os.path.getsize(path), "sha256": file_hash(path)}


def read_manifest(name):
    """The manifest of prepared data set `name`, or None when it has none. NanochatError if it is unreadable."""
    path = manifest_path(name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise NanochatError(f"{path}: unreadable manifest ({e}); rewrite it with: {fix_command(name)} --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NanochatError(f"{path}: not a {FORMAT} manifest; rewrite it with: {fix_command(name)} --force")
    return manifest


def stale_reasons(manifest, directory, tokenizer_fp):
    """
    Why the prepared data set in `directory` described by `manifest` is stale ([] when current):
    "source <path> changed (...)", "source <path> missing", "recipe <path> edited", "recipe <path>
    missing", "tokenizer changed (<old> -> <new>)", "data.jsonl changed" / "data.jsonl missing".
    tokenizer_fp: the current tokenizer's fingerprint, None when there is no tokenizer.
    """
    reasons = []
    seen = {}
    for source in manifest["sources"]:
        for f in source["files"]:
            seen.setdefault(f["path"], f)
    for path, recorded in seen.items():
        if not os.path.isfile(path):
            reasons.append(f"source {path} missing")
            continue
        now = file_record(path)
        if now["bytes"] != recorded["bytes"]:
            reasons.append(f"source {path} changed (size {recorded['bytes']} -> {now['bytes']} bytes)")
        elif now["sha256"] != recorded["sha256"]:
            reasons.append(f"source {path} changed (sha256 {recorded['sha256'][:12]} -> {now['sha256'][:12]})")
    recipe = manifest["recipe"]["path"]
    if not os.path.isfile(recipe):
        reasons.append(f"recipe {recipe} missing")
    elif file_hash(recipe) != manifest["recipe"]["sha256"]:
        reasons.append(f"recipe {recipe} edited")
    if tokenizer_fp != manifest["tokenizer"]:
        reasons.append(f"tokenizer changed ({manifest['tokenizer']} -> {tokenizer_fp or 'no tokenizer'})")
    data = os.path.join(directory, DATA_FILE)
    if not os.path.isfile(data):
        reasons.append(f"{DATA_FILE} missing")
    elif file_hash(data) != manifest["data"]["sha256"]:
        reasons.append(f"{DATA_FILE} changed")
    return reasons


def write_prepared(name, lines, manifest):
    """
    Write the prepared data set `name`: `lines` (an iterable of str, one JSON conversation each,
    without the newline) to data.jsonl, then `manifest` (completed with the "data" record) to
    manifest.json. The old manifest goes first and each file is written to a temp file and renamed,
    so a crash leaves either no manifest or one whose data.jsonl hash matches. Returns the manifest.
    """
    directory = prepared_dir(name)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, MANIFEST_FILE)):
        os.remove(os.path.join(directory, MANIFEST_FILE))
    data, tmp = os.path.join(directory, DATA_FILE), os.path.join(directory, f"{DATA_FILE}.tmp.{os.getpid()}")
    digest, rows, size = hashlib.sha256(), 0, 0
    with open(tmp, "wb") as f:
        for line in lines:
            encoded = (line + "\n").encode("utf-8")
            f.write(encoded)
            digest.update(encoded)
            rows, size = rows + 1, size + len(encoded)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data)
    manifest = manifest | {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "data": {"file": DATA_FILE, "rows": rows, "bytes": size, "sha256": digest.hexdigest()}}
    atomic_write_bytes(os.path.join(directory, MANIFEST_FILE), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def check_prepared(name, tokenizer_fp, allow_stale=False):
    """
    The data.jsonl of prepared data set `name`, checked for a training run: NanochatError when there
    is none, or when it is stale (every reason, and the command that rewrites it) unless allow_stale,
    which prints the reasons as a warning instead.
    """
    manifest = read_manifest(name)
    if manifest is None:
        raise NanochatError(f"no prepared data set {name!r} in {prepared_root()} (make it with: {fix_command(name)})")
    reasons = stale_reasons(manifest, prepared_dir(name), tokenizer_fp)
    if reasons:
        what = f"prepared data set {name!r} is STALE: {'; '.join(reasons)}"
        if not allow_stale:
            raise NanochatError(f"{what}. Rewrite it with: {manifest.get('command') or fix_command(name)} "
                                "(or train on it as it is with --allow-stale)")
        print0(f"warning: {what} (--allow-stale: training on it anyway)")
    return os.path.join(prepared_dir(name), DATA_FILE)


# ------------------------------------------------------------------------------------------------
# The training scripts' flags (mid_train, chat_sft): one helper, one meaning.

def data_path(name):
    """The data.jsonl of prepared data set `name`."""
    return os.path.join(prepared_dir(name), DATA_FILE)


def add_prepared_args(group):
    """--prepared NAME and --allow-stale, on a training script's data argument group."""
    group.add_argument("--prepared", type=str, default=None, metavar="NAME",
                       help="train on <base_dir>/prepared/NAME/data.jsonl (python -m scripts.data prepare NAME); not with --recipe")
    group.add_argument("--allow-stale", action="store_true",
                       help="with --prepared: train on a STALE prepared set (a warning) instead of stopping")


def check_prepared_args(args):
    """
    Check --prepared/--recipe/--allow-stale after parsing, before anything is written: one of
    --prepared and --recipe; --allow-stale only with --prepared; a STALE prepared set stops the run
    (check_prepared) unless --allow-stale.
    """
    if args.prepared is None:
        if args.allow_stale:
            raise NanochatError("--allow-stale only applies with --prepared NAME")
        return
    if args.recipe is not None:
        raise NanochatError(f"--prepared {args.prepared} and --recipe {args.recipe} both name the training data: give one")
    check_prepared(args.prepared, get_tokenizer().fingerprint(), args.allow_stale)
