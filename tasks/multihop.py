"""
MultiHop: multi-hop reasoning over a generated knowledge graph, with a checkable trace and answer.

Each split (train, val, test) is its own graph of made-up people (1-2 syllable names: "Tir", "Bako")
and five relations; everyone has exactly one boss, doctor, friend, mentor and rival (never
themselves), drawn at random. A question follows 1 to 5 relations from a start person. The user
turn lists the facts it needs plus 2 to 4 distractor facts from the same graph (half about people on
the path, which tempt a wrong relation or one hop too many, half about anyone), shuffled, then the
question. The assistant turn is the trace, one hop per line, then the answer:

    user       Tir's mentor is Lun.
               Bako's boss is Tir.
               Lun's rival is Bako.
               Kem's friend is Tir.
               Who is Bako's boss's mentor?
    assistant  Bako -boss-> Tir
               Tir -mentor-> Lun
               ANSWER: Lun

The question reads in hop order and every hop line is one fact of the prompt rewritten, so a tiny
model can learn it by copying. Buckets by hop count: easy = 1-2, medium = 3, hard = 4-5. A 5-hop
conversation with 4 distractors is at most 376 characters; rendered with a 4,096-token BPE trained on
3 MB of the pretraining text, 1 hop is ~80 tokens and 5 hops ~185 (at most ~210), inside seq_len 256.

Deterministic: the names are dealt once into three disjoint pools by a fixed shuffle, the same for
every seed, so no name (hence no fact or question) is shared between splits. A split's graph comes
from (seed, split); example i from (seed, split, allowed hop counts, i) alone, so it is built in
O(1), without the ones before it, and is the same on every run and machine.

Verifier: a reply is read up to its first "ANSWER:" line (label in any case). The answer is the rest
of that line, compared with the gold name ignoring case, surrounding whitespace and a final "."; a
reply without an ANSWER line is wrong. The trace is the lines before it; coverage is the share of
the gold hops found among them (a line matches a hop ignoring case and runs of whitespace).
Coverage is recall: extra lines cost nothing, so a reply that lists every fact of the prompt as a
hop gets full coverage. That is why the RL reward is correctness alone (Task.reward: 1.0 or 0.0)
and coverage a diagnostic, reported by score().
"""

import os
import random
import re
from functools import lru_cache

from nanochat.common import NanochatError
from tasks.common import Task, check_choice

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
BUCKETS = ("easy", "medium", "hard")
MAX_HOPS = 5
RELATIONS = ("boss", "doctor", "friend", "mentor", "rival")  # one word each: one or two BPE tokens
MIN_DISTRACTORS, MAX_DISTRACTORS = 2, 4
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
ANSWER_RE = re.compile(r"\s*answer\s*:(.*)", re.IGNORECASE)


def bucket_of(hops):
    """The bucket of a hop count: 1-2 "easy", 3 "medium", 4-5 "hard". NanochatError for anything else."""
    if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops <= MAX_HOPS:
        raise NanochatError(f"MultiHop: hops must be ints from 1 to {MAX_HOPS}, got {hops!r}")
    return "easy" if hops <= 2 else "medium" if hops == 3 else "hard"


@lru_cache(maxsize=None)
def split_names(split):
    """The people of a split: every third name (CVC "Tir" or CVCV "Bako", 5,880 in all) of a fixed shuffle."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    names = sorted([s + c for s in syllables for c in CONSONANTS] + [a + b for a in syllables for b in syllables])
    random.Random("MultiHop-names").shuffle(names)
    return tuple(name.capitalize() for name in names[SPLITS.index(split)::len(SPLITS)])


def parse_reply(text):
    """(trace lines, answer) of a reply: the lines before its first ANSWER line, and the rest of that
    line stripped of whitespace and a final "." (None when there is no ANSWER line)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = ANSWER_RE.match(line)
        if m:
            return lines[:i], m.group(1).strip().rstrip(".").strip()
    return lines, None


def _normalize(text):
    return " ".join(text.split()).lower()


def _hop_counts(hops, buckets):
    """The sorted hop counts that hops (int or list) or buckets (name or list) allow; all without either."""
    if hops is not None and buckets is not None:
        raise NanochatError("MultiHop: give hops or buckets, not both")
    if buckets is not None:
        buckets = list(buckets) if isinstance(buckets, (list, tuple)) else [buckets]
        if not buckets:
            raise NanochatError("MultiHop: buckets must not be empty")
        for bucket in buckets:
            check_choice("MultiHop", "buckets", bucket, BUCKETS)
        return [h for h in range(1, MAX_HOPS + 1) if bucket_of(h) in buckets]
    if hops is None:
        return list(range(1, MAX_HOPS + 1))
    hops = list(hops) if isinstance(hops, (list, tuple)) else [hops]
    if not hops:
        raise NanochatError("MultiHop: hops must not be empty")
    for h in hops:
        bucket_of(h)  # validates
    return sorted(set(hops))


