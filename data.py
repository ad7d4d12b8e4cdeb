"""
Data for seqkd: vocabularies, corpus reading, a built-in synthetic language pair, and batching.

Read this file top to bottom, section by section:

  1. Constants and errors   PAD/UNK/BOS/EOS ids shared by every vocabulary, UserError.
  2. Vocabularies           WordVocab (whitespace tokens), SpmVocab (sentencepiece), build_vocabs,
                            and to_dict()/vocab_from_dict() so a vocabulary travels in a checkpoint.
  3. Reading corpora        read_lines, read_parallel (line-aligned files), clean_pairs (drop empty
                            and over-long pairs, print one summary line).
  4. The built-in corpus    synthetic_corpus(n, seed): a tiny English-like -> German-like language
                            pair that needs attention and has several valid translations per source;
                            builtin_splits(): its splits. Grammar: synthetic_corpus's docstring.
  5. Batching               encode_pairs, collate (pad, add BOS/EOS, masks), batch_indices (length
                            buckets, token budget, per-epoch shuffle), batches.
  6. T5 span corruption     span_corrupt (Raffel et al. 2020: dropped spans -> sentinels <X0>..),
                            span_corruption_examples, build_vocab_with_sentinels, sentinel_ids.
  7. Public corpora         python data.py prepare wmt14-en-de|iwslt15-en-vi|multi30k --out DIR:
                            download (resumable), check line counts, unpack, write
                            DIR/{train,valid,test}.{src,tgt}; CORPORA is the table of files.

Conventions used everywhere in seqkd:
  - ids PAD=0, UNK=1, BOS=2, EOS=3 in every vocabulary (word and sentencepiece alike);
  - sentences are encoded WITHOUT BOS/EOS; collate() adds them:
        src     (B, S)  x1 .. xm              PAD-padded
        tgt_in  (B, T)  BOS y1 .. yn          PAD-padded, T = max n + 1
        tgt_out (B, T)  y1 .. yn EOS          PAD-padded
  - masks are boolean and True = real token (False = padding): src_mask = src != PAD;
  - bad user input raises UserError with a one-line message naming the file or flag and the fix.
"""

import argparse
import gzip
import http.client
import io
import os
import random
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from itertools import islice

import sentencepiece
import torch
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------
# 1. Constants and errors
# ---------------------------------------------------------------------------------------------

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


class UserError(Exception):
    """A mistake in the user's input (a file, a flag). The message is one line that names the
    file or flag and says how to fix it; command-line tools print it without a traceback."""


# ---------------------------------------------------------------------------------------------
# 2. Vocabularies
# ---------------------------------------------------------------------------------------------
# Both vocabulary classes have the same interface:
#   encode(line) -> ids (no BOS/EOS)      decode(ids) -> line (stops at EOS, drops PAD/BOS)
#   tokens(ids) -> piece strings          tokenize(line) -> the pieces the line is split into
#   len(vocab)                            to_dict() -> dict of str/int/list/bytes, for checkpoints


class WordVocab:
    """Whitespace tokens. The vocabulary is the 4 specials followed by the most frequent words;
    every other word maps to <unk>. Ties in frequency are broken alphabetically (by Unicode code
    point), so the vocabulary does not depend on the order of the training lines."""

    kind = "word"

    def __init__(self, itos):
        if list(itos[: len(SPECIALS)]) != SPECIALS:
            raise UserError("word vocabulary must start with " + " ".join(SPECIALS))
        self.itos = list(itos)                              # id -> word
        self.stoi = {w: i for i, w in enumerate(self.itos)}  # word -> id

    @classmethod
    def build(cls, lines, max_size):
        """The `max_size` entries (specials included) of the most frequent words in `lines`."""
        if max_size <= len(SPECIALS):
            raise UserError(f"vocabulary size {max_size} is too small: it counts the specials "
                            f"{' '.join(SPECIALS)}; use --src-vocab-size/--tgt-vocab-size of "
                            f"at least {len(SPECIALS) + 1}")
        counts = Counter()
        for line in lines:
            counts.update(line.split())
        for special in SPECIALS:        # a literal "<unk>" in the text is not a new word
            counts.pop(special, None)
        words = sorted(counts, key=lambda w: (-counts[w], w))  # most frequent first, ties a-z
        return cls(SPECIALS + words[: max_size - len(SPECIALS)])

    def tokenize(self, line):
        return line.split()

    def encode(self, line):
        return [self.stoi.get(word, UNK) for word in line.split()]

    def encode_batch(self, lines):
        return [self.encode(line) for line in lines]

    def decode(self, ids):
        return " ".join(self.tokens(_content_ids(ids)))

    def tokens(self, ids):
        return [self.itos[int(i)] for i in ids]

    def __len__(self):
        return len(self.itos)

    def to_dict(self):
        return {"kind": "word", "itos": list(self.itos)}


