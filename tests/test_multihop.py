"""
tasks/multihop.py: the generator (deterministic, O(1) per example, disjoint splits, one graph per
split, the hop counts asked for) and the verifier (answer and path coverage). The prompts are parsed
back with a regex written here, independently of the generator, and walked to the answer.
"""

import re

import pytest

from nanochat.common import NanochatError
from tasks.common import validate_conversation
from tasks.multihop import BUCKETS, SPLITS, MultiHop, bucket_of, split_names
from tasks.recipe import build_mixture

FACT_RE = re.compile(r"^([A-Z][a-z]+)'s ([a-z]+) is ([A-Z][a-z]+)\.$")
QUESTION_RE = re.compile(r"^Who is ([A-Z][a-z]+)((?:'s [a-z]+)+)\?$")


def parse_prompt(text):
    """({(person, relation): person}, start, [relation, ...]) from a user turn; asserts its shape."""
    *fact_lines, question = text.split("\n")
    facts = {}
    for line in fact_lines:
        person, relation, target = FACT_RE.match(line).groups()
        assert (person, relation) not in facts, f"two facts for {person}'s {relation}: ambiguous"
        facts[person, relation] = target
    start, chain = QUESTION_RE.match(question).groups()
    return facts, start, chain[len("'s "):].split("'s ")


def names_in(conversation):
    facts, start, _ = parse_prompt(conversation["messages"][0]["content"])
    return {start} | {person for person, _ in facts} | set(facts.values())


def reply(conversation):
    return conversation["messages"][1]["content"]


# -----------------------------------------------------------------------------
# Generator


def test_bucket_of():
    assert [bucket_of(h) for h in range(1, 6)] == ["easy", "easy", "medium", "hard", "hard"]
    assert BUCKETS == ("easy", "medium", "hard")
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(NanochatError, match="hops must be ints from 1 to 5"):
            bucket_of(bad)


def test_same_seed_same_examples_other_seed_others():
    a, b, c = MultiHop(seed=0), MultiHop(seed=0), MultiHop(seed=1)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert a.graph == b.graph and a.graph != c.graph
    assert sum(a[i]["messages"] == c[i]["messages"] for i in range(50)) == 0
    # the allowed hop counts are part of the key: restricting them does not give prefixes of the same walks
    starts = [parse_prompt(MultiHop(hops=h)[0]["messages"][0]["content"])[1] for h in range(1, 6)]
    assert len(set(starts)) > 1


def test_example_depends_on_its_index_only():
    forward = [MultiHop(split="val")[i] for i in range(30)]
    backward = MultiHop(split="val")
    assert [backward.get_example(i) for i in reversed(range(30))][::-1] == forward
    last = MultiHop().get_example(19999)  # fresh instance, nothing generated before it
    warm = MultiHop()
    [warm.get_example(i) for i in range(20)]
    assert warm.get_example(19999) == last
    view = MultiHop(start=10, stop=20, step=3)
    assert len(view) == 4 and [view[k] for k in range(4)] == [MultiHop().get_example(10 + 3 * k) for k in range(4)]


