"""Tests for synthetic.py: the built-in corpus, its docstring examples, grammar and splits."""
import doctest
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import synthetic  # noqa: E402


GERMAN_GENDER = {de: g for _, translations in synthetic.NOUNS.values() for de, g in translations}
GERMAN_ADJECTIVES = {de for _, ts in synthetic.ADJECTIVES.values() if ts for de in ts} | {"leicht", "hell"}


def test_synthetic_docstring_examples_and_determinism():
    assert doctest.testmod(synthetic).failed == 0        # the examples printed in the docstring
    assert synthetic.synthetic_corpus(50, seed=7) == synthetic.synthetic_corpus(50, seed=7)
    assert synthetic.synthetic_corpus(50, seed=7) != synthetic.synthetic_corpus(50, seed=8)
    assert synthetic.synthetic_corpus(3, seed=0)[2] == (
        "the blue bird paints a small bag on the heavy dog again",
        "der vogel blau wieder auf dem hund schwer eine tasche klein malt")


def test_synthetic_word_order_and_agreement():
    for src, tgt in synthetic.synthetic_corpus(2000, seed=11):
        en, de = src.split(), tgt.split()
        assert 5 <= len(en) <= 15
        verb = next(w for w in en if w in synthetic.VERBS)
        context = {"eats": ["isst", "frisst"], "takes": ["benutzt", "nimmt"]}
        assert de[-1] in (synthetic.VERBS[verb][1] or context[verb])        # the verb moves to the end
        assert en[-1] != verb
        for k, word in enumerate(de):
            if word in GERMAN_GENDER:   # determiner right before the noun, of the noun's gender
                assert any(de[k - 1] == by_gender[GERMAN_GENDER[word]]
                           for by_gender in synthetic.DETERMINERS.values()), tgt
            if word in GERMAN_ADJECTIVES:   # adjectives follow their noun
                assert de[k - 1] in GERMAN_GENDER or de[k - 1] in GERMAN_ADJECTIVES, tgt


def test_synthetic_words_translate_in_context():
    seen = set()
    for src, tgt in synthetic.synthetic_corpus(3000, seed=12):
        en, de = src.split(), tgt.split()
        if "takes" in en:
            obj = next(w for w in en[en.index("takes"):] if w in synthetic.NOUNS)
            assert de[-1] == ("benutzt" if synthetic.NOUNS[obj][0] == "vehicle" else "nimmt")
            seen.add(de[-1])
        if "eats" in en:
            subject = next(w for w in en if w in synthetic.NOUNS)
            assert de[-1] == ("frisst" if synthetic.NOUNS[subject][0] == "animal" else "isst")
            seen.add(de[-1])
        if "light" in en:
            noun = next(w for w in en[en.index("light"):] if w in synthetic.NOUNS)
            assert ("leicht" if synthetic.NOUNS[noun][0] in ("food", "thing") else "hell") in de
            seen.add("leicht" if "leicht" in de else "hell")
    assert seen == {"benutzt", "nimmt", "frisst", "isst", "leicht", "hell"}


def test_synthetic_is_multimodal():
    targets = defaultdict(set)
    for src, tgt in synthetic.synthetic_corpus(5000, seed=0):
        targets[src].add(tgt)
    assert any(len(ts) > 1 for ts in targets.values())   # one source, two valid translations
    # variants=False: same sources, always the mode; about 30% of the sampled targets differ
    sampled = synthetic.synthetic_corpus(2000, seed=1)
    modes = synthetic.synthetic_corpus(2000, seed=1, variants=False)
    assert [s for s, _ in sampled] == [s for s, _ in modes]
    differ = sum(a != b for (_, a), (_, b) in zip(sampled, modes)) / 2000
    assert 0.2 < differ < 0.45
    # the PP sometimes comes before the object: "auf dem ..." before the accusative object
    assert synthetic.synthetic_corpus(4, seed=0)[3][1] == "ein pferd auf dem garten eine suppe moechte"
    assert synthetic.synthetic_corpus(4, seed=0, variants=False)[3][1] == "ein pferd eine suppe auf dem garten will"


def test_builtin_splits():
    splits = synthetic.builtin_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 20000, "valid": 500, "test": 500}
    train_src = {s for s, _ in splits["train"]}
    valid_src = {s for s, _ in splits["valid"]}
    test_src = {s for s, _ in splits["test"]}
    assert len(valid_src) == 500 and len(test_src) == 500          # no repeats inside a split
    assert not (valid_src & train_src) and not (test_src & train_src) and not (valid_src & test_src)
    assert splits["train"][:5] == synthetic.synthetic_corpus(5, seed=1)