class SpmVocab:
    """A sentencepiece model (unigram or BPE) trained in memory on the training text, with
    pad_id=0, unk_id=1, bos_id=2, eos_id=3 so its ids match the specials. The serialized model
    (bytes) is kept in to_dict(), so a checkpoint alone is enough to decode."""

    kind = "spm"

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD, UNK, BOS, EOS):
            raise UserError(f"sentencepiece model has special ids {ids}, seqkd needs "
                            f"pad=0 unk=1 bos=2 eos=3; rebuild it with SpmVocab.build")

    @classmethod
    def build(cls, lines, vocab_size, model_type="unigram"):
        """Train sentencepiece on `lines` in memory (no temporary files) with `vocab_size`
        pieces (specials included). model_type: unigram | bpe | char | word."""
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model,
                vocab_size=vocab_size, model_type=model_type,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                pad_piece=SPECIALS[PAD], unk_piece=SPECIALS[UNK],
                bos_piece=SPECIALS[BOS], eos_piece=SPECIALS[EOS],
                input_sentence_size=2_000_000, shuffle_input_sentence=True,  # sample big corpora
                num_threads=os.cpu_count() or 1, minloglevel=2)              # minloglevel: quiet
        except (RuntimeError, ValueError) as e:
            largest = re.search(r"value <= (\d+)", str(e))
            if largest:
                raise UserError(f"vocabulary size {vocab_size} is too large for this training "
                                f"text (sentencepiece can make at most {largest.group(1)} pieces); "
                                f"use --src-vocab-size/--tgt-vocab-size {largest.group(1)} or "
                                f"less") from None
            raise UserError(f"sentencepiece training failed ({str(e).splitlines()[0]}); "
                            f"check the vocabulary size, the model type and the training text") from None
        return cls(model.getvalue())

    def tokenize(self, line):
        return self.sp.encode(line, out_type=str)

    def encode(self, line):
        return self.sp.encode(line, out_type=int)

    def encode_batch(self, lines):
        """encode() for many lines at once (sentencepiece runs them in parallel in C++)."""
        return self.sp.encode(list(lines), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.sp.decode(_content_ids(ids))

    def tokens(self, ids):
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def __len__(self):
        return self.sp.get_piece_size()

    def to_dict(self):
        return {"kind": "spm", "model": self.model_proto}


def _content_ids(ids):
    """The ids up to (not including) the first EOS, without PAD and BOS, as Python ints."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(i)
    return out


def vocab_from_dict(d):
    """Rebuild a WordVocab or SpmVocab from its to_dict()."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "word":
        return WordVocab(d["itos"])
    if kind == "spm":
        return SpmVocab(d["model"])
    raise UserError(f"unknown vocabulary kind {kind!r} in checkpoint; expected 'word' or 'spm'")


def build_vocabs(src_lines, tgt_lines, kind="word", src_size=50000, tgt_size=50000, joint=False):
    """(src_vocab, tgt_vocab) built from the training lines. kind: "word" or "spm".
    joint=True builds one vocabulary of src_size entries on both sides' text and returns the
    same object twice (needed for tied embeddings; handy for related languages)."""
    if kind == "word":
        build = WordVocab.build
    elif kind == "spm":
        build = SpmVocab.build
    else:
        raise UserError(f"--tokenizer must be 'word' or 'spm', got {kind!r}")
    if joint:
        vocab = build(list(src_lines) + list(tgt_lines), src_size)
        return vocab, vocab
    return build(src_lines, src_size), build(tgt_lines, tgt_size)


def vocabs_from_checkpoint(ckpt):
    """(src_vocab, tgt_vocab) from ckpt["vocab"]["src"/"tgt"]; a joint vocabulary (identical
    dicts) comes back as one object used twice, as build_vocabs(joint=True) made it."""
    if not isinstance(ckpt, dict) or "vocab" not in ckpt:
        raise UserError("checkpoint holds no vocabulary; is it a seqkd checkpoint?")
    src_dict, tgt_dict = ckpt["vocab"]["src"], ckpt["vocab"]["tgt"]
    src_vocab = vocab_from_dict(src_dict)
    tgt_vocab = src_vocab if tgt_dict == src_dict else vocab_from_dict(tgt_dict)
    return src_vocab, tgt_vocab


# ---------------------------------------------------------------------------------------------
# 3. Reading corpora
# ---------------------------------------------------------------------------------------------


def read_lines(path):
    """The lines of a UTF-8 text file, stripped of surrounding whitespace (and of a UTF-8 BOM).
    Lines are split on "\\n" only (a "\\r\\n" ending is stripped too), never on other Unicode
    line breaks, so two line-aligned files stay aligned. Blank lines are kept (clean_pairs drops
    them). UserError: missing file, invalid UTF-8 (with its 1-based line number), empty file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1   # e.start: offset of the first bad byte
        raise UserError(f"{path}: line {line_no} is not valid UTF-8; convert the file to UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":             # the newline that ends the last line
        lines.pop()
    lines = [line.strip() for line in lines]
    if not any(lines):
        raise UserError(f"{path}: the corpus is empty (no non-blank line)")
    return lines


def read_parallel(src_path, tgt_path):
    """[(source line, target line), ...] from two line-aligned files.
    UserError (besides read_lines'): the two files have different numbers of lines."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(f"{src_path} has {len(src):,} lines but {tgt_path} has {len(tgt):,}; "
                        f"a parallel corpus needs one sentence per line on both sides")
    return list(zip(src, tgt))


def clean_pairs(pairs, max_len=None, src_vocab=None, tgt_vocab=None, name="train", verbose=True):
    """Drop pairs with an empty side, and (when max_len is given: for training) pairs with
    either side longer than max_len tokens. Length is counted in the tokens of the given
    vocabulary (sentencepiece pieces for spm), or whitespace words when no vocabulary is given.
    Prints one summary line, e.g.
        train: kept 28,950 of 29,000 pairs (12 empty, 38 longer than 50 tokens)
    Returns (kept_pairs, stats) with stats = {"total", "kept", "empty", "too_long"}.
    UserError when no pair is left. With spm, build the vocabularies first (on the uncleaned
    training lines) and pass them, so lengths are counted in pieces."""
    def lengths(lines, vocab):
        if vocab is None:
            return [len(line.split()) for line in lines]
        return [len(ids) for ids in vocab.encode_batch(lines)]

    pairs = list(pairs)
    not_empty = [(s, t) for s, t in pairs if s.strip() and t.strip()]
    n_empty = len(pairs) - len(not_empty)
    kept = not_empty
    if max_len is not None:
        src_lens = lengths([s for s, _ in not_empty], src_vocab)
        tgt_lens = lengths([t for _, t in not_empty], tgt_vocab)
        kept = [pair for pair, ls, lt in zip(not_empty, src_lens, tgt_lens)
                if ls <= max_len and lt <= max_len]
    n_long = len(not_empty) - len(kept)

    summary = f"{n_empty:,} empty"
    if max_len is not None:
        summary += f", {n_long:,} longer than {max_len} tokens"
    if verbose:
        print(f"{name}: kept {len(kept):,} of {len(pairs):,} pairs ({summary})")
    if not kept:
        raise UserError(f"{name}: no sentence pairs left ({summary}); check the files"
                        + (" or raise --max-len" if n_long else ""))
    return kept, {"total": len(pairs), "kept": len(kept), "empty": n_empty, "too_long": n_long}


# ---------------------------------------------------------------------------------------------
# 4. The built-in corpus: a tiny English-like -> German-like language pair
# ---------------------------------------------------------------------------------------------
# With no data flags, `python train.py` trains on this corpus: no download, no data files.


def synthetic_corpus(n, seed, variants=True):
    """n (English-like source, German-like target) sentence pairs, generated by the grammar
    below with random.Random(seed): the same pairs for the same seed, the global `random` state
    untouched. variants=False: every choice between translations takes the most frequent one
    (same sources, one translation per source: what an ideal beam search would output).

    Source (English-like), 5 to 15 tokens:
        SENTENCE = NP(subject) VERB NP(object) [PREP NP] [ADVERB]
        NP       = DET ADJ* NOUN        DET: the | a ("an" before a vowel); 0, 1, 2 ADJ: 60/30/10%
      the subject is a person or an animal, the object fits the verb (one eats food, visits a
      person or a place, ...); the PP (40% of sentences) and the adverb (30%) are optional.
      30 nouns in 6 classes, 12 verbs, 12 adjectives, 4 prepositions, 4 adverbs (tables below).

    Target (German-like), lowercase, no punctuation:
        SENTENCE = NP(nom) [ADVERB] NP(acc) [PREP NP(dat)] VERB     70%
                 | NP(nom) [ADVERB] [PREP NP(dat)] NP(acc) VERB     30%: the PP before the object
        NP       = DET NOUN ADJ*        adjectives come AFTER their noun
      Against the source, the verb moves to the END, the adverb moves from the end to just after
      the subject and adjectives follow their noun: a model must find the right source word
      (attention) rather than copy in order.

    Words translate in context:
      - the determiner agrees with the gender (m/f/n) of the German noun AND with its role:
            the:  nom der/die/das   acc den/die/das     dat (after a PREP) dem/der/dem
            a:    nom ein/eine/ein  acc einen/eine/ein  dat (after a PREP) einem/einer/einem
      - "takes" is "benutzt" (uses) with a vehicle ("takes the bus"), "nimmt" otherwise
        ("takes the apple"); "eats" is "isst" when a person eats, "frisst" when an animal does;
      - "light" is "leicht" with food and things (weight), "hell" with vehicles and places.

    Several valid translations, as in real data: a word with two translations in the tables
    takes the first (the mode) 70% of the time and the second 30%; "car" is "der wagen" or "das
    auto", so the determiner must agree with the choice; the PP goes before the object 30% of
    the time. About 31% of targets differ from the all-modes translation, and that translation
    scores about 85 BLEU against the test references: the ceiling for a model that always picks
    the mode. A teacher's beam search picks the modes; this is what sequence-level distillation
    (Kim & Rush 2016) hands to its student.

    >>> for src, tgt in synthetic_corpus(4, seed=0):
    ...     print(src, "=>", tgt)
    a doctor washes a red heavy bike on the boat => ein arzt ein rad rot schwer auf dem boot waescht
    the young mouse carries the cake on an apple => die maus jung den kuchen auf einem apfel traegt
    the blue bird paints a small bag on the heavy dog again => der vogel blau wieder auf dem hund schwer eine tasche klein malt
    a horse wants a soup on the garden => ein pferd auf dem garten eine suppe moechte

    (1: the minority "rad" for bike; 3 and 4: the PP before the object; 4: the minority
    "moechte"; the all-modes translation of 4 is "ein pferd eine suppe auf dem garten will".)
    """
    return list(islice(_synthetic_stream(seed, variants), n))


def builtin_splits(n_train=20_000, n_valid=500, n_test=500):
    """{"train", "valid", "test"} of the synthetic corpus, drawn with seeds 1, 2 and 3.
    Valid and test keep only sources that appear in no earlier split (nor twice in their own),
    so they measure translation of unseen sentences; as short sentences repeat often in
    training, valid/test are slightly longer on average than train."""
    train = synthetic_corpus(n_train, seed=1)
    seen = {src for src, _ in train}
    splits = {"train": train}
    for name, n, seed in [("valid", n_valid, 2), ("test", n_test, 3)]:
        pairs = []
        for src, tgt in _synthetic_stream(seed):
            if len(pairs) == n:
                break
            if src not in seen:
                seen.add(src)
                pairs.append((src, tgt))
        splits[name] = pairs
    return splits


# The lexicon. English word -> German translation(s); a list of two = mode (70%), minority (30%).
ANIMATE = ("person", "animal")
INANIMATE = ("vehicle", "food", "thing", "place")
EVERYTHING = ANIMATE + INANIMATE

# English noun: (class, [(German noun, gender), ...])
NOUNS = {
    "man": ("person", [("mann", "m")]),
    "woman": ("person", [("frau", "f")]),
    "child": ("person", [("kind", "n")]),
    "girl": ("person", [("maedchen", "n")]),
    "boy": ("person", [("junge", "m")]),
    "teacher": ("person", [("lehrer", "m")]),
    "doctor": ("person", [("arzt", "m"), ("doktor", "m")]),
    "dog": ("animal", [("hund", "m")]),
    "cat": ("animal", [("katze", "f")]),
    "horse": ("animal", [("pferd", "n")]),
    "bird": ("animal", [("vogel", "m")]),
    "mouse": ("animal", [("maus", "f")]),
    "car": ("vehicle", [("wagen", "m"), ("auto", "n")]),
    "bus": ("vehicle", [("bus", "m")]),
    "train": ("vehicle", [("zug", "m")]),
    "bike": ("vehicle", [("fahrrad", "n"), ("rad", "n")]),
    "boat": ("vehicle", [("boot", "n")]),
    "apple": ("food", [("apfel", "m")]),
    "bread": ("food", [("brot", "n")]),
    "soup": ("food", [("suppe", "f")]),
    "cake": ("food", [("kuchen", "m")]),
    "book": ("thing", [("buch", "n")]),
    "ball": ("thing", [("ball", "m")]),
    "bag": ("thing", [("tasche", "f"), ("beutel", "m")]),
    "table": ("thing", [("tisch", "m")]),
    "house": ("place", [("haus", "n"), ("gebaeude", "n")]),
    "garden": ("place", [("garten", "m")]),
    "park": ("place", [("park", "m")]),
    "city": ("place", [("stadt", "f")]),
    "river": ("place", [("fluss", "m")]),
}

# English verb: (classes its object can have, German translations); None = in context, see
# _german_verb.
VERBS = {
    "sees": (EVERYTHING, ["sieht", "erblickt"]),
    "likes": (EVERYTHING, ["mag", "liebt"]),
    "finds": (EVERYTHING, ["findet"]),
    "paints": (EVERYTHING, ["malt"]),
    "buys": (("vehicle", "food", "thing"), ["kauft"]),
    "carries": (("person", "animal", "food", "thing"), ["traegt"]),
    "calls": (("person", "animal"), ["ruft"]),
    "visits": (("person", "place"), ["besucht"]),
    "washes": (("person", "animal", "vehicle", "thing"), ["waescht"]),
    "wants": (("animal", "vehicle", "food", "thing"), ["will", "moechte"]),
    "eats": (("food",), None),
    "takes": (("vehicle", "food", "thing"), None),
}

# English adjective: (classes of nouns it can describe, German translations); None = in context.
ADJECTIVES = {
    "big": (EVERYTHING, ["gross"]),
    "small": (EVERYTHING, ["klein"]),
    "old": (EVERYTHING, ["alt"]),
    "new": (EVERYTHING, ["neu"]),
    "red": (EVERYTHING, ["rot"]),
    "blue": (EVERYTHING, ["blau"]),
    "green": (EVERYTHING, ["gruen"]),
    "heavy": (EVERYTHING, ["schwer"]),
    "beautiful": (EVERYTHING, ["schoen", "huebsch"]),
    "happy": (ANIMATE, ["froh", "gluecklich"]),
    "young": (ANIMATE, ["jung"]),
    "light": (INANIMATE, None),
}

PREPOSITIONS = {"in": "in", "on": "auf", "with": "mit", "near": "neben"}
ADVERBS = {"today": ["heute"], "often": ["oft"], "again": ["wieder", "erneut"],
           "slowly": ["langsam"]}

# (English determiner, case) -> German determiner by gender
DETERMINERS = {
    ("the", "nom"): {"m": "der", "f": "die", "n": "das"},
    ("the", "acc"): {"m": "den", "f": "die", "n": "das"},
    ("the", "dat"): {"m": "dem", "f": "der", "n": "dem"},
    ("a", "nom"): {"m": "ein", "f": "eine", "n": "ein"},
    ("a", "acc"): {"m": "einen", "f": "eine", "n": "ein"},
    ("a", "dat"): {"m": "einem", "f": "einer", "n": "einem"},
}

# The generator: one random.Random drives every choice, source first, then target.
MINORITY = 0.3      # probability of a word's second translation, and of the PP before the object


def _draw(options, rng, variants):
    """One of `options`: the first (the mode) 70% of the time, the second (if any) 30%.
    A random number is always drawn, so variants=False sees exactly the same sources."""
    r = rng.random()
    return options[1] if variants and len(options) == 2 and r < MINORITY else options[0]


def _german_verb(verb, subject, obj, rng, variants):
    if verb == "eats":       # people "essen", animals "fressen"
        return "isst" if NOUNS[subject][0] == "person" else "frisst"
    if verb == "takes":      # "takes the bus" = uses it; "takes the apple" = picks it up
        return "benutzt" if NOUNS[obj][0] == "vehicle" else "nimmt"
    return _draw(VERBS[verb][1], rng, variants)


def _german_adjective(adj, noun, rng, variants):
    if adj == "light":       # a light bag is not heavy ("leicht"); a light house is bright ("hell")
        return "leicht" if NOUNS[noun][0] in ("food", "thing") else "hell"
    return _draw(ADJECTIVES[adj][1], rng, variants)


def _noun_phrase(rng, nouns):
    """(determiner, adjectives, noun) with the noun drawn from `nouns`."""
    noun = rng.choice(nouns)
    det = rng.choice(["the", "a"])
    r = rng.random()
    n_adj = 0 if r < 0.6 else 1 if r < 0.9 else 2
    fitting = [a for a, (classes, _) in ADJECTIVES.items() if NOUNS[noun][0] in classes]
    return det, rng.sample(fitting, n_adj), noun


def _english_np(np):
    det, adjs, noun = np
    words = [det, *adjs, noun]
    if det == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def _german_np(np, case, rng, variants):
    det, adjs, noun = np
    german_noun, gender = _draw(NOUNS[noun][1], rng, variants)
    german_adjs = [_german_adjective(a, noun, rng, variants) for a in adjs]
    return [DETERMINERS[det, case][gender], german_noun, *german_adjs]


def _synthetic_pair(rng, variants=True):
    # the sentence's content, chosen once
    subject = _noun_phrase(rng, [n for n in NOUNS if NOUNS[n][0] in ANIMATE])
    verb = rng.choice(list(VERBS))
    obj = _noun_phrase(rng, [n for n in NOUNS if NOUNS[n][0] in VERBS[verb][0]])
    prep, pp = None, None
    if rng.random() < 0.4:
        prep = rng.choice(list(PREPOSITIONS))
        pp = _noun_phrase(rng, list(NOUNS))
    adverb = rng.choice(list(ADVERBS)) if rng.random() < 0.3 else None

    # English: S V O [PREP NP] [ADV]
    en = _english_np(subject) + [verb] + _english_np(obj)
    if prep:
        en += [prep] + _english_np(pp)
    if adverb:
        en += [adverb]

    # German: S [ADV] O [PREP NP] V, or S [ADV] [PREP NP] O V
    de_subject = _german_np(subject, "nom", rng, variants)
    de_obj = _german_np(obj, "acc", rng, variants)
    de_pp = [PREPOSITIONS[prep]] + _german_np(pp, "dat", rng, variants) if prep else []
    de_adverb = [_draw(ADVERBS[adverb], rng, variants)] if adverb else []
    de_verb = _german_verb(verb, subject[2], obj[2], rng, variants)
    pp_first = bool(prep) and _draw([False, True], rng, variants)
    middle = de_pp + de_obj if pp_first else de_obj + de_pp
    de = de_subject + de_adverb + middle + [de_verb]
    return " ".join(en), " ".join(de)


def _synthetic_stream(seed, variants=True):
    rng = random.Random(seed)       # its own generator: the global `random` state is untouched
    while True:
        yield _synthetic_pair(rng, variants)


# ---------------------------------------------------------------------------------------------
# 5. Batching
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch. Masks: True = real token, False = PAD.
    src      (B, S) long   x1 .. xm, PAD-padded
    src_mask (B, S) bool   src != PAD
    tgt_in   (B, T) long   BOS y1 .. yn, PAD-padded (decoder input, teacher forcing)
    tgt_out  (B, T) long   y1 .. yn EOS, PAD-padded (what the decoder must predict)
    ids      (B,)   long   index of each example in the dataset
    ntokens  int           non-PAD tokens in tgt_out (the loss normaliser)"""

    src: torch.Tensor
    src_mask: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    ids: torch.Tensor
    ntokens: int

    def to(self, device):
        return Batch(self.src.to(device), self.src_mask.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.ids.to(device), self.ntokens)


def encode_pairs(pairs, src_vocab, tgt_vocab):
    """[(src_ids, tgt_ids), ...] without BOS/EOS."""
    src = src_vocab.encode_batch([s for s, _ in pairs])
    tgt = tgt_vocab.encode_batch([t for _, t in pairs])
    return list(zip(src, tgt))


def collate(examples, idxs):
    """The Batch of examples[i] for i in idxs (examples: [(src_ids, tgt_ids), ...])."""
    idxs = [int(i) for i in idxs]
    srcs = [list(examples[i][0]) for i in idxs]
    tgts = [list(examples[i][1]) for i in idxs]
    S = max(len(s) for s in srcs)
    T = max(len(t) for t in tgts) + 1                                   # + BOS or EOS
    src = torch.tensor([s + [PAD] * (S - len(s)) for s in srcs], dtype=torch.long)      # (B, S)
    tgt_in = torch.tensor([[BOS] + t + [PAD] * (T - 1 - len(t)) for t in tgts], dtype=torch.long)
    tgt_out = torch.tensor([t + [EOS] + [PAD] * (T - 1 - len(t)) for t in tgts], dtype=torch.long)
    return Batch(src=src, src_mask=src != PAD, tgt_in=tgt_in, tgt_out=tgt_out,   # (B, T) each
                 ids=torch.tensor(idxs, dtype=torch.long), ntokens=sum(len(t) + 1 for t in tgts))


def batch_indices(lengths, batch_tokens=None, batch_size=None, shuffle=True, seed=0, epoch=0):
    """Cut example indices into batches of similar length. lengths: [(src_len, tgt_len), ...].

    1. Sort by (src_len, tgt_len); with shuffle, equal lengths are in random order.
    2. Walk the sorted list, closing a batch when adding one more example would exceed
         batch_tokens: the padded size n_sentences * max(longest src_len, longest tgt_len + 1)
                       of the batch (tgt + 1: tgt_in/tgt_out carry BOS/EOS), and/or
         batch_size:   n_sentences.
       A single example larger than batch_tokens gets a batch of its own (never dropped).
    3. With shuffle, the batches are put in random order.
    Randomness comes from a torch.Generator seeded with (seed, epoch) (no global RNG is
    touched): the same (seed, epoch) gives the same batches, another epoch another order.
    Without shuffle the order is shortest first and deterministic. Every index appears once."""
    if batch_tokens is None and batch_size is None:
        raise UserError("give a batch size: --batch-tokens or --batch-size")
    for flag, value in [("--batch-tokens", batch_tokens), ("--batch-size", batch_size)]:
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a positive number, got {value}")
    n = len(lengths)
    if n == 0:
        return []
    generator = torch.Generator().manual_seed(seed * 1_000_000 + epoch)  # a stream per (seed, epoch)
    src_len = torch.tensor([s for s, _ in lengths])
    tgt_len = torch.tensor([t for _, t in lengths])

    # 1. sort by length; a random permutation first gives equal lengths a random order
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    key = src_len * (int(tgt_len.max()) + 1) + tgt_len           # sorts like (src_len, tgt_len)
    order = order[torch.sort(key[order], stable=True).indices]

    # 2. cut into batches
    cut, current, longest = [], [], 0
    for i in order.tolist():
        size = max(lengths[i][0], lengths[i][1] + 1)
        new_longest = max(longest, size)
        n_sentences = len(current) + 1
        too_many_tokens = batch_tokens is not None and n_sentences * new_longest > batch_tokens
        too_many_sentences = batch_size is not None and n_sentences > batch_size
        if current and (too_many_tokens or too_many_sentences):
            cut.append(current)
            current, new_longest = [], size
        current.append(i)
        longest = new_longest
    cut.append(current)

    # 3. shuffle the batch order
    if shuffle:
        cut = [cut[j] for j in torch.randperm(len(cut), generator=generator).tolist()]
    return cut


def batches(examples, batch_tokens=None, batch_size=None, shuffle=True, seed=0, epoch=0):
    """All Batches of one epoch (see batch_indices). For a large corpus, loop over
    batch_indices() and collate() each batch as it is needed, to keep memory small."""
    lengths = [(len(s), len(t)) for s, t in examples]
    return [collate(examples, idxs)
            for idxs in batch_indices(lengths, batch_tokens, batch_size, shuffle, seed, epoch)]


# ---------------------------------------------------------------------------------------------
# 6. T5 span corruption
# ---------------------------------------------------------------------------------------------
# T5's unsupervised objective (Raffel et al. 2020, section 3.1.4; the span lengths of 3.3.4):
# drop 15% of a sentence's tokens, in spans of mean length 3; in the input, each dropped span
# becomes ONE sentinel token; the target lists each sentinel followed by the tokens it replaced.
# The paper's example (its Figure 2), with the spans "for inviting" and "last":
#     original   Thank you for inviting me to your party last week .
#     input      Thank you <X0> me to your party <X1> week .
#     target     <X0> for inviting <X1> last
# A model trained on this needs no labels, so it is how a T5 student can be distilled on
# unlabelled text (MiniEnD's task-agnostic stage, train.py --span-corruption) and fine-tuned
# on translation afterwards (train.py --init).
#
# Sentinels are ordinary vocabulary entries "<X0>", "<X1>", ... at the ids right after the four
# specials (4, 5, ...): build_vocab_with_sentinels reserves them (T5 calls them <extra_id_0> ...
# and puts them at the end of its vocabulary; the place does not matter).
#
# Our choices, not T5's: (1) the target ends with EOS (collate adds it), not with one more
# sentinel as in the paper's figure; (2) spans are placed anywhere in the sentence. T5's code
# always starts with kept tokens and ends with a dropped span, harmless on its 512-token inputs
# but on a 10-token sentence (one span) it would always drop the last words; here the kept
# tokens before the first span and after the last one may be none.

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
        return _spm_with_sentinels(lines, size, sentinels)
    raise UserError(f"--tokenizer must be 'word' or 'spm', got {kind!r}")


def _spm_with_sentinels(lines, vocab_size, sentinels):
    """SpmVocab.build's sentencepiece model, with the sentinels as user-defined symbols (whole
    pieces, never split; sentencepiece gives them the ids right after the specials).
    (To become SpmVocab.build(..., user_defined_symbols=sentinels) when that takes the argument.)"""
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_piece=SPECIALS[PAD],
            unk_piece=SPECIALS[UNK], bos_piece=SPECIALS[BOS], eos_piece=SPECIALS[EOS],
            user_defined_symbols=sentinels, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"sentencepiece training failed ({str(e).splitlines()[0]}); check --src-vocab-size "
                        f"(it counts the {len(sentinels)} sentinels) and the training text") from None
    return SpmVocab(model.getvalue())


def sentinel_ids(vocab):
    """The ids of the sentinels "<X0>", "<X1>", ... in `vocab` (consecutive from <X0>; [] if the
    vocabulary has none)."""
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
    """T5 span corruption of one sentence (see the top of this section).

    ids: the sentence's token ids, without BOS/EOS (at least one); sentinel_ids: the ids of
    <X0>, <X1>, ... (sentinel_ids(vocab)); rng: a random.Random, the only source of randomness.
    Returns (input_ids, target_ids): lists of ints, without BOS/EOS. With L = len(ids):
        noise tokens  N = round(L * noise_density), at least 1, at most L - 1 (but 1 when L = 1)
        spans         K = round(N / mean_span_length), at least 1, at most N and at most
                          L - N + 1 (two spans need a kept token between them)
    The N noise tokens are cut into K spans of random lengths >= 1, the L - N kept tokens into
    K + 1 gaps, >= 1 between two spans and >= 0 before the first and after the last.
    E.g. 20 tokens: N = 3, K = 1: the input has 17 kept tokens and one sentinel, the target is
    the sentinel and the 3 dropped tokens. (round() is Python's, half to even, as numpy's.)
    """
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
    return [span_corrupt(ids, sentinel_ids, rng, noise_density, mean_span_length)
            for ids in sentences]


# ---------------------------------------------------------------------------------------------
# 7. Preparing public corpora: python data.py prepare NAME --out DIR
# ---------------------------------------------------------------------------------------------
# Downloads the standard public release of a corpus, checks the line count of every file,
# unpacks what is packed, and writes the line-aligned files that train.py reads:
#
#     python data.py prepare wmt14-en-de --out data/wmt14
#       -> data/wmt14/train.en  train.de   (4,468,840 tokenized pairs)
#          data/wmt14/valid.en  valid.de   (newstest2012 + newstest2013, 6,003 pairs)
#          data/wmt14/test.en   test.de    (newstest2014, 2,737 pairs)
#          data/wmt14/raw/                 (the downloads as published, vocabularies included)
#
# Downloads go through DIR/raw/NAME.part: a download that stops (network, Ctrl-C) continues
# where it stopped when the same command is run again (an HTTP Range request). A file put into
# DIR/raw/ by hand is used as it is, after the same line-count check. `--mirror URL` (or the
# environment variable SEQKD_MIRROR) replaces the corpus's base URL: a local copy of the files,
# or, in tests/test_prepare.py, a small HTTP server on 127.0.0.1. Only the standard library
# (urllib) is used for downloading.


@dataclass(frozen=True)
class RemoteFile:
    """One file of a published corpus.

    url_path: its path under the corpus's base URL; downloaded to DIR/raw/<its last part>
    name:     the text file it gives in DIR/raw/: the download itself, or what is unpacked from
              it (a .gz file is gunzipped; a tar archive gives its `member`)
    lines:    the number of lines the text file must have (None: not checked)
    member:   the path inside a tar archive (.tar, .tgz, .tar.gz) of the file to extract"""

    url_path: str
    name: str
    lines: int | None
    member: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A published parallel corpus: where its files are and how they make the three splits.
    splits: {"train" | "valid" | "test": [stem, ...]}: split.LANG is DIR/raw/stem.LANG of
    each stem, joined in this order (e.g. valid = newstest2012 followed by newstest2013)."""

    about: str
    base_url: str
    src: str
    tgt: str
    files: tuple
    splits: dict
    tokenized: bool     # the text is already tokenized: BLEU with --bleu-tokenize none


