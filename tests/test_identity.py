"""The identity generator (tasks/identity_gen.py), its CLI (scripts/identity.py) and where Identity finds its file."""

import json
from collections import Counter

import pytest

from nanochat.common import NanochatError
from scripts import identity as identity_cli
from tasks.common import assistant_text, validate_conversation
from tasks.customjson import DEFAULT_IDENTITY_FILE, CustomJSON, Identity
from tasks.identity_gen import FOLLOW_UPS, GREETINGS, INTENTS, MAX_TEXT_LEN, generate_identity
from tasks.recipe import build_mixture

NAME, CREATOR = "Zorblax-7", "Quinn Example"


def normalize(question):
    """A user message back to its template phrasing: no greeting or follow-up prefix, lowercase, no final mark."""
    text = question.lower()
    for prefix in [g.lower() for g in GREETINGS] + [f.lower() for f, _ in FOLLOW_UPS]:
        text = text.removeprefix(prefix)
    return text.rstrip("?.!")


def exchanges(conversations):
    """(user text, assistant text) of every exchange."""
    for c in conversations:
        turns = [m for m in c["messages"] if m["role"] != "system"]
        for user, assistant in zip(turns[::2], turns[1::2]):
            yield user["content"], assistant_text(assistant)


def test_same_seed_same_conversations_other_seed_others():
    a = generate_identity(NAME, CREATOR, n=300, seed=5)
    assert a == generate_identity(NAME, CREATOR, n=300, seed=5)
    b = generate_identity(NAME, CREATOR, n=300, seed=6)
    assert a != b
    assert sum(x == y for x, y in zip(a, b)) < 100  # not one shifted element: mostly different


@pytest.mark.parametrize("n", [1, 7, 2000])
def test_n_valid_conversations(n):
    conversations = generate_identity(NAME, CREATOR, n=n)
    assert len(conversations) == n
    for i, c in enumerate(conversations):
        assert validate_conversation(c, f"conversation {i}") == c


def test_variety_of_phrasings_intents_and_turns():
    conversations = generate_identity(NAME, CREATOR, n=2000)
    phrasing_intent = {normalize(q): k for k, intent in INTENTS.items() for q in intent.questions}
    # one phrasing, one intent: otherwise a question would get answers that contradict each other
    for k, intent in INTENTS.items():
        assert all(phrasing_intent[normalize(q)] == k for q in intent.questions), k
    asked = Counter(phrasing_intent.get(normalize(q)) for q, _ in exchanges(conversations))
    assert len({normalize(q) for q, _ in exchanges(conversations)} & set(phrasing_intent)) >= 30
    assert len(set(asked) - {None}) >= 6
    turns = Counter(sum(m["role"] == "user" for m in c["messages"]) for c in conversations)
    assert set(turns) == {1, 2, 3} and turns[2] > 100 and turns[3] > 50
    assert any(c["messages"][0]["role"] == "system" for c in conversations)
    assert any(isinstance(m["content"], list) for c in conversations for m in c["messages"])  # the python tool
    questions = [q for q, _ in exchanges(conversations)]
    assert any(q.islower() for q in questions) and any(q[-1].isalpha() for q in questions)  # casing, punctuation
    assert any(q.startswith(GREETINGS) for q in questions)


def test_name_in_every_answer_to_a_name_question_and_most_others():
    conversations = generate_identity(NAME, CREATOR, n=2000, seed=3)
    name_questions = {normalize(q) for intent in INTENTS.values() if intent.asks_name for q in intent.questions}
    pairs = list(exchanges(conversations))
    asked = [(q, a) for q, a in pairs if normalize(q) in name_questions]
    assert len(asked) > 500 and any(normalize(q) == "what is your name" for q, _ in asked)
    missing = [(q, a) for q, a in asked if NAME not in a]
    assert not missing, missing[:3]
    assert sum(NAME in a for _, a in pairs) > 0.7 * len(pairs)
    assert any(CREATOR in a for q, a in pairs if "who made you" in q.lower())


def test_facts_appear_in_some_answers():
    fact = "I was trained on one GPU in four hours."
    answers = [a for _, a in exchanges(generate_identity(NAME, CREATOR, n=500, facts=[fact]))]
    assert 0 < sum(fact in a for a in answers) < len(answers)


@pytest.mark.parametrize("name, creator, match", [
    ("", CREATOR, "--name must not be empty"),
    ("   ", CREATOR, "--name must not be empty"),
    ("Ada\nLovelace", CREATOR, "--name must be one line"),
    ("x" * (MAX_TEXT_LEN + 1), CREATOR, f"--name is {MAX_TEXT_LEN + 1} characters long; at most {MAX_TEXT_LEN}"),
    (NAME, "me\r", None),  # surrounding whitespace is stripped, not an error
    (NAME, "a\tb", "--creator must be one line"),
    (NAME, "", "--creator must not be empty"),
])
def test_bad_name_or_creator(name, creator, match):
    if match is None:
        assert generate_identity(name, creator, n=3)
        return
    with pytest.raises(NanochatError, match=match) as e:
        generate_identity(name, creator, n=3)
    assert "\n" not in str(e.value)


def test_bad_n():
    with pytest.raises(NanochatError, match="--n must be an int >= 1, got 0"):
        generate_identity(NAME, CREATOR, n=0)


def test_cli_writes_a_file_customjson_loads(tmp_path, capsys):
    out = tmp_path / "sub" / "ada.jsonl"
    identity_cli.main(["--name", "Ada", "--creator", "the Lovelace lab", "--n", "50", "--seed", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert str(out) in printed and " 50 " in printed and printed.count("--- sample") == 3
    task = CustomJSON(str(out))
    assert len(task) == 50
    assert list(task) == generate_identity("Ada", "the Lovelace lab", n=50, seed=2)
    assert not list(out.parent.glob("*.tmp.*"))


def test_cli_rejects_a_bad_name(tmp_path):
    with pytest.raises(NanochatError, match="--name"):
        identity_cli.main(["--name", "two\nlines", "--creator", "me", "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_identity_lookup_order(tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_IDENTITY_FILE", raising=False)
    assert Identity().path == DEFAULT_IDENTITY_FILE  # nothing generated yet

    identity_cli.main(["--name", "Ada", "--creator", "me", "--n", "20"])  # default --out: the base dir
    generated = base_dir / "identity" / "identity.jsonl"
    assert Identity().path == str(generated) and len(Identity()) == 20
    mixture = build_mixture({"tasks": [{"task": "Identity"}]}, str(tmp_path / "recipe.json"))
    assert "Ada" in json.dumps(list(mixture))  # a recipe's Identity without a path reads it too

    identity_cli.main(["--name", "Bob", "--creator", "me", "--n", "7", "--out", str(tmp_path / "bob.jsonl")])
    monkeypatch.setenv("NANOCHAT_IDENTITY_FILE", str(tmp_path / "bob.jsonl"))
    assert len(Identity()) == 7

    assert Identity(path=DEFAULT_IDENTITY_FILE).path == DEFAULT_IDENTITY_FILE  # an explicit path wins

    monkeypatch.setenv("NANOCHAT_IDENTITY_FILE", str(tmp_path / "missing.jsonl"))
    with pytest.raises(NanochatError, match=r"no such file .*missing.jsonl \(\$NANOCHAT_IDENTITY_FILE\)"):
        Identity()
