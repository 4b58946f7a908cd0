"""
General chat conversations for midtraining and SFT, SmolTalk-style (Allal et al. 2025, "SmolLM2",
arXiv:2502.02737; hub: HuggingFaceTB/smol-smoltalk, splits train/test).

Local files: every *.jsonl in the chat directory ($NANOCHAT_CHAT_DIR, default the tasks dir's sibling
chat/), one {"messages": [...]} conversation per line (see tasks/common.py), read in sorted file
order. Local files have no split: every TEST_EVERY-th conversation is held out as "test".
The split's lines are all parsed and validated when the task is made (tasks.customjson.parse_conversation),
so a bad line stops the run at start-up with file:line, not hours into training. Hub rows are
validated as they are read.
"""

import glob
import os

from nanochat.common import NanochatError
from tasks.common import Task, check_choice, load_hub, resolve_chat_dir, validate_conversation
from tasks.customjson import parse_conversation, read_lines

TEST_EVERY = 100  # 1% held out: ~440 conversations of the shared chat data


class SmolTalk(Task):
    """Chat conversations. split: "train" | "test"; files: None (all *.jsonl) or names in the chat dir."""

    def __init__(self, split="train", files=None, tasks_dir=None, **view):
        super().__init__(**view)
        check_choice("SmolTalk", "split", split, ("train", "test"))
        directory = resolve_chat_dir(tasks_dir)
        paths = sorted(glob.glob(os.path.join(directory, "*.jsonl"))) if files is None else [
            os.path.join(directory, name) for name in files]
        self.split, self.conversations, self.rows = split, None, None
        if paths:
            for path in paths:
                if not os.path.isfile(path):
                    raise NanochatError(f"SmolTalk: no such chat file {path}")
            self._source_files = [os.path.abspath(path) for path in paths]
            lines = [(path, n, line) for path in paths for n, line in read_lines(path)]
            held_out = split == "test"
            self.conversations = [parse_conversation(line, f"{path}:{n}") for i, (path, n, line) in enumerate(lines)
                                  if (i % TEST_EVERY == 0) == held_out]
        else:
            self.rows = load_hub("SmolTalk", directory, "HuggingFaceTB/smol-smoltalk", None, split)

    def num_examples(self):
        return len(self.conversations) if self.conversations is not None else len(self.rows)

    def get_example(self, index):
        if self.conversations is not None:
            return self.conversations[index]
        return validate_conversation(self.rows[index], f"HuggingFaceTB/smol-smoltalk[{self.split}][{index}]")