def _both_sides(stem, lines, src, tgt, packed=""):
    """The RemoteFiles stem.SRC and stem.TGT of one line-aligned pair (`packed`: e.g. ".gz")."""
    return tuple(RemoteFile(f"{stem}.{lang}{packed}", f"{stem}.{lang}", lines) for lang in (src, tgt))


CORPORA = {
    # Luong et al. (2015)'s preprocessed WMT'14 English-German, the data of Kim & Rush (2016):
    # tokenized text, newstest2012/2013 for validation, newstest2014 (the filtered 2,737-sentence
    # version) for the test. vocab.50K.* are the 50k-word vocabularies the papers used;
    # train.py builds the same-size vocabulary from train.* itself (--src-vocab-size 50000).
    "wmt14-en-de": Corpus(
        about="WMT'14 English-German, preprocessed by the Stanford NLP group (Luong et al., 2015)",
        base_url="https://nlp.stanford.edu/projects/nmt/data/wmt14.en-de/",
        src="en", tgt="de",
        files=(*_both_sides("train", 4_468_840, "en", "de"),
               *_both_sides("newstest2012", 3_003, "en", "de"),
               *_both_sides("newstest2013", 3_000, "en", "de"),
               *_both_sides("newstest2014", 2_737, "en", "de"),
               *_both_sides("vocab.50K", None, "en", "de")),
        splits={"train": ["train"], "valid": ["newstest2012", "newstest2013"],
                "test": ["newstest2014"]},
        tokenized=True),
    # The same group's IWSLT'15 English-Vietnamese (TED talks): tst2012 to validate, tst2013 to test.
    "iwslt15-en-vi": Corpus(
        about="IWSLT'15 English-Vietnamese, preprocessed by the Stanford NLP group (Luong & Manning, 2015)",
        base_url="https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/",
        src="en", tgt="vi",
        files=(*_both_sides("train", 133_317, "en", "vi"),
               *_both_sides("tst2012", 1_553, "en", "vi"),
               *_both_sides("tst2013", 1_268, "en", "vi"),
               *_both_sides("vocab", None, "en", "vi")),
        splits={"train": ["train"], "valid": ["tst2012"], "test": ["tst2013"]},
        tokenized=True),
    # Multi30k task 1 (image captions), the raw (untokenized, cased) text, gzipped.
    "multi30k": Corpus(
        about="Multi30k task 1 English-German, raw text (Elliott et al., 2016)",
        base_url="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/",
        src="en", tgt="de",
        files=(*_both_sides("train", 29_000, "en", "de", packed=".gz"),
               *_both_sides("val", 1_014, "en", "de", packed=".gz"),
               *_both_sides("test_2016_flickr", 1_000, "en", "de", packed=".gz")),
        splits={"train": ["train"], "valid": ["val"], "test": ["test_2016_flickr"]},
        tokenized=False),
}

