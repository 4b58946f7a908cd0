"""
Conversations from a user's jsonl file: one {"messages": [...]} object (or a bare list of messages)
per line, in the format of tasks/common.py. Every line is validated at load time, so a bad file
fails at start-up with file:line and what is wrong, not hours into training.

Identity is the same with a default file, tasks/data/identity.jsonl: short conversations that
teach the model its name and what it is.
"""

import os

from nanochat.common import NanochatError
from tasks.common import Task, read_jsonl, validate_conversation

DEFAULT_IDENTITY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity.jsonl")


class CustomJSON(Task):
    """Conversations from the jsonl file at `path`."""

    def __init__(self, path, **view):
        super().__init__(**view)
        if not os.path.isfile(path):
            raise NanochatError(f"{type(self).__name__}: no such file {path}")
        self.path = path
        self.conversations = [validate_conversation(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
        if not self.conversations:
            raise NanochatError(f"{path}: no conversations in the file")

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


class Identity(CustomJSON):
    """Identity conversations: `path` (a jsonl of conversations) or the default tasks/data/identity.jsonl."""

    def __init__(self, path=None, **view):
        super().__init__(path or DEFAULT_IDENTITY_FILE, **view)
