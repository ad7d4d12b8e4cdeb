"""
Data for seqkd, top to bottom: 1. the special ids and UserError; 2. vocabularies (word and
sentencepiece; to_dict()/vocab_from_dict() carry one in a checkpoint); 3. reading corpora;
4. batching; 5. what train.py's data flags name (load_splits, get_vocabs, span_corruption_data).
The rest of the data code: synthetic.py (the built-in language pair), span_corruption.py (T5 span
corruption), prepare.py (downloading a public corpus).

Conventions used everywhere in seqkd:
  - ids PAD=0, UNK=1, BOS=2, EOS=3 in every vocabulary (word and sentencepiece alike);
  - sentences are encoded WITHOUT BOS/EOS; collate() adds them: src = x1 .. xm,
    tgt_in = BOS y1 .. yn, tgt_out = y1 .. yn EOS, each PAD-padded (see Batch);
  - masks are boolean and True = real token (False = padding): src_mask = src != PAD;
  - bad user input raises UserError with a one-line message naming the file or flag and the fix.
"""

import io
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import sentencepiece
import torch

import synthetic

# 1. Constants and errors ---------------------------------------------------------------------

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


class UserError(Exception):
    """A mistake in the user's input (a file, a flag); command-line tools print it without a traceback."""


def plural(n: int, word: str) -> str:
    """A count and its word for messages: 1 epoch, 2 epochs, 1,000 lines."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# 2. Vocabularies -----------------------------------------------------------------------------
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
    def build(cls, lines, vocab_size, model_type="unigram", user_defined_symbols=()):
        """Train sentencepiece on `lines` in memory (no temporary files) with `vocab_size` pieces
        (specials included). model_type: unigram | bpe | char | word. user_defined_symbols: pieces never
        split, at the ids right after the specials, counted in vocab_size (span_corruption.py's sentinels)."""
        symbols = list(user_defined_symbols)
        counting = f" (it counts the {len(symbols)} sentinels)" if symbols else ""
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model,
                vocab_size=vocab_size, model_type=model_type, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                pad_piece=SPECIALS[PAD], unk_piece=SPECIALS[UNK],
                bos_piece=SPECIALS[BOS], eos_piece=SPECIALS[EOS], user_defined_symbols=symbols,
                input_sentence_size=2_000_000, shuffle_input_sentence=True,  # sample big corpora
                num_threads=os.cpu_count() or 1, minloglevel=2)              # minloglevel: quiet
        except (RuntimeError, ValueError) as e:
            if largest := re.search(r"value <= (\d+)", str(e)):
                n = largest.group(1)
                raise UserError(f"vocabulary size {vocab_size}{counting} is too large for this "
                                f"training text (sentencepiece can make at most {n} pieces); use "
                                f"--src-vocab-size/--tgt-vocab-size {n} or less") from None
            raise UserError(f"sentencepiece training failed ({str(e).splitlines()[0]}); check the "
                            f"vocabulary size{counting}, the model type and the training text") from None
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
    if kind not in ("word", "spm"):
        raise UserError(f"--tokenizer must be 'word' or 'spm', got {kind!r}")
    build = WordVocab.build if kind == "word" else SpmVocab.build
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


# 3. Reading corpora --------------------------------------------------------------------------


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
        raise UserError(f"{src_path} has {plural(len(src), 'line')} but {tgt_path} has {len(tgt):,}; "
                        f"a parallel corpus needs one sentence per line on both sides")
    return list(zip(src, tgt))


def clean_pairs(pairs, max_len=None, src_vocab=None, tgt_vocab=None, name="train", verbose=True):
    """Drop pairs with an empty side and, when max_len is given (training), pairs with either side
    longer than max_len tokens of the given vocabulary (whitespace words without one; train.py
    builds a new vocabulary on the pairs this keeps by words, then filters again in its tokens).
    Prints one line, e.g. "train: kept 28,950 of 29,000 pairs (12 empty, 38 longer than 50 tokens)".
    Returns (kept_pairs, {"total", "kept", "empty", "too_long"}); UserError when no pair is left."""
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

    too_long = f", {n_long:,} longer than {max_len} tokens" if max_len is not None else ""
    summary = f"{n_empty:,} empty{too_long}"
    if verbose:
        print(f"{name}: kept {len(kept):,} of {plural(len(pairs), 'pair')} ({summary})")
    if not kept:
        raise UserError(f"{name}: no sentence pairs left ({summary}); check the files"
                        + (" or raise --max-len" if n_long else ""))
    return kept, {"total": len(pairs), "kept": len(kept), "empty": n_empty, "too_long": n_long}


