"""
Runs scripts/chat_rl.py or scripts/chat_rsft.py under torchrun with GSM8K's judge replaced by a
length-parity rule (a random model then gets mixed groups, so every part of the update runs), for
tests/test_rl.py:

    torchrun --standalone --nproc_per_node=2 tests/helpers/rl_ddp_worker.py chat_rl|chat_rsft SCRIPT_ARGS...

One run per process: a second init_process_group in the same torchrun workers can pick up the
first group's rendezvous keys from torchrun's store and hang.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from scripts import chat_rl, chat_rsft  # noqa: E402
from tasks.gsm8k import GSM8K  # noqa: E402


def parity_judge(self, conversation, completion):
    return len(completion) % 2 == 0


if __name__ == "__main__":
    GSM8K.evaluate = parity_judge
    {"chat_rl": chat_rl, "chat_rsft": chat_rsft}[sys.argv[1]].main(sys.argv[2:])
