"""
Conversations from a user's jsonl file: one {"messages": [...]} object (or a bare list of messages)
per line, in the format of tasks/common.py. Every line is validated at load time (UTF-8, JSON, the
conversation format: parse_conversation, also used by tasks/smoltalk.py), so a bad file fails at
start-up with file:line and what is wrong, not hours into training.

Identity is the same with a default file: short conversations that teach the model its name and
what it is. The file is looked up in the order of its docstring, so that a set generated with
`python -m scripts.identity --name NAME --creator WHO` reaches the mid and SFT recipes unedited.
"""

import json
import os
import re

from nanochat.common import NanochatError, get_base_dir
from tasks.common import Task, validate_conversation

DEFAULT_IDENTITY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity.jsonl")


# a JSON escape of a UTF-16 surrogate: valid pairs decode to one character, a lone one to a str that
# is not UTF-8 (tiktoken would silently replace it); only lines with one get the slower full check
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def read_lines(path):
    """[(line_number, line bytes)] of the file's non-blank lines. Raises NanochatError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise NanochatError(f"cannot read chat file {path}: {e.strerror}") from None


def parse_conversation(line, where):
    """
    One jsonl line (bytes) -> the conversation it holds, validated (tasks.common.validate_conversation).
    A UTF-8 byte order mark at the start is allowed. Raises NanochatError("<where>: <what is wrong>")
    for bytes that are not UTF-8, invalid JSON, a lone surrogate escape or a malformed conversation.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanochatError(f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1})") from None
    try:
        obj = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise NanochatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    conversation = validate_conversation(obj, where)
    if _SURROGATE_ESCAPE.search(line):
        for i, message in enumerate(conversation["messages"]):
            content = message["content"]
            for text in [content] if isinstance(content, str) else [part["text"] for part in content]:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise NanochatError(f"{where}: message {i} has a lone surrogate \\u{ord(text[e.start]):04x}, "
                                        "not valid UTF-8 text") from None
    return conversation


class CustomJSON(Task):
    """Conversations from the jsonl file at `path`."""

    def __init__(self, path, **view):
        super().__init__(**view)
        if not os.path.isfile(path):
            raise NanochatError(f"{type(self).__name__}: no such file {path}")
        self.path = path
        self._source_files = [os.path.abspath(path)]
        self.conversations = [parse_conversation(line, f"{path}:{n}") for n, line in read_lines(path)]
        if not self.conversations:
            raise NanochatError(f"{path}: no conversations in the file")

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def generated_identity_file():
    """Where scripts/identity.py writes by default: <base_dir>/identity/identity.jsonl."""
    return os.path.join(get_base_dir(), "identity", "identity.jsonl")


class Identity(CustomJSON):
    """
    Identity conversations from a jsonl file, the first that applies of:
    1. `path`, when given (a recipe's "args": {"path": ...});
    2. $NANOCHAT_IDENTITY_FILE, when set (a NanochatError names the variable if the file is missing);
    3. <base_dir>/identity/identity.jsonl, when it exists (scripts/identity.py's default output);
    4. tasks/data/identity.jsonl, the default identity "nanochat".
    """

    def __init__(self, path=None, **view):
        if not path and os.environ.get("NANOCHAT_IDENTITY_FILE"):
            path = os.environ["NANOCHAT_IDENTITY_FILE"]
            if not os.path.isfile(path):
                raise NanochatError(f"Identity: no such file {path} ($NANOCHAT_IDENTITY_FILE)")
        elif not path:
            path = generated_identity_file()
            path = path if os.path.isfile(path) else DEFAULT_IDENTITY_FILE
        super().__init__(path, **view)
