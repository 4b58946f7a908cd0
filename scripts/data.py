"""
Prepare a recipe's mixture once, and tell which prepared data sets are stale (nanochat/prepared.py).

    python -m scripts.data prepare sft_mix              # tasks/recipes/sft_mix.{json,yaml,yml}
    python -m scripts.data prepare my/recipe.json       # a path works too: the name is the file's stem
    python -m scripts.data prepare sft_mix --dry-run    # build, count and print; write nothing
    python -m scripts.data status                       # every recipe and prepared set: CURRENT / STALE / NOT PREPARED

prepare writes <base_dir>/prepared/<name>/data.jsonl and manifest.json and prints, per category, the
rows, the tokens (rendered with the tokenizer, as training renders them) and their shares next to
the share the recipe asks for. A CURRENT set is left alone unless --force; a STALE one is rewritten,
with the reasons printed. Train on it with `scripts.mid_train --prepared NAME` or `scripts.chat_sft
--prepared NAME`.
"""

import argparse
import glob
import json
import os

from tqdm import tqdm

from nanochat.common import NanochatError, run_main
from nanochat.prepared import (DATA_FILE, FORMAT, VERSION, file_record, fix_command, prepared_dir, prepared_root, read_manifest,
                               stale_reasons, write_prepared)
from nanochat.tokenizer import get_tokenizer
from tasks.recipe import load_recipe

RECIPES_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tasks", "recipes"))
RECIPE_EXTENSIONS = (".json", ".yaml", ".yml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prepare recipe mixtures once; list which prepared data sets are stale")
    verbs = p.add_subparsers(dest="verb", required=True)
    prepare = verbs.add_parser("prepare", help="write a recipe's mixture to <base_dir>/prepared/NAME/ with its manifest")
    prepare.add_argument("recipe", type=str, help="a recipe name in tasks/recipes/ (without extension) or a recipe file path")
    prepare.add_argument("--dry-run", action="store_true", help="build the mixture and print its table; write nothing")
    prepare.add_argument("--force", action="store_true", help="rewrite the prepared set even when it is CURRENT")
    prepare.add_argument("--tasks-dir", type=str, default=None,
                         help="local task data (default: $NANOCHAT_TASKS_DIR, $NANOCHAT_DATA_ROOT/tasks or <base_dir>/tasks)")
    verbs.add_parser("status", help="one line per recipe in tasks/recipes/ and per prepared set: CURRENT, STALE (why), NOT PREPARED")
    return p.parse_args(argv)


def resolve_recipe(arg):
    """(name, recipe path, command that prepares it) for a recipe name in tasks/recipes/ or a file path."""
    for extension in RECIPE_EXTENSIONS:
        path = os.path.join(RECIPES_DIR, arg + extension)
        if os.sep not in arg and os.path.isfile(path):
            return arg, path, fix_command(arg)
    if os.path.isfile(arg):
        path = os.path.abspath(arg)
        name = os.path.splitext(os.path.basename(path))[0]
        return name, path, fix_command(path if os.path.dirname(path) != RECIPES_DIR else name)
    if os.sep in arg or arg.endswith(RECIPE_EXTENSIONS):
        raise NanochatError(f"no such recipe file {arg}")
    raise NanochatError(f"no recipe {arg!r}: no file tasks/recipes/{arg}.{{json,yaml,yml}} "
                        f"(recipes there: {', '.join(sorted(recipe_names())) or 'none'})")


def recipe_names():
    """{name: path} of the recipes in tasks/recipes/."""
    paths = sorted(p for e in RECIPE_EXTENSIONS for p in glob.glob(os.path.join(RECIPES_DIR, "*" + e)))
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def tokenizer_fingerprint():
    """The current tokenizer's fingerprint, None when there is none."""
    try:
        return get_tokenizer().fingerprint()
    except NanochatError:
        return None


# ------------------------------------------------------------------------------------------------ prepare

def render_mixture(mixture, tokenizer):
    """(lines, tokens per row): each row of the mixture as a JSON line, and its token count
    (tokenizer.render_conversation, uncut). A repeated example is rendered once."""
    lines, tokens, cache = [], [], {}
    for i in tqdm(range(len(mixture)), desc="rendering", unit="conv", mininterval=2, disable=len(mixture) < 5000):
        key = (int(mixture.task_ids[i]), int(mixture.example_ids[i]))
        if key not in cache:
            conversation = mixture[i]
            cache[key] = (json.dumps({"messages": conversation["messages"]}, ensure_ascii=False),
                          len(tokenizer.render_conversation(conversation, max_tokens=1 << 62)[0]))
        lines.append(cache[key][0])
        tokens.append(cache[key][1])
    return lines, tokens


