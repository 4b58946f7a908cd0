"""
MMLU: four-choice questions in 57 subjects (Hendrycks et al. 2021, "Measuring Massive Multitask
Language Understanding", arXiv:2009.03300). Categorical: the answer is one letter A-D.

Local files: <tasks dir>/mmlu/{auxiliary_train,dev,val,test}/*.csv, the original hendrycks/test
layout (one headerless CSV per subject: question, A, B, C, D, answer letter); hub: cais/mmlu "all".

Buckets (nanochat/chat_eval.py reports accuracy per bucket): the four subject groups of the MMLU
paper, "STEM", "humanities", "social sciences" and "other" (business, health, misc.), from the
paper's repository (hendrycks/test, categories.py: subject -> subcategory -> group). One difference
from lm-evaluation-harness: anatomy is "other" (a health subject) here as in the paper, STEM there.
An unknown subject in dev / validation / test is an error, not "other": the 57 subjects are fixed,
so an unknown name means misnamed files or another data set, and folding it silently into "other"
would change what that group measures. auxiliary_train (other data sets: ARC, RACE, ...; no MMLU
subjects) has no buckets.
"""

import csv
import glob
import os

from nanochat.common import NanochatError
from tasks.common import Task, check_choice, extract_choice, load_hub, render_mc, resolve_tasks_dir

LETTERS = ("A", "B", "C", "D")
LOCAL_FOLDERS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}
GROUPS = ("STEM", "humanities", "social sciences", "other")
SUBJECT_GROUPS = {
    # STEM: mathematics, physics, chemistry, biology, computer science, engineering
    **dict.fromkeys(["abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
                     "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
                     "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
                     "high_school_computer_science", "high_school_mathematics", "high_school_physics",
                     "high_school_statistics", "machine_learning"], "STEM"),
    # humanities: history, philosophy, law
    **dict.fromkeys(["formal_logic", "high_school_european_history", "high_school_us_history",
                     "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                     "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                     "world_religions"], "humanities"),
    # social sciences: politics, culture, economics, geography, psychology
    **dict.fromkeys(["econometrics", "high_school_geography", "high_school_government_and_politics",
                     "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                     "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
                     "us_foreign_policy"], "social sciences"),
    # other: business, health, miscellaneous
    **dict.fromkeys(["anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
                     "human_aging", "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
                     "professional_accounting", "professional_medicine", "virology"], "other"),
}


def subject_group(subject):
    """The group (one of GROUPS) of an MMLU subject. Raises NanochatError for a subject not among the 57."""
    if subject not in SUBJECT_GROUPS:
        raise NanochatError(f"MMLU: unknown subject {subject!r}: not one of the 57 MMLU subjects, so it has no "
                            "subject group (tasks.mmlu.SUBJECT_GROUPS)")
    return SUBJECT_GROUPS[subject]


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
    """MMLU. split: "auxiliary_train" | "dev" | "validation" | "test"; subjects: None (all) or a list.
    Conversations carry "subject" and, except in auxiliary_train (buckets None), "bucket" (its group)."""

    eval_type = "categorical"
    letters = LETTERS

    def __init__(self, split="test", subjects=None, tasks_dir=None, **view):
        super().__init__(**view)
        check_choice("MMLU", "split", split, tuple(LOCAL_FOLDERS))
        self.buckets = None if split == "auxiliary_train" else GROUPS
        folder = os.path.join(resolve_tasks_dir(tasks_dir), "mmlu", LOCAL_FOLDERS[split])
        if os.path.isdir(folder):
            suffix = f"_{LOCAL_FOLDERS[split]}.csv"
            self.rows, self._source_files = [], []
            found = set()
            for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
                name = os.path.basename(path)
                subject = name[: -len(suffix)] if name.endswith(suffix) else name[: -len(".csv")]
                found.add(subject)
                if subjects is None or subject in subjects:
                    self.rows.extend(read_mmlu_csv(path, subject))
                    self._source_files.append(os.path.abspath(path))
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
        conversation = {
            "messages": [{"role": "user", "content": render_mc(row["question"], row["choices"], LETTERS)},
                         {"role": "assistant", "content": LETTERS[row["answer"]]}],
            "letters": list(LETTERS),
            "subject": row["subject"],
        }
        if self.buckets is not None:
            conversation["bucket"] = subject_group(row["subject"])
        return conversation

    def evaluate(self, conversation, completion):
        return extract_choice(completion, conversation["letters"]) == conversation["messages"][-1]["content"]
