"""Tests for span_corruption.py: T5 span corruption and the vocabulary with sentinels."""
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import span_corruption  # noqa: E402
import synthetic  # noqa: E402
from data import SPECIALS, UserError  # noqa: E402
from test_data import save_and_load  # noqa: E402


SENTINELS = [100, 101, 102, 103, 104, 105, 106, 107]


class ScriptedRng:
    """Stands in for random.Random: sample() returns the given answers in turn."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def sample(self, population, k):
        answer = self.answers.pop(0)
        assert len(answer) == k and all(a in population for a in answer)
        return answer


def uncorrupt(input_ids, target_ids, sentinels=SENTINELS):
    """Put every span of the target back in place of its sentinel in the input."""
    spans, current = {}, None
    for i in target_ids:
        if i in sentinels:
            current = spans[i] = []
        else:
            current.append(i)
    return [j for i in input_ids for j in (spans[i] if i in sentinels else [i])]


def test_span_corrupt_hand_example():
    # 20 tokens 10..29, density 0.15 -> round(3.0) = 3 noise tokens; mean span length 1.5 ->
    # round(3 / 1.5) = 2 spans. The rng cuts the 3 noise tokens at 1 -> spans of 1 and 2; the 17
    # kept tokens (+ 2) at 5 and 12 -> gaps 5, 7, 7, minus 1 at both ends -> 4, 7, 6:
    #   keep 10 11 12 13 | drop 14 | keep 15 .. 21 | drop 22 23 | keep 24 .. 29
    ids = list(range(10, 30))
    inp, tgt = span_corruption.span_corrupt(ids, SENTINELS, ScriptedRng([1], [12, 5]), noise_density=0.15,
                                 mean_span_length=1.5)
    assert inp == [10, 11, 12, 13, 100, 15, 16, 17, 18, 19, 20, 21, 101, 24, 25, 26, 27, 28, 29]
    assert tgt == [100, 14, 101, 22, 23]
    # T5's defaults on the same sentence: 3 noise tokens in round(3 / 3) = 1 span
    inp, tgt = span_corruption.span_corrupt(ids, SENTINELS, ScriptedRng([], [16]))  # gaps 16, 3 -> 15, 2
    assert inp == list(range(10, 25)) + [100, 28, 29] and tgt == [100, 25, 26, 27]
    # a span may start the sentence (gap 0 before it): T5's code would never drop the first token
    inp, tgt = span_corruption.span_corrupt(ids, SENTINELS, ScriptedRng([], [1]))  # gaps 1, 18 -> 0, 17
    assert inp == [100] + list(range(13, 30)) and tgt == [100, 10, 11, 12]


def test_span_corrupt_counts_and_reconstruction():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 60)
        ids = [rng.randint(10, 99) for _ in range(L)]
        inp, tgt = span_corruption.span_corrupt(ids, SENTINELS, rng)
        n_noise = max(1, min(round(L * 0.15), L - 1))
        n_spans = max(1, min(round(n_noise / 3), n_noise, L - n_noise + 1))
        used = SENTINELS[:n_spans]
        assert [i for i in inp if i in SENTINELS] == used          # one sentinel per span, in order
        assert [i for i in tgt if i in SENTINELS] == used and tgt[0] == used[0]
        assert len(tgt) == n_noise + n_spans and len(inp) == L - n_noise + n_spans
        assert uncorrupt(inp, tgt) == ids
        assert all(not (a in SENTINELS and b in SENTINELS) for a, b in zip(inp, inp[1:]))  # spans apart
    assert span_corruption.span_corrupt([42], SENTINELS, rng) == ([100], [100, 42])   # 1 token: it is the span
    with pytest.raises(ValueError):
        span_corruption.span_corrupt([], SENTINELS, rng)
    with pytest.raises(UserError, match="needs 5 sentinels.*--sentinels"):
        span_corruption.span_corrupt(list(range(10, 110)), SENTINELS[:4], rng)     # 15 noise tokens, 5 spans


def test_span_corruption_examples_are_deterministic_and_unbiased():
    sentences = [list(range(10, 10 + n)) for n in (5, 10, 20, 100)] * 50
    a = span_corruption.span_corruption_examples(sentences, SENTINELS, seed=1, epoch=1)
    assert a == span_corruption.span_corruption_examples(sentences, SENTINELS, seed=1, epoch=1)
    assert a != span_corruption.span_corruption_examples(sentences, SENTINELS, seed=1, epoch=2)   # fresh noise
    long = [tgt for (_, tgt), ids in zip(a, sentences) if len(ids) == 100]
    assert all(len(tgt) == 15 + 5 for tgt in long)   # 100 tokens: 15 dropped in 5 spans (mean 3)
    # one-span 10-token sentences: every position gets dropped sometimes, the first and last too
    dropped = {i for (_, tgt), ids in zip(a, sentences) if len(ids) == 10 for i in tgt} - set(SENTINELS)
    assert dropped == set(range(10, 20))


def test_vocab_with_sentinels(tmp_path):
    lines = ["a b c <X1>", "a b d", "a e"]
    vocab = span_corruption.build_vocab_with_sentinels(lines, "word", size=4 + 3 + 3, n_sentinels=3)
    assert vocab.itos == SPECIALS + ["<X0>", "<X1>", "<X2>", "a", "b", "c"]   # "<X1>" in the text is the sentinel
    assert span_corruption.sentinel_ids(vocab) == [4, 5, 6]
    assert span_corruption.sentinel_ids(data.vocab_from_dict(save_and_load(vocab.to_dict()))) == [4, 5, 6]
    assert span_corruption.sentinel_ids(data.WordVocab.build(lines, 10)) == []
    with pytest.raises(UserError, match="no room.*--sentinels"):
        span_corruption.build_vocab_with_sentinels(lines, "word", size=7, n_sentinels=3)
    # sentencepiece: user-defined symbols, whole pieces at ids 4, 5, ...
    text = [src for src, _ in synthetic.synthetic_corpus(300, seed=1)]
    spm = span_corruption.build_vocab_with_sentinels(text, "spm", size=60, n_sentinels=5)
    assert len(spm) == 60 and span_corruption.sentinel_ids(spm) == [4, 5, 6, 7, 8]
    assert "<X3>" in spm.tokenize("the dog <X3> sees")
    assert spm.decode([4] + spm.encode("the dog")) == "<X0> the dog"
