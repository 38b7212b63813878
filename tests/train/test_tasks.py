"""The demo task suite: deterministic files, disjoint held-out words, and answers checked
against independent implementations (codecs' rot13, str.translate tables)."""

from __future__ import annotations

import codecs
import json
import string
from pathlib import Path

import pytest

from tessera.train import tasks

SHIFT1 = str.maketrans(string.ascii_lowercase,
                       string.ascii_lowercase[1:] + string.ascii_lowercase[:1])
EXPECTED = {
    "reverse": lambda w: "".join(reversed(w)),
    "rot13": lambda w: codecs.encode(w, "rot13"),
    "sort": lambda w: "".join(sorted(w, key=ord)),
    "caesar": lambda w: w.translate(SHIFT1),
    "upper": lambda w: w.translate(str.maketrans(string.ascii_lowercase,
                                                 string.ascii_uppercase)),
    "novowel": lambda w: w.translate({ord(v): None for v in "aeiou"}),
    "double": lambda w: "".join(c * 2 for c in w),
    "atbash": lambda w: w.translate(str.maketrans(string.ascii_lowercase,
                                                  string.ascii_lowercase[::-1])),
    "upper2": lambda w: w.translate(str.maketrans(string.ascii_lowercase,
                                                  string.ascii_uppercase)),
}
TAG = {"upper2": "upper"}  # a new dataset of upper's skill: upper's prompts, other words


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_task_has_an_independent_answer() -> None:
    assert set(tasks.TASKS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_examples_follow_the_fixed_format(name: str) -> None:
    train, held_out = tasks.splits(name, n_train=300, n_eval=50)
    assert len(train) == 300 and len(held_out) == 50
    for example in train + held_out:
        prompt, completion = example["prompt"], example["completion"]
        tag = TAG.get(name, name)
        assert prompt.startswith(f"{tag}: ") and prompt.endswith("\n")
        word = prompt[len(tag) + 2:-1]
        assert len(word) == 5 and set(word) <= set(string.ascii_lowercase)
        assert completion == EXPECTED[name](word) + "\n"
        assert len(completion) > 1  # never an empty answer (novowel keeps a consonant)
    train_words = {e["prompt"] for e in train}
    assert not train_words & {e["prompt"] for e in held_out}  # held out means unseen
    assert len(train_words) == 300  # no duplicates


def test_suite_files_are_reproducible(tmp_path: Path) -> None:
    first = tasks.write_suite(tmp_path / "a", ["rot13", "sort"], n_train=100, n_eval=20)
    second = tasks.write_suite(tmp_path / "b", ["sort", "rot13"], n_train=100, n_eval=20)
    for name in ("rot13", "sort"):
        assert first[name].train.read_bytes() == second[name].train.read_bytes()
        assert first[name].eval.read_bytes() == second[name].eval.read_bytes()
        assert len(read(first[name].train)) == 100 and len(read(first[name].eval)) == 20
    other = tasks.write_suite(tmp_path / "c", ["rot13"], n_train=100, n_eval=20, seed=7)
    assert other["rot13"].train.read_bytes() != first["rot13"].train.read_bytes()


def test_word_lengths_are_selectable() -> None:
    train, held_out = tasks.splits("upper", n_train=200, n_eval=50, lengths=(3, 8))
    lengths = {len(e["prompt"]) - len("upper: \n") for e in train + held_out}
    assert lengths == set(range(3, 9))
    with pytest.raises(ValueError, match="word lengths"):
        tasks.splits("upper", lengths=(4, 2))


def test_held_out_set_does_not_depend_on_the_training_size() -> None:
    _, small = tasks.splits("reverse", n_train=10, n_eval=30)
    _, large = tasks.splits("reverse", n_train=500, n_eval=30)
    assert small == large


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown demo task 'nope'"):
        tasks.splits("nope")


def test_a_new_dataset_of_a_skill_shares_no_word_with_the_original() -> None:
    """upper2 is upper on another draw: same prompts' shape, none of upper's words."""
    train, held_out = tasks.splits("upper")
    upper = {e["prompt"] for e in train + held_out}
    train, held_out = tasks.splits("upper2")
    assert not upper & {e["prompt"] for e in train + held_out}
    assert tasks.splits("upper2") == (train, held_out)  # seeded
