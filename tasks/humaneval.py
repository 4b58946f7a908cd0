"""
HumanEval: 164 Python functions to complete from a signature and docstring, checked by unit tests
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374).
Generative: the completion is run with the tests in the sandbox (nanochat/execution.py).

Local file: <tasks dir>/humaneval/HumanEval.jsonl ({"task_id", "prompt", "canonical_solution",
"test", "entry_point"}, as in openai/human-eval); hub: openai/openai_humaneval.
"""

import os
import re
import secrets

from nanochat.common import NanochatError
from nanochat.execution import execute_code
from tasks.common import Task, load_hub, read_jsonl, resolve_tasks_dir

CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def extract_code(completion, entry_point):
    """The code in a completion: the fenced block defining entry_point (else the first block), else all of it."""
    blocks = CODE_BLOCK_RE.findall(completion)
    if not blocks:
        return completion
    for block in blocks:
        if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
            return block
    return blocks[0]


def build_program(prompt, completion, test, entry_point):
    """
    The program to run: the prompt (imports, helpers, the stub with its docstring), the completion,
    the tests and the call check(entry_point). A completion that redefines entry_point comes after
    the whole prompt, which is valid Python on its own, so helper functions from the prompt stay
    defined; a completion that only continues the body is appended to the prompt directly.
    """
    code = extract_code(completion, entry_point)
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        program = prompt + "\n" + code
    else:
        program = prompt + code
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval (test split only). timeout: wall-clock seconds per program in the sandbox."""

    eval_type = "generative"

    def __init__(self, tasks_dir=None, timeout=5.0, **view):
        super().__init__(**view)
        self.timeout = timeout
        path = os.path.join(resolve_tasks_dir(tasks_dir), "humaneval", "HumanEval.jsonl")
        if os.path.exists(path):
            self._source_files = [os.path.abspath(path)]
            self.rows = []
            for line_number, row in read_jsonl(path):
                if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in FIELDS)):
                    raise NanochatError(f"{path}:{line_number}: expected string fields {', '.join(FIELDS)}")
                self.rows.append(row)
        else:
            self.rows = load_hub("HumanEval", path, "openai/openai_humaneval", None, "test")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, completion):
        """
        True when the program with this completion passes the tests in the sandbox. A fresh random
        token printed after check() must be the last line of output, so that a completion which
        exits early with status 0 (sys.exit(0), os._exit(0)) does not count as passing.
        """
        program = build_program(conversation["messages"][0]["content"], completion, conversation["test"],
                                conversation["entry_point"])
        token = secrets.token_hex(16)
        result = execute_code(f"{program}print({token!r})\n", timeout=self.timeout)
        return result.success and result.stdout.rstrip("\n").endswith(token)