def test_splits_are_disjoint():
    pools = {split: set(split_names(split)) for split in SPLITS}
    assert [len(pools[s]) for s in SPLITS] == [1960] * 3
    assert not (pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"])
    used, questions = {}, {}
    for split in SPLITS:
        conversations = [MultiHop(split=split)[i] for i in range(300)]
        used[split] = set().union(*map(names_in, conversations))
        questions[split] = {c["messages"][0]["content"].split("\n")[-1] for c in conversations}
        assert used[split] <= pools[split], split
    # a seed changes the graph, never the pools: train of another seed still shares nothing with test
    other_seed = set().union(*(names_in(MultiHop(seed=7)[i]) for i in range(300)))
    for x, y in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not used[x] & used[y] and not questions[x] & questions[y], (x, y)
    assert not other_seed & used["test"]


def test_one_graph_per_split():
    # every fact of every prompt is an edge of the split's graph: the same person's mentor is always the same
    seen, recurring = {}, 0
    task = MultiHop(split="test", buckets="hard")
    for i in range(300):
        facts, _, _ = parse_prompt(task[i]["messages"][0]["content"])
        for key, target in facts.items():
            recurring += key in seen
            assert seen.setdefault(key, target) == target, key
    assert recurring > 100  # ~2,250 facts drawn from 9,800 edges: enough recur for the check above to bite
    assert all(task.graph[person][relation] == target for (person, relation), target in seen.items())


def test_every_question_is_answerable_from_its_prompt():
    task = MultiHop(split="train", size=400)
    near = 0
    for conversation in task:
        assert validate_conversation(conversation, "multihop")["messages"] == conversation["messages"]
        facts, start, relations = parse_prompt(conversation["messages"][0]["content"])
        walk = [start]
        for relation in relations:
            walk.append(facts[walk[-1], relation])
        hops = conversation["hops"]
        assert len(relations) == hops and conversation["bucket"] == bucket_of(hops)
        assert len(set(walk)) == len(walk)
        assert walk[-1] == conversation["answer"]
        path = [f"{a} -{r}-> {b}" for a, r, b in zip(walk, relations, walk[1:])]
        assert conversation["path"] == path
        assert reply(conversation) == "\n".join(path + [f"ANSWER: {walk[-1]}"])
        distractors = set(facts) - set(zip(walk, relations))
        assert 2 <= len(distractors) <= 4 and len(facts) == hops + len(distractors)
        near += any(person in walk for person, _ in distractors)
    assert 0.5 * len(task) < near < len(task)  # distractors about the path's people, and not only those


@pytest.mark.parametrize("kwargs, allowed", [
    ({}, {1, 2, 3, 4, 5}),
    ({"hops": 3}, {3}),
    ({"hops": [1, 4]}, {1, 4}),
    ({"buckets": "easy"}, {1, 2}),
    ({"buckets": ["medium", "hard"]}, {3, 4, 5}),
])
def test_hop_counts_as_requested(kwargs, allowed):
    task = MultiHop(split="val", size=200, **kwargs)
    hops = [c["hops"] for c in task]
    assert set(hops) == allowed
    assert all(len(c["path"]) == c["hops"] and c["bucket"] == bucket_of(c["hops"]) for c in task)


def test_conversations_stay_short():
    # a tiny model trains at seq_len 256: the longest conversation (5 hops, 4 distractors, 4-letter names) is 376
    lengths = [sum(len(m["content"]) for m in c["messages"]) for c in MultiHop(hops=5, size=500)]
    assert max(lengths) <= 376 and min(lengths) > 250


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "dev"}, "split must be one of 'train', 'val', 'test'"),
    ({"size": 0}, "size must be an int >= 1"),
    ({"size": 2.5}, "size must be an int >= 1"),
    ({"size": True}, "size must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"seed": "0"}, "seed must be an int >= 0"),
    ({"hops": 0}, "hops must be ints from 1 to 5"),
    ({"hops": [2, 6]}, "hops must be ints from 1 to 5"),
    ({"hops": ["3"]}, "hops must be ints from 1 to 5"),
    ({"hops": []}, "hops must not be empty"),
    ({"buckets": "extreme"}, "buckets must be one of 'easy', 'medium', 'hard'"),
    ({"buckets": []}, "buckets must not be empty"),
    ({"hops": 1, "buckets": "easy"}, "give hops or buckets, not both"),
    ({"start": -1}, "start must be an int >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(NanochatError, match=re.escape(message)) as e:
        MultiHop(**kwargs)
    assert str(e.value).startswith("MultiHop: ") and "\n" not in str(e.value)


def test_recipe_names_it():
    mixture = build_mixture({"tasks": [{"task": "MultiHop", "args": {"split": "val", "buckets": "hard", "size": 12}}]},
                            "recipe.json")
    assert len(mixture) == 12 and {c["bucket"] for c in mixture} == {"hard"}


# -----------------------------------------------------------------------------
# Verifier

# Bako -boss-> Tir -mentor-> Lun -rival-> Kem, written by hand.
HAND = {"messages": [{"role": "user", "content": "Lun's rival is Kem.\nTir's mentor is Lun.\nBako's boss is Tir.\n"
                                                 "Lun's friend is Sor.\nWho is Bako's boss's mentor's rival?"},
                     {"role": "assistant",
                      "content": "Bako -boss-> Tir\nTir -mentor-> Lun\nLun -rival-> Kem\nANSWER: Kem"}],
        "hops": 3, "bucket": "medium", "answer": "Kem",
        "path": ["Bako -boss-> Tir", "Tir -mentor-> Lun", "Lun -rival-> Kem"]}


@pytest.mark.parametrize("completion, correct, coverage", [
    ("Bako -boss-> Tir\nTir -mentor-> Lun\nLun -rival-> Kem\nANSWER: Kem", True, 1.0),
    ("Bako -boss-> Tir\nTir -mentor-> Lun\nLun -friend-> Sor\nANSWER: Sor", False, 2 / 3),  # wrong last hop
    ("Bako -boss-> Tir\nANSWER: Kem", True, 1 / 3),                                      # right, trace cut short
    ("ANSWER: Kem", True, 0.0),
    ("Bako -boss-> Tir\nTir -mentor-> Lun\nLun -rival-> Kem", False, 1.0),               # no ANSWER line
    ("Kem", False, 0.0),
    ("", False, 0.0),
    ("  bako   -boss->  TIR \n\ttir -mentor-> lun\nLun -rival-> Kem\n  answer :  kem.  ", True, 1.0),
    ("Bako -boss->Tir\nTir -mentor-> Lun\nANSWER: Kem", True, 1 / 3),                   # only whitespace runs are free
    ("ANSWER: Kem Lun", False, 0.0),
    ("ANSWER:", False, 0.0),
    ("ANSWER: Lun\nANSWER: Kem", False, 0.0),                                            # the first ANSWER line counts
    ("ANSWER: Kem\nBako -boss-> Tir\nTir -mentor-> Lun", True, 0.0),                     # nothing after it counts
    ("Bako -boss-> Tir\nBako -boss-> Tir\nANSWER: Kem", True, 1 / 3),                   # a repeated hop counts once
])
def test_verifier_on_hand_written_replies(completion, correct, coverage):
    task = MultiHop(size=1)
    score = task.score(HAND, completion)
    assert score == {"correct": correct, "coverage": pytest.approx(coverage), "bucket": "medium", "hops": 3}
    assert task.evaluate(HAND, completion) is correct and task.reward(HAND, completion) == float(correct)


def test_verifier_on_generated_examples():
    task = MultiHop(split="test", size=100)
    for conversation in task:
        gold = reply(conversation)
        assert task.score(conversation, gold) == {"correct": True, "coverage": 1.0,
                                                  "bucket": conversation["bucket"], "hops": conversation["hops"]}
        # stop one hop short: the answer is the last-but-one person, coverage (hops - 1) / hops
        *hops, _ = gold.split("\n")
        short = "\n".join(hops[:-1] + [f"ANSWER: {hops[-1].split(' ')[0]}"])
        score = task.score(conversation, short)
        assert not score["correct"] and score["coverage"] == pytest.approx((len(hops) - 1) / len(hops))
