"""
MMLU: four-choice questions in 57 subjects (Hendrycks et al. 2021, "Measuring Massive Multitask
Language Understanding", arXiv:2009.03300). Categorical: the answer is one letter A-D.

Local files: <tasks dir>/mmlu/{auxiliary_train,dev,val,test}/*.csv, the original hendrycks/test
layout (one headerless CSV per subject: question, A, B, C, D, answer letter); hub: cais/mmlu "all".
"""

import csv
import glob
import os

from nanochat.common import NanochatError
from tasks.common import Task, check_choice, extract_choice, load_hub, render_mc, resolve_tasks_dir

LETTERS = ("A", "B", "C", "D")
LOCAL_FOLDERS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


def read_mmlu_csv(path, subject):
    """Rows of one subject CSV in the hub schema: {"question", "choices": [4 str], "answer": 0-3, "subject"}."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_number, record in enumerate(csv.reader(f), 1):
            if len(record) != 6 or record[5] not in LETTERS:
                raise NanochatError(f"{path}:{line_number}: expected 6 columns "
                                    "(question, A, B, C, D, answer letter A-D)")
            rows.append({"question": record[0], "choices": record[1:5], "answer": LETTERS.index(record[5]),
                         "subject": subject})
    return rows


class MMLU(Task):
    """MMLU. split: "auxiliary_train" | "dev" | "validation" | "test"; subjects: None (all) or a list."""

    eval_type = "categorical"
    letters = LETTERS

    def __init__(self, split="test", subjects=None, tasks_dir=None, **view):
        super().__init__(**view)
        check_choice("MMLU", "split", split, tuple(LOCAL_FOLDERS))
        folder = os.path.join(resolve_tasks_dir(tasks_dir), "mmlu", LOCAL_FOLDERS[split])
        if os.path.isdir(folder):
            suffix = f"_{LOCAL_FOLDERS[split]}.csv"
            self.rows = []
            found = set()
            for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
                name = os.path.basename(path)
                subject = name[: -len(suffix)] if name.endswith(suffix) else name[: -len(".csv")]
                found.add(subject)
                if subjects is None or subject in subjects:
                    self.rows.extend(read_mmlu_csv(path, subject))
            missing = sorted(set(subjects or ()) - found)
            if missing:
                raise NanochatError(f"MMLU: no {split} data for subject(s) {', '.join(missing)} in {folder}")
        else:
            rows = load_hub("MMLU", folder, "cais/mmlu", "all", split)
            if subjects is not None:
                keep = [i for i, subject in enumerate(rows["subject"]) if subject in subjects]
                rows = rows.select(keep)
            self.rows = rows

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # the hub's auxiliary_train rows are nested one level
            row = row["train"]
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], row["choices"], LETTERS)},
                         {"role": "assistant", "content": LETTERS[row["answer"]]}],
            "letters": list(LETTERS),
            "subject": row["subject"],
        }

    def evaluate(self, conversation, completion):
        return extract_choice(completion, conversation["letters"]) == conversation["messages"][-1]["content"]