# 4. Batching ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch. Masks: True = real token, False = PAD."""

    src: torch.Tensor        # (B, S) long   x1 .. xm, PAD-padded
    src_mask: torch.Tensor   # (B, S) bool   src != PAD
    tgt_in: torch.Tensor     # (B, T) long   BOS y1 .. yn, PAD-padded (decoder input, teacher forcing)
    tgt_out: torch.Tensor    # (B, T) long   y1 .. yn EOS, PAD-padded (what the decoder must predict)
    ids: torch.Tensor        # (B,)   long   index of each example in the dataset
    ntokens: int             # non-PAD tokens in tgt_out (the loss normaliser)

    def to(self, device):
        return Batch(self.src.to(device), self.src_mask.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.ids.to(device), self.ntokens)


def encode_pairs(pairs, src_vocab, tgt_vocab):
    """[(src_ids, tgt_ids), ...] without BOS/EOS."""
    src, tgt = src_vocab.encode_batch([s for s, _ in pairs]), tgt_vocab.encode_batch([t for _, t in pairs])
    return list(zip(src, tgt))


def pad(seqs):
    """(B, L) long: the B token sequences (lists of ids) one per row, PAD after each one's end;
    L = the longest length. The one batch padder (collate, beam.pad_sources)."""
    L = max((len(s) for s in seqs), default=0)
    return torch.tensor([list(s) + [PAD] * (L - len(s)) for s in seqs],
                        dtype=torch.long).view(len(seqs), L)                          # (B, L)


