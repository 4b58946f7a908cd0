"""
Synthetic spelling tasks from a word list, for a skill tokenization hides: a word is one or two
tokens, so the model cannot see its letters unless it learns to spell them out.

SpellingBee: "How many r are in strawberry?" The answer spells the word, counts by hand, checks the
count with a python tool call and ends in "#### <count>". SimpleSpelling: spell a word letter by letter.
Examples are generated from their index with a string-seeded random.Random, so item i is the same
on every run and machine; train and test use different seeds.

Word list: `words_file` > $NANOCHAT_WORDS_FILE > $NANOCHAT_DATA_ROOT/words/words_alpha.txt > the tasks
dir's sibling words/words_alpha.txt (dwyl/english-words words_alpha.txt: one lowercase word per line).
"""

import os
import random
import re
import string
from functools import lru_cache

from nanochat.common import NanochatError
from tasks.common import Task, assistant_text, check_choice, resolve_words_file

COUNT_QUESTIONS = [
    "How many {letter} are in {word}?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the {letter}'s in the word {word}.",
    "how many {letter}s in {word}",
    "In the word \"{word}\", how many times does {letter} occur?",
    "What is the number of '{letter}' in '{word}'?",
    "How many {letter}'s does {word} have?",
    "Tell me how many times '{letter}' shows up in {word}.",
]
SPELL_QUESTIONS = [
    "Spell the word: {word}",
    "How do you spell {word}?",
    "Spell '{word}' letter by letter.",
    "Can you spell {word} for me?",
    "Write out the letters of \"{word}\".",
]
COUNT_RE = re.compile(r"####\s*(\d+)")


@lru_cache(maxsize=4)
def _read_words(path):
    with open(path, encoding="utf-8") as f:
        words = [w for w in (line.strip().lower() for line in f) if w.isascii() and w.isalpha()]
    if not words:
        raise NanochatError(f"{path}: no words in the word list")
    return words


def load_words(task, words_file=None, tasks_dir=None):
    path = words_file or resolve_words_file(tasks_dir)
    if not os.path.isfile(path):
        raise NanochatError(f"{task}: no word list at {path} (set NANOCHAT_WORDS_FILE, e.g. to words_alpha.txt "
                            "from github.com/dwyl/english-words, or NANOCHAT_DATA_ROOT)")
    return _read_words(os.path.abspath(path))


class _WordTask(Task):
    eval_type = "generative"

    def __init__(self, size, split, words_file, tasks_dir, view):
        super().__init__(**view)
        name = type(self).__name__
        if not isinstance(size, int) or size < 1:
            raise NanochatError(f"{name}: size must be an int >= 1, got {size!r}")
        check_choice(name, "split", split, ("train", "test"))
        self.size, self.split = size, split
        self.words = load_words(name, words_file, tasks_dir)
        # the examples are generated from the words by this module's code: both are sources
        self._source_files = [os.path.abspath(words_file or resolve_words_file(tasks_dir)), os.path.abspath(__file__)]

    def num_examples(self):
        return self.size

    def _rng(self, index):
        return random.Random(f"{type(self).__name__}-{self.split}-{index}")


class SpellingBee(_WordTask):
    """Letter counting with a python tool call. size: number of examples; split: "train" | "test"."""

    def __init__(self, size=1000, split="train", words_file=None, tasks_dir=None, **view):
        super().__init__(size, split, words_file, tasks_dir, view)

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        # Mostly letters of the word; sometimes another letter, so that 0 is a possible answer too.
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)
        positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
        by_hand = (f"'{letter}' is at position{'s' if count > 1 else ''} {', '.join(positions)}, so I count {count}."
                   if count else f"'{letter}' does not appear, so I count 0.")
        times = "time" if count == 1 else "times"
        parts = [
            {"type": "text", "text": f"Spelling out '{word}': {','.join(word)}\n{by_hand}\n\nChecking with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} {times} in '{word}'.\n\n#### {count}"},
        ]
        question = rng.choice(COUNT_QUESTIONS).format(letter=letter, word=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion):
        reference = COUNT_RE.findall(assistant_text(conversation["messages"][-1]))[-1]
        predicted = COUNT_RE.findall(completion)
        return bool(predicted) and int(predicted[-1]) == int(reference)


class SimpleSpelling(_WordTask):
    """Spell a word as comma-separated letters. size: number of examples; split: "train" | "test"."""

    def __init__(self, size=1000, split="train", words_file=None, tasks_dir=None, **view):
        super().__init__(size, split, words_file, tasks_dir, view)

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        question = rng.choice(SPELL_QUESTIONS).format(word=word)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": ",".join(word)}]}

    def evaluate(self, conversation, completion):
        """Correct when the completion's letters, ignoring separators and case, are the word's."""
        word = conversation["messages"][-1]["content"].replace(",", "")
        return re.sub(r"[^a-z]", "", completion.lower()) == word
