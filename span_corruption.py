"""
T5 span corruption: the unsupervised objective of Raffel et al. 2020 (section 3.1.4; the span lengths
of 3.3.4). Drop 15% of a sentence's tokens, in spans of mean length 3; in the input, each dropped
span becomes ONE sentinel token; the target lists each sentinel followed by the tokens it replaced.
The paper's example (its Figure 2), with the spans "for inviting" and "last":
    original   Thank you for inviting me to your party last week .
    input      Thank you <X0> me to your party <X1> week .
    target     <X0> for inviting <X1> last
A model trained on this needs no labels, so it is how a T5 student can be distilled on
unlabelled text (MiniEnD's task-agnostic stage, train.py --span-corruption) and fine-tuned
on translation afterwards (train.py --init).

Sentinels are ordinary vocabulary entries "<X0>", "<X1>", ... at the ids right after the four
specials (4, 5, ...): build_vocab_with_sentinels reserves them (T5 calls them <extra_id_0> ...
and puts them at the end of its vocabulary; the place does not matter).

Our choices, not T5's: (1) the target ends with EOS (collate adds it), not with one more sentinel as in the
paper's figure; (2) spans are placed anywhere in the sentence. T5's code always starts with kept tokens and
ends with a dropped span, harmless on its 512-token inputs but on a 10-token sentence (one span) it would
always drop the last words; here the kept tokens before the first span and after the last one may be none.
"""

import random

from data import SPECIALS, SpmVocab, UserError, WordVocab

SENTINEL_FORMAT = "<X{}>"


def sentinel_tokens(n):
    """The n sentinel strings "<X0>" .. "<X{n-1}>"."""
    return [SENTINEL_FORMAT.format(i) for i in range(n)]


def build_vocab_with_sentinels(lines, kind, size, n_sentinels):
    """One vocabulary of `size` entries (specials and sentinels included) built on `lines`, with
    the sentinels "<X0>" .. "<X{n-1}>" at ids 4 .. n+3. Used on both sides (a joint vocabulary).
    word: the sentinels, then the most frequent words of the lines (a literal "<X3>" in the text
    is the sentinel); spm: the sentinels are sentencepiece user-defined symbols (never split)."""
    sentinels = sentinel_tokens(n_sentinels)
    if kind == "word":
        if size <= len(SPECIALS) + n_sentinels:
            raise UserError(f"vocabulary size {size} leaves no room for words after the "
                            f"{len(SPECIALS)} specials and {n_sentinels} sentinels; raise "
                            f"--src-vocab-size or lower --sentinels")
        words = WordVocab.build(lines, size).itos[len(SPECIALS):]    # enough even if the text
        words = [w for w in words if w not in set(sentinels)]         # holds every sentinel
        return WordVocab(SPECIALS + sentinels + words[:size - len(SPECIALS) - n_sentinels])
    if kind == "spm":
        return SpmVocab.build(lines, size, user_defined_symbols=sentinels)
    raise UserError(f"--tokenizer must be 'word' or 'spm', got {kind!r}")


def sentinel_ids(vocab):
    """The ids of the sentinels "<X0>", "<X1>", ... in `vocab` (consecutive from <X0>; [] if none)."""
    piece_ids = {piece: i for i, piece in enumerate(vocab.tokens(range(len(vocab))))}
    ids = []
    while SENTINEL_FORMAT.format(len(ids)) in piece_ids:
        ids.append(piece_ids[SENTINEL_FORMAT.format(len(ids))])
    return ids


def _random_lengths(n, k, rng):
    """Cut n items into k non-empty consecutive pieces, uniformly over all such cuts (k - 1 of
    the n - 1 places between two items); returns the k lengths, which sum to n."""
    cuts = sorted(rng.sample(range(1, n), k - 1))
    return [end - start for start, end in zip([0] + cuts, cuts + [n])]


def span_corrupt(ids, sentinel_ids, rng, noise_density=0.15, mean_span_length=3.0):
    """T5 span corruption of one sentence (see the module docstring).
    ids: the sentence's token ids, without BOS/EOS (at least one); sentinel_ids: the ids of
    <X0>, <X1>, ... (sentinel_ids(vocab)); rng: a random.Random, the only source of randomness.
    Returns (input_ids, target_ids): lists of ints, without BOS/EOS. With L = len(ids):
        noise tokens  N = round(L * noise_density), at least 1, at most L - 1 (but 1 when L = 1)
        spans         K = round(N / mean_span_length), at least 1, at most N and at most
                          L - N + 1 (two spans need a kept token between them)
    The N noise tokens are cut into K spans of random lengths >= 1, the L - N kept tokens into
    K + 1 gaps, >= 1 between two spans and >= 0 before the first and after the last.
    E.g. 20 tokens: N = 3, K = 1: the input has 17 kept tokens and one sentinel, the target is
    the sentinel and the 3 dropped tokens. (round() is Python's, half to even, as numpy's.)"""
    L = len(ids)
    if L == 0:
        raise ValueError("span_corrupt: an empty sentence has nothing to drop")
    num_noise = max(1, min(round(L * noise_density), L - 1))
    num_spans = max(1, min(round(num_noise / mean_span_length), num_noise, L - num_noise + 1))
    if num_spans > len(sentinel_ids):
        raise UserError(f"span corruption of a {L}-token sentence needs {num_spans} sentinels but "
                        f"the vocabulary has {len(sentinel_ids)}: raise --sentinels (or lower --max-len)")
    spans = _random_lengths(num_noise, num_spans, rng)
    gaps = _random_lengths(L - num_noise + 2, num_spans + 1, rng)  # + 2, then - 1 at both ends:
    gaps[0] -= 1                                                   # the end gaps may be empty
    gaps[-1] -= 1
    input_ids, target_ids, pos = [], [], 0
    for i, (gap, span) in enumerate(zip(gaps, spans)):
        input_ids += ids[pos:pos + gap]                            # kept tokens
        pos += gap
        input_ids.append(sentinel_ids[i])                          # the span, replaced by <Xi>
        target_ids += [sentinel_ids[i]] + list(ids[pos:pos + span])  # <Xi> and what it replaced
        pos += span
    input_ids += ids[pos:]                                         # the kept tokens after the last span
    return [int(i) for i in input_ids], [int(i) for i in target_ids]


def span_corruption_examples(sentences, sentinel_ids, seed, epoch=0, noise_density=0.15,
                             mean_span_length=3.0):
    """[(input_ids, target_ids), ...]: span_corrupt of every sentence (a list of id lists), with
    one random.Random seeded by (seed, epoch): the same examples for the same (seed, epoch),
    other noise in another epoch (T5 corrupts its data afresh as it reads it)."""
    rng = random.Random(seed * 1_000_000 + epoch)
    return [span_corrupt(ids, sentinel_ids, rng, noise_density, mean_span_length) for ids in sentences]