def category_table(mixture, tokens):
    """The manifest's "categories": rows, tokens, their shares and the recipe's target, per category."""
    rows_of, tokens_of = {}, {}
    for i, n in enumerate(tokens):
        category = mixture.entries[mixture.task_ids[i]]["category"]
        rows_of[category] = rows_of.get(category, 0) + 1
        tokens_of[category] = tokens_of.get(category, 0) + n
    total_rows, total_tokens = max(len(tokens), 1), max(sum(tokens), 1)
    return [{"name": name, "rows": rows_of.get(name, 0), "tokens": tokens_of.get(name, 0),
             "row_share": rows_of.get(name, 0) / total_rows, "token_share": tokens_of.get(name, 0) / total_tokens,
             "target": target} for name, target in mixture.categories.items()]


def print_table(categories):
    header = f"{'category':<20} {'rows':>9} {'row share':>9} {'tokens':>12} {'token share':>11} {'target':>8}"
    print(header)
    print("-" * len(header))
    for c in categories:
        target = "all" if c["target"] == "all" else f"{c['target']:.1%}"
        print(f"{c['name']:<20} {c['rows']:>9,} {c['row_share']:>9.1%} {c['tokens']:>12,} {c['token_share']:>11.1%} {target:>8}")
    print("-" * len(header))
    print(f"{'total':<20} {sum(c['rows'] for c in categories):>9,} {'':>9} {sum(c['tokens'] for c in categories):>12,}")
    print("(target: the share of rows the recipe asks for; weights are shares of rows, so token shares differ "
          "where a category's conversations are longer or shorter than the others')")


def prepare(args):
    name, recipe_path, command = resolve_recipe(args.recipe)
    directory = prepared_dir(name)
    tokenizer = get_tokenizer()
    mixture = load_recipe(recipe_path, tasks_dir=args.tasks_dir)  # validates the recipe even when nothing is to do
    sources = [{**entry, "rows": int(rows), "files": [file_record(p) for p in task.source_files()]}
               for entry, task, rows in zip(mixture.entries, mixture.tasks, mixture.counts)]

    manifest = read_manifest(name)
    reasons = []
    if manifest is not None:
        reasons = stale_reasons(manifest, directory, tokenizer.fingerprint())
        if manifest["recipe"]["path"] != recipe_path:
            reasons.append(f"recipe path changed ({manifest['recipe']['path']} -> {recipe_path})")
        files = lambda ss: sorted({f["path"] for s in ss for f in s["files"]})  # noqa: E731
        if files(manifest["sources"]) != files(sources):  # e.g. a new chat file that SmolTalk's glob now finds
            reasons.append("the recipe's source files are not the same set")
        if not reasons and not args.force:
            print(f"prepared/{name} is CURRENT ({directory}): nothing to do (--force rewrites it)")
            return
        print(f"prepared/{name} is " + (f"STALE: {'; '.join(reasons)}" if reasons else "CURRENT: rewriting it (--force)"))

    lines, tokens = render_mixture(mixture, tokenizer)
    categories = category_table(mixture, tokens)
    print(f"{name}: {recipe_path}, {len(lines):,} conversations, {sum(tokens):,} tokens (tokenizer {tokenizer.fingerprint()})")
    print_table(categories)
    if args.dry_run:
        print(f"--dry-run: nothing written (would write {os.path.join(directory, DATA_FILE)} and its manifest)")
        return
    manifest = {
        "format": FORMAT, "version": VERSION, "name": name, "command": command,
        "recipe": file_record(recipe_path), "seed": mixture.seed, "tokenizer": tokenizer.fingerprint(),
        "sources": sources, "categories": categories, "tokens": sum(tokens),
    }
    write_prepared(name, lines, manifest)
    print(f"wrote {os.path.join(directory, DATA_FILE)} and manifest.json; train on it with --prepared {name}")


# ------------------------------------------------------------------------------------------------ status

def status(args):
    tokenizer_fp = tokenizer_fingerprint()
    recipes = recipe_names()
    root = prepared_root()
    prepared = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    for name in sorted(set(recipes) | set(prepared)):
        try:
            manifest = read_manifest(name)
        except NanochatError as e:
            print(f"{name:<20} STALE        {e}")
            continue
        if manifest is None:
            where = recipes.get(name) or f"{prepared_dir(name)} has no manifest (an interrupted prepare?)"
            print(f"{name:<20} NOT PREPARED {where}")
            continue
        reasons = stale_reasons(manifest, prepared_dir(name), tokenizer_fp)
        if reasons:
            print(f"{name:<20} STALE        {'; '.join(reasons)} (fix: {manifest.get('command') or fix_command(name)})")
        else:
            print(f"{name:<20} CURRENT      {manifest['data']['rows']:,} rows, {manifest['tokens']:,} tokens, {manifest['created']}")


def main(argv=None):
    args = parse_args(argv)
    {"prepare": prepare, "status": status}[args.verb](args)


if __name__ == "__main__":
    run_main(main)
