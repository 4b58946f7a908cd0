"""
GSM8K: grade-school maths word problems with worked solutions ending in "#### <answer>"
(Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168).

The solutions carry calculator annotations like "48/2 = <<48/2=24>>24"; each becomes a python tool
call so that the model learns to use the tool: text "48/2 = ", python "48/2", python_output "24",
text "24 clips ...". Local files: <tasks dir>/gsm8k/{train,test}.jsonl ({"question", "answer"}, as in
openai/grade-school-math; {split}_socratic.jsonl for the socratic subset); hub: openai/gsm8k.

Difficulty buckets (conversation["bucket"], reported per bucket by nanochat/chat_eval.py): by the
number of steps of the reference solution, "1-3", "4-5" or "6+". A step is a non-empty line of the
solution before its "#### <answer>" line: the reference solutions put one step of reasoning, usually
one calculation, on each line (the paper describes the problems as taking 2 to 8 steps). On the test
split this gives 697 / 472 / 150 problems (2 to 11 steps; none has 1).
"""

import os
import re

from nanochat.common import NanochatError
from tasks.common import Task, assistant_text, check_choice, load_hub, read_jsonl, resolve_tasks_dir

ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
ANSWER_RE = re.compile(r"####\s*([-+]?[$]?[0-9][0-9,]*(?:\.[0-9]+)?)")
BUCKETS = ("1-3", "4-5", "6+")  # solution steps


def solution_steps(answer):
    """The number of steps of a reference solution (str): its non-empty lines before the last "####"
    marker (all its non-empty lines when there is none)."""
    marker = answer.rfind("####")
    return sum(1 for line in (answer if marker < 0 else answer[:marker]).splitlines() if line.strip())


def steps_bucket(steps):
    """The bucket of a step count: at most 3 "1-3", 4-5 "4-5", more "6+"."""
    return BUCKETS[0] if steps <= 3 else BUCKETS[1] if steps <= 5 else BUCKETS[2]


def gsm8k_conversation(question, answer):
    """The conversation for one GSM8K row: the question, then the solution as text and tool-call parts."""
    parts, position = [], 0
    for m in ANNOTATION_RE.finditer(answer):
        if m.start() > position:
            parts.append({"type": "text", "text": answer[position:m.start()]})
        expression, equals, result = m.group(1).rpartition("=")
        if equals:
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        else:  # an annotation without a result: keep its text (none occur in the official files)
            parts.append({"type": "text", "text": m.group(1)})
        position = m.end()
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


def extract_answer(text):
    """The number after the last "####" in `text`, without commas or a dollar sign; None if absent."""
    matches = ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").replace("$", "").lstrip("+")


def answers_equal(predicted, reference):
    try:
        return float(predicted) == float(reference)
    except ValueError:
        return predicted == reference


class GSM8K(Task):
    """GSM8K. subset: "main" | "socratic"; split: "train" | "test". Conversations carry "steps" (the
    reference solution's, solution_steps) and "bucket" (steps_bucket)."""

    eval_type = "generative"
    buckets = BUCKETS

    def __init__(self, subset="main", split="train", tasks_dir=None, **view):
        super().__init__(**view)
        check_choice("GSM8K", "subset", subset, ("main", "socratic"))
        check_choice("GSM8K", "split", split, ("train", "test"))
        root = resolve_tasks_dir(tasks_dir)
        name = f"{split}.jsonl" if subset == "main" else f"{split}_socratic.jsonl"
        path = os.path.join(root, "gsm8k", name)
        if os.path.exists(path):
            self._source_files = [os.path.abspath(path)]
            self.rows = []
            for line_number, row in read_jsonl(path):
                if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                        and isinstance(row.get("answer"), str) and "####" in row["answer"]):
                    raise NanochatError(f"{path}:{line_number}: expected {{'question': str, 'answer': str "
                                        "ending in '#### <number>'}")
                self.rows.append(row)
        else:
            self.rows = load_hub("GSM8K", path, "openai/gsm8k", subset, split)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        steps = solution_steps(row["answer"])
        return gsm8k_conversation(row["question"], row["answer"]) | {"steps": steps, "bucket": steps_bucket(steps)}

    def evaluate(self, conversation, completion):
        reference = extract_answer(assistant_text(conversation["messages"][-1]))
        predicted = extract_answer(completion)
        return predicted is not None and answers_equal(predicted, reference)