DOWNLOAD_CHUNK = 1 << 20     # bytes read per network read (1 MiB)


def count_lines(path):
    """Lines of a file counted as read_lines() does: the "\\n"s, plus one for a last line
    without "\\n". Reads in blocks, so a multi-GB file needs little memory."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def download(url, path, progress=True):
    """Download `url` to `path` through `path`.part, continuing an existing .part with an HTTP
    Range request (a server that ignores Range sends the whole file: we start over).
    UserError (one line) when the server cannot be reached, answers with an error, or the
    connection stops early (then the .part stays: the same command resumes it)."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "seqkd-data-prepare (Python urllib)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    by_hand = f"download it by hand to {path} and rerun"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:      # "range not satisfiable": the .part is already complete
            os.replace(part, path)
            return
        raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}; check the URL "
                        f"(--mirror / SEQKD_MIRROR) or {by_hand}") from None
    except (OSError, ValueError) as e:     # URLError is an OSError; ValueError: a malformed URL
        reason = getattr(e, "reason", e)
        raise UserError(f"could not reach {url}: {reason}; check your connection or {by_hand}") from None
    with response:
        if have and response.status != 206:    # Range ignored: the whole file comes again
            have = 0
        size = response.headers.get("Content-Length")
        total = have + int(size) if size is not None else None
        done = have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=os.path.basename(path), disable=None if progress else True)
        try:
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:     # connection reset, timeout
            raise UserError(f"download of {url} stopped after {done:,} bytes ({e}); run the same "
                            f"command again to resume it") from None
        finally:
            bar.close()
    if total is not None and done != total:
        raise UserError(f"download of {url} stopped after {done:,} of {total:,} bytes; run the "
                        f"same command again to resume it")
    os.replace(part, path)