def collate(examples, idxs):
    """The Batch of examples[i] for i in idxs (examples: [(src_ids, tgt_ids), ...])."""
    idxs = [int(i) for i in idxs]
    src = pad([examples[i][0] for i in idxs])                           # (B, S)
    tgts = [list(examples[i][1]) for i in idxs]
    tgt_in = pad([[BOS] + t for t in tgts])                             # (B, T), T = max n + 1
    tgt_out = pad([t + [EOS] for t in tgts])                            # (B, T)
    return Batch(src=src, src_mask=src != PAD, tgt_in=tgt_in, tgt_out=tgt_out,
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
    Randomness: a torch.Generator seeded with (seed, epoch), no global RNG: the same (seed, epoch) gives
    the same batches, another epoch another order; unshuffled: shortest first. Each index appears once."""
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


# 5. What train.py's data flags name: the text of each split, the vocabularies ---------------------------
# (span_corruption imports this module: it is imported inside the functions that need it)

def load_splits(args) -> dict[str, list[tuple[str, str]]]:
    """Raw sentence pairs: {"train", "valid"[, "test"]} from the files given, else the built-in corpus.

    With --span-corruption the text is monolingual: {"train": --mono (else the training source side),
    "valid": the validation source side}, each sentence as a pair (sentence, sentence) so that
    clean_pairs treats it like a corpus; only the first of the two is read afterwards."""
    if args.span_corruption:
        builtin = synthetic.builtin_splits() if args.builtin else None
        train = (read_lines(args.mono) if args.mono else [s for s, _ in builtin["train"]] if builtin
                 else read_lines(args.train_src))
        valid = [s for s, _ in builtin["valid"]] if builtin else read_lines(args.valid_src)
        return {"train": [(s, s) for s in train], "valid": [(s, s) for s in valid]}
    if args.builtin:
        return synthetic.builtin_splits()
    splits = {"train": read_parallel(args.train_src, args.train_tgt),
              "valid": read_parallel(args.valid_src, args.valid_tgt)}
    if args.test_src:
        splits["test"] = read_parallel(args.test_src, args.test_tgt)
    return splits


def get_vocabs(args, train_pairs, vocab_ckpt, vocab_source):
    """train.py's vocabularies: those of `vocab_ckpt` (resume, init, --vocab-from, teacher) or new ones. A new one
    is joint (one object for both sides) with --joint-vocab, --arch t5 (one embedding for both sides) and
    --span-corruption (one language); a joint one holds --sentinels entries <X0>, <X1>, ... after the specials.
    A new one is built on the pairs not empty and of at most --max-len words a side (more words are more tokens
    too), so that no dropped line adds words; read_data then filters in its tokens."""
    import span_corruption
    if vocab_ckpt is not None:
        src_vocab, tgt_vocab = vocabs_from_checkpoint(vocab_ckpt)
        n_sentinels = len(span_corruption.sentinel_ids(src_vocab))
        print(f"vocabularies from {vocab_source}: {len(src_vocab)} source, {len(tgt_vocab)} target ({src_vocab.kind}"
              f"{', joint' if src_vocab is tgt_vocab else ''}, {n_sentinels} sentinels)")
        return src_vocab, tgt_vocab
    why_joint = ("--span-corruption: one language" if args.span_corruption else
                 "--arch t5 shares one embedding between source and target" if args.arch == "t5" else
                 "--joint-vocab" if args.joint_vocab else None)
    train_pairs, _ = clean_pairs(train_pairs, max_len=args.max_len, verbose=False)  # in words
    src_lines = [s for s, _ in train_pairs]
    tgt_lines = [] if args.span_corruption else [t for _, t in train_pairs]   # monolingual: one side
    if why_joint is None:
        if args.sentinels:
            raise UserError("--sentinels: span-corruption sentinels need a joint vocabulary: add --joint-vocab")
        src_vocab, tgt_vocab = build_vocabs(src_lines, tgt_lines, kind=args.tokenizer,
                                            src_size=args.src_vocab_size, tgt_size=args.tgt_vocab_size)
        print(f"vocabularies built from the training data: {len(src_vocab)} source, {len(tgt_vocab)} target")
        return src_vocab, tgt_vocab
    if args.sentinels:
        vocab = span_corruption.build_vocab_with_sentinels(src_lines + tgt_lines, args.tokenizer,
                                                           args.src_vocab_size, args.sentinels)
    else:
        vocab, _ = build_vocabs(src_lines + tgt_lines, [], kind=args.tokenizer,
                                src_size=args.src_vocab_size, joint=True)
    print(f"vocabulary built from the training data: {len(vocab)} entries, joint ({why_joint}), "
          f"{args.sentinels} of them sentinels <X0>, <X1>, ... for span corruption")
    return vocab, vocab


def span_corruption_sentinels(src_vocab, tgt_vocab, vocab_source) -> list[int]:
    """--span-corruption reads and writes one language: the ids of the joint vocabulary's sentinels."""
    import span_corruption
    source = vocab_source or "the training data"
    if src_vocab is not tgt_vocab:
        raise UserError(f"--span-corruption needs one joint vocabulary, but {source} has separate source and "
                        "target vocabularies; build a new one (no --vocab-from) or use a --arch t5 checkpoint")
    sentinels = span_corruption.sentinel_ids(src_vocab)
    if not sentinels:
        raise UserError(f"--span-corruption: the vocabulary of {source} has no sentinels <X0>, <X1>, ...; "
                        "use a checkpoint trained with --arch t5 or --span-corruption, or --sentinels N")
    return sentinels


def span_corruption_data(args, src_vocab, tgt_vocab, train_pairs, valid_pairs, vocab_source):
    """--span-corruption: (the sentinel ids, the training sentences [ids, ...] (train.py makes their examples
    afresh every epoch), the validation examples [(src_ids, tgt_ids)], made once, and their texts [(src, tgt)],
    for greedy BLEU). The pairs are clean_pairs' (sentence, sentence)."""
    import span_corruption
    sentinels = span_corruption_sentinels(src_vocab, tgt_vocab, vocab_source)
    train_sentences = src_vocab.encode_batch([s for s, _ in train_pairs])
    valid_examples = span_corruption.span_corruption_examples(
        src_vocab.encode_batch([s for s, _ in valid_pairs]), sentinels, args.seed, 0, args.noise_density,
        args.mean_span_length)
    valid_texts = [(src_vocab.decode(x), tgt_vocab.decode(y)) for x, y in valid_examples]
    print(f"span corruption: {len(train_sentences):,} training and {len(valid_examples):,} validation "
          f"sentences, noise density {args.noise_density}, mean span length {args.mean_span_length}; "
          f"e.g. {valid_texts[0][0]!r} -> {valid_texts[0][1]!r}")
    return sentinels, train_sentences, valid_examples, valid_texts


if __name__ == "__main__":
    sys.exit("error: data.py is a library; to download a public corpus run: "
             "python prepare.py NAME --out DIR")