class MultiHop(Task):
    """
    Multi-hop questions over a generated knowledge graph (format and rules in the module docstring).

    split: "train" | "val" | "test", each its own graph over its own names.
    size: number of examples, an int >= 1 (default 20000 for train, 1000 for val and test).
    hops: an int or a list of ints from 1 to 5, the hop counts to draw from (uniformly); or
    buckets: a bucket name or a list of them ("easy", "medium", "hard"); neither means all of 1 to 5.
    seed: an int >= 0; the graph follows from (seed, split), example i from (seed, split, hop counts, i).
    Raises NanochatError with a one-line message naming the bad argument.

    Conversations carry "hops", "bucket", "answer" (a name) and "path" (the gold hop lines).
    """

    eval_type = "generative"
    buckets = BUCKETS  # the declared bucket order: nanochat/chat_eval.py reports accuracy per bucket

    def __init__(self, split="train", size=None, hops=None, buckets=None, seed=0, **view):
        super().__init__(**view)
        check_choice("MultiHop", "split", split, SPLITS)
        size = DEFAULT_SIZES[split] if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise NanochatError(f"MultiHop: size must be an int >= 1, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise NanochatError(f"MultiHop: seed must be an int >= 0, got {seed!r}")
        self.split, self.size, self.seed = split, size, seed
        self._source_files = [os.path.abspath(__file__)]  # generated: the generator is the source
        self.hops = _hop_counts(hops, buckets)
        # The graph: person -> relation -> person, the target drawn among everyone else.
        rng = random.Random(f"MultiHop-graph-{seed}-{split}")
        self.people = split_names(split)
        n = len(self.people)
        self.graph = {}
        for i, person in enumerate(self.people):
            targets = [rng.randrange(n - 1) for _ in RELATIONS]
            self.graph[person] = {r: self.people[j + (j >= i)] for r, j in zip(RELATIONS, targets)}

    def num_examples(self):
        return self.size

    def get_example(self, index):
        # The allowed hop counts are part of the key: MultiHop(hops=1)[i] is not a prefix of MultiHop(hops=5)[i].
        rng = random.Random(f"MultiHop-{self.seed}-{self.split}-{self.hops}-{index}")
        hops = rng.choice(self.hops)
        while True:  # a walk through hops + 1 different people (a revisit is rare: ~0.5% at 5 hops)
            walk = [rng.choice(self.people)]
            relations = [rng.choice(RELATIONS) for _ in range(hops)]
            for relation in relations:
                walk.append(self.graph[walk[-1]][relation])
            if len(set(walk)) == len(walk):
                break
        facts = list(zip(walk, relations, walk[1:]))
        path = [f"{a} -{r}-> {b}" for a, r, b in facts]
        # Distractors: other facts of the graph, never a (person, relation) the path uses, so that
        # every question has one reading. Half are about people on the path (the answer included).
        used = set(zip(walk, relations))
        num_facts = hops + rng.randint(MIN_DISTRACTORS, MAX_DISTRACTORS)
        while len(facts) < num_facts:
            person = rng.choice(walk) if rng.random() < 0.5 else rng.choice(self.people)
            relation = rng.choice(RELATIONS)
            if (person, relation) not in used:
                used.add((person, relation))
                facts.append((person, relation, self.graph[person][relation]))
        rng.shuffle(facts)
        question = f"Who is {walk[0]}" + "".join(f"'s {r}" for r in relations) + "?"
        user = "\n".join([f"{a}'s {r} is {b}." for a, r, b in facts] + [question])
        assistant = "\n".join(path + [f"ANSWER: {walk[-1]}"])
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                "hops": hops, "bucket": bucket_of(hops), "answer": walk[-1], "path": path}

    def score(self, conversation, completion):
        """{"correct": bool, "coverage": float in [0, 1], "bucket": str, "hops": int} for a completion (str)."""
        trace, answer = parse_reply(completion)
        gold = {_normalize(hop) for hop in conversation["path"]}
        found = gold & {_normalize(line) for line in trace}
        correct = answer is not None and _normalize(answer) == _normalize(conversation["answer"])
        return {"correct": correct, "coverage": len(found) / len(gold),
                "bucket": conversation["bucket"], "hops": conversation["hops"]}

    def evaluate(self, conversation, completion):
        """Whether the completion's ANSWER line names the gold answer (reward(): 1.0 if so, else 0.0)."""
        return self.score(conversation, completion)["correct"]