def unpack(packed_path, remote, path):
    """Write the text file `path` from a downloaded .gz file or tar archive (remote.member)."""
    try:
        if remote.member is not None:
            with tarfile.open(packed_path) as archive:
                source = archive.extractfile(remote.member)
                if source is None:
                    raise KeyError(remote.member)
                _copy_to(source, path)
        else:
            with gzip.open(packed_path, "rb") as source:
                _copy_to(source, path)
    except KeyError:
        raise UserError(f"{packed_path} holds no {remote.member}; delete it and rerun to download "
                        f"it again") from None
    except (OSError, EOFError, tarfile.TarError) as e:     # gzip.BadGzipFile is an OSError
        raise UserError(f"{packed_path} cannot be unpacked ({e}); delete it and rerun to download "
                        f"it again") from None


def _copy_to(source, path):
    """Copy a binary file object to `path` atomically (path.tmp, then renamed)."""
    with open(path + ".tmp", "wb") as out:
        shutil.copyfileobj(source, out, DOWNLOAD_CHUNK)
    os.replace(path + ".tmp", path)


def fetch(remote, base_url, raw_dir, progress=True):
    """DIR/raw/remote.name, downloaded (and unpacked) unless it is there already; checks its
    line count (UserError naming the file when it differs). Returns its number of lines."""
    path = os.path.join(raw_dir, remote.name)
    if not os.path.exists(path):
        url = base_url.rstrip("/") + "/" + remote.url_path
        downloaded = os.path.join(raw_dir, os.path.basename(remote.url_path))
        if not os.path.exists(downloaded):
            download(url, downloaded, progress)
        if downloaded != path:
            unpack(downloaded, remote, path)
    n = count_lines(path)
    if remote.lines is not None and n != remote.lines:
        raise UserError(f"{path} has {n:,} lines, expected {remote.lines:,}: the file is incomplete "
                        f"or not the published one; delete it and rerun to download it again")
    return n


