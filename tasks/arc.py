"""
ARC, the AI2 Reasoning Challenge: grade-school science questions with 3-5 choices, in an Easy and a
Challenge set (Clark et al. 2018, "Think you have Solved Question Answering? Try ARC",
arXiv:1803.05457). Categorical. Choice labels (letters, or digits 1-4 in some questions) are mapped
to letters A, B, C, ... by position, so every prompt reads the same.

Local files: <tasks dir>/arc/{ARC-Easy,ARC-Challenge}-{Train,Dev,Test}.jsonl in the original AllenAI
schema {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}; hub: allenai/ai2_arc.

Difficulty buckets (nanochat/chat_eval.py reports accuracy per bucket): the set is the bucket, "Easy"
or "Challenge" (the ARC authors' split: Challenge holds the questions that both a retrieval and a
word co-occurrence baseline answered wrongly). One ARC task is one set, so it has one bucket; it is
still declared, so that ARC's rows line up with the other tasks' in the per-bucket table.
"""

import os

from nanochat.common import NanochatError
from tasks.common import Task, check_choice, extract_choice, load_hub, read_jsonl, render_mc, resolve_tasks_dir

LOCAL_SPLITS = {"train": "Train", "validation": "Dev", "test": "Test"}


def arc_row_from_original(obj, where):
    """An original-schema ARC record in the hub's schema: {"id", "question", "choices": {"text", "label"},
    "answerKey"}. Raises NanochatError naming `where` when the record is malformed."""
    try:
        question = obj["question"]
        choices = question["choices"]
        row = {"id": obj["id"], "question": question["stem"],
               "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
               "answerKey": obj["answerKey"]}
    except (KeyError, TypeError):
        raise NanochatError(f"{where}: expected {{'id', 'question': {{'stem', 'choices': [{{'text', 'label'}}]}}, "
                            "'answerKey'}") from None
    if row["answerKey"] not in row["choices"]["label"]:
        raise NanochatError(f"{where}: answerKey {row['answerKey']!r} is not one of the choice labels")
    return row


class ARC(Task):
    """ARC. subset: "ARC-Easy" | "ARC-Challenge"; split: "train" | "validation" | "test".
    buckets: (the set without "ARC-",), which every conversation carries as "bucket"."""

    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", tasks_dir=None, **view):
        super().__init__(**view)
        check_choice("ARC", "subset", subset, ("ARC-Easy", "ARC-Challenge"))
        check_choice("ARC", "split", split, tuple(LOCAL_SPLITS))
        self.buckets = (subset.removeprefix("ARC-"),)
        path = os.path.join(resolve_tasks_dir(tasks_dir), "arc", f"{subset}-{LOCAL_SPLITS[split]}.jsonl")
        if os.path.exists(path):
            self._source_files = [os.path.abspath(path)]
            self.rows = [arc_row_from_original(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
        else:
            self.rows = load_hub("ARC", path, "allenai/ai2_arc", subset, split)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        letters = [chr(ord("A") + i) for i in range(len(texts))]
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], texts, letters)},
                         {"role": "assistant", "content": letters[labels.index(row["answerKey"])]}],
            "letters": letters,
            "bucket": self.buckets[0],
        }

    def evaluate(self, conversation, completion):
        return extract_choice(completion, conversation["letters"]) == conversation["messages"][-1]["content"]