def _join_files(paths, out_path):
    """Concatenate text files into out_path (atomically), ending every file's last line."""
    with open(out_path + ".tmp", "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, DOWNLOAD_CHUNK)
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        out.write(b"\n")
    os.replace(out_path + ".tmp", out_path)


def prepare_corpus(name, out_dir, mirror=None, progress=True):
    """Download corpus NAME (a key of CORPORA), check it, and write OUT_DIR/{split}.{lang} for
    the splits train, valid and test. mirror: a base URL used instead of the corpus's own
    (default: the environment variable SEQKD_MIRROR, else the official URL).
    Returns {split: (source path, target path, number of line pairs)}."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    base_url = mirror or os.environ.get("SEQKD_MIRROR") or corpus.base_url
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    print(f"{name}: {corpus.about}\n  from {base_url} into {raw_dir}")
    lines = {remote.name: fetch(remote, base_url, raw_dir, progress) for remote in corpus.files}

    written = {}
    for split, stems in corpus.splits.items():
        paths, counts = [], []
        for lang in (corpus.src, corpus.tgt):
            path = os.path.join(out_dir, f"{split}.{lang}")
            _join_files([os.path.join(raw_dir, f"{stem}.{lang}") for stem in stems], path)
            paths.append(path)
            counts.append(sum(lines[f"{stem}.{lang}"] for stem in stems))
        if counts[0] != counts[1]:
            raise UserError(f"{paths[0]} has {counts[0]:,} lines but {paths[1]} has {counts[1]:,}; "
                            f"delete {raw_dir} and rerun")
        written[split] = (paths[0], paths[1], counts[0])
        print(f"  {split}: {paths[0]}, {paths[1]}: {counts[0]:,} line pairs ({' + '.join(stems)})")

    def flags(split):
        return f"--{split}-src {written[split][0]} --{split}-tgt {written[split][1]}"
    bleu = " --bleu-tokenize none" if corpus.tokenized else ""
    print(f"train on it with:\n  python train.py {flags('train')} {flags('valid')} {flags('test')}{bleu}")
    return written


def main(argv=None):
    """python data.py prepare NAME --out DIR [--mirror URL]"""
    parser = argparse.ArgumentParser(prog="data.py", description="seqkd data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "prepare", help="download a public corpus and write DIR/{train,valid,test}.{src,tgt}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download a public parallel corpus, check the line count of every file, and\n"
                    "write DIR/{train,valid,test}.{SRC,TGT} for train.py. Downloads go to DIR/raw/;\n"
                    "an interrupted download resumes when the command is run again.",
        epilog="corpora:\n" + "\n".join(f"  {n}: {c.about}\n    {c.base_url}" for n, c in CORPORA.items()))
    p.add_argument("name", choices=list(CORPORA), help="the corpus")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--mirror", metavar="URL",
                   help="download from URL/<file> instead of the corpus's own site "
                        "(default: $SEQKD_MIRROR if set)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        return prepare_corpus(args.name, args.out, mirror=args.mirror, progress=not args.no_progress)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
