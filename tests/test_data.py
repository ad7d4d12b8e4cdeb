"""Tests for data.py: corpus errors, vocabularies, collate and batching."""
import io
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import synthetic  # noqa: E402
from data import BOS, EOS, PAD, SPECIALS, UNK, UserError  # noqa: E402
from test_flags import FILES, resolved  # noqa: E402  (the data flags a training names)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def save_and_load(obj):
    """Round trip through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def spm_vocab():
    lines = [src for src, _ in synthetic.synthetic_corpus(300, seed=5)]
    return data.SpmVocab.build(lines, 60), lines


# ---------------------------------------------------------------------------------------------
# Reading corpora: each bad input gets a one-line UserError naming the file
# ---------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.en: file not found"):
        data.read_lines(tmp_path / "nope.en")


def test_line_counts_differ_names_both_files_and_counts(tmp_path):
    src = write(tmp_path, "a.en", "one\ntwo\nthree\n")
    tgt = write(tmp_path, "a.de", "eins\nzwei\n")
    with pytest.raises(UserError) as e:
        data.read_parallel(src, tgt)
    msg = str(e.value)
    assert f"{src} has 3 lines" in msg and f"{tgt} has 2" in msg and "\n" not in msg


@pytest.mark.parametrize("content, line_no", [(b"ok\nfine\nbad \xff here\nok\n", 3),
                                               (b"\xc3(", 1),
                                               ("gr\u00fc\u00dfe\n".encode() + b"\n\x80", 3)])
def test_invalid_utf8_gives_line_number(tmp_path, content, line_no):
    path = write(tmp_path, "bad.de", content)
    with pytest.raises(UserError, match=f"bad.de: line {line_no} is not valid UTF-8"):
        data.read_lines(path)


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t\n"])
def test_empty_corpus(tmp_path, content):
    with pytest.raises(UserError, match="empty.en: the corpus is empty"):
        data.read_lines(write(tmp_path, "empty.en", content))


def test_lines_split_on_newline_only(tmp_path):
    # \r\n endings and a BOM are stripped; U+2028 (a Unicode line break) stays inside its line,
    # so the two sides of a corpus cannot drift apart; a blank line is kept for clean_pairs.
    path = write(tmp_path, "x.en", "\ufeffa  b \r\nc\u2028d\n\nlast")
    assert data.read_lines(path) == ["a  b", "c\u2028d", "", "last"]


def test_read_parallel_pairs(tmp_path):
    src = write(tmp_path, "p.en", "a b\nc\n")
    tgt = write(tmp_path, "p.de", "x\ny z\n")
    assert data.read_parallel(src, tgt) == [("a b", "x"), ("c", "y z")]


def test_clean_pairs_counts_and_summary(capsys):
    pairs = [("a b", "x"), ("", "y"), ("c", ""), ("a b c d", "x"), ("a", "x y z w"), ("a b c", "x y z")]
    kept, stats = data.clean_pairs(pairs, max_len=3, name="train")
    assert kept == [("a b", "x"), ("a b c", "x y z")]
    assert stats == {"total": 6, "kept": 2, "empty": 2, "too_long": 2}
    assert capsys.readouterr().out == "train: kept 2 of 6 pairs (2 empty, 2 longer than 3 tokens)\n"
    # without max_len (valid/test) only empty pairs go
    kept, stats = data.clean_pairs(pairs, name="valid")
    assert len(kept) == 4 and stats["too_long"] == 0
    assert capsys.readouterr().out == "valid: kept 4 of 6 pairs (2 empty)\n"


def test_clean_pairs_counts_sentencepiece_tokens(spm_vocab):
    vocab, lines = spm_vocab
    pairs = [(line, line) for line in lines[:40]]
    kept, stats = data.clean_pairs(pairs, max_len=12, src_vocab=vocab, tgt_vocab=vocab, verbose=False)
    expected = [p for p in pairs if len(vocab.encode(p[0])) <= 12]
    assert kept == expected
    assert 0 < stats["too_long"] < 40
    # counted in words, more of these lines would fit: pieces are what is counted
    assert sum(len(s.split()) <= 12 for s, _ in pairs) > len(expected)


def test_clean_pairs_nothing_left():
    with pytest.raises(UserError, match="no sentence pairs left.*--max-len"):
        data.clean_pairs([("a b c", "x"), ("", "y")], max_len=2, verbose=False)


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------


def test_word_vocab_frequency_ties_and_unk():
    # counts: a 3, c 2, then d, b, e once each (ties alphabetical: b d e, not in order of first
    # occurrence: d b e); "<unk>" in the text is not a word
    lines = ["d a c a", "c a b", "e <unk>"]
    vocab = data.WordVocab.build(lines, max_size=7)
    assert vocab.itos == SPECIALS + ["a", "c", "b"]
    assert len(vocab) == 7
    assert vocab.encode("a d b zz") == [4, UNK, 6, UNK]
    assert vocab.tokens([4, UNK]) == ["a", "<unk>"]
    assert vocab.tokenize(" a  d ") == ["a", "d"]
    # decode drops BOS and PAD and stops at the first EOS
    assert vocab.decode([BOS, 4, 5, PAD, EOS, 6]) == "a c"
    assert vocab.decode(torch.tensor([5, 6])) == "c b"
    # the order of the lines does not matter
    assert data.WordVocab.build(lines[::-1], max_size=7).itos == vocab.itos


def test_word_vocab_too_small():
    with pytest.raises(UserError, match="vocabulary size 4 is too small.*--src-vocab-size"):
        data.WordVocab.build(["a b"], max_size=4)


def test_word_vocab_round_trip():
    pairs = synthetic.synthetic_corpus(200, seed=3)
    src_vocab, tgt_vocab = data.build_vocabs([s for s, _ in pairs], [t for _, t in pairs])
    assert src_vocab is not tgt_vocab and "sees" in src_vocab.stoi and "sieht" in tgt_vocab.stoi
    for src, tgt in pairs:
        assert src_vocab.decode(src_vocab.encode(src)) == src
        assert tgt_vocab.decode(tgt_vocab.encode(tgt)) == tgt
    restored = data.vocab_from_dict(save_and_load(src_vocab.to_dict()))
    assert isinstance(restored, data.WordVocab) and restored.itos == src_vocab.itos


def test_spm_vocab_specials_round_trip(spm_vocab):
    vocab, lines = spm_vocab
    assert len(vocab) == 60
    assert vocab.tokens([PAD, UNK, BOS, EOS]) == SPECIALS
    for line in lines:
        ids = vocab.encode(line)
        assert min(ids) > EOS                     # no specials inside a sentence
        assert vocab.decode(ids) == line
        assert vocab.decode([BOS] + ids + [EOS, 7, 8]) == line
    assert "".join(vocab.tokenize(lines[0])).replace("\u2581", " ").strip() == lines[0]
    restored = data.vocab_from_dict(save_and_load(vocab.to_dict()))
    assert isinstance(restored, data.SpmVocab)
    assert [restored.encode(line) for line in lines] == [vocab.encode(line) for line in lines]
    assert vocab.encode_batch(lines[:5]) == [vocab.encode(line) for line in lines[:5]]


def test_spm_vocab_too_large_suggests_smaller(spm_vocab):
    _, lines = spm_vocab
    with pytest.raises(UserError, match=r"size 5000 is too large.*--tgt-vocab-size \d+ or less"):
        data.SpmVocab.build(lines, 5000)


def test_build_vocabs_joint_and_checkpoint():
    src_lines, tgt_lines = ["a b a", "c"], ["x y", "x"]
    src_vocab, tgt_vocab = data.build_vocabs(src_lines, tgt_lines, joint=True, src_size=10)
    assert src_vocab is tgt_vocab and src_vocab.itos == SPECIALS + ["a", "x", "b", "c", "y"]
    ckpt = save_and_load({"vocab": {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()}})
    s, t = data.vocabs_from_checkpoint(ckpt)
    assert s is t and s.itos == src_vocab.itos
    src_vocab, tgt_vocab = data.build_vocabs(src_lines, tgt_lines, src_size=10, tgt_size=5)
    s, t = data.vocabs_from_checkpoint({"vocab": {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()}})
    assert s.itos == SPECIALS + ["a", "b", "c"] and t.itos == SPECIALS + ["x"]
    with pytest.raises(UserError, match="--tokenizer"):
        data.build_vocabs(src_lines, tgt_lines, kind="bpe")
    with pytest.raises(UserError, match="unknown vocabulary kind"):
        data.vocab_from_dict({"kind": "chars"})


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_collate_exact_tensors():
    examples = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13]), ([99], [99])]
    batch = data.collate(examples, [0, 1])
    assert batch.src.tolist() == [[5, 6, 7], [10, PAD, PAD]]
    assert batch.src_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tgt_in.tolist() == [[BOS, 8, 9, PAD], [BOS, 11, 12, 13]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS, PAD], [11, 12, 13, EOS]]
    assert batch.ids.tolist() == [0, 1]
    assert batch.ntokens == 7
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.src_mask.dtype == torch.bool
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.ntokens == 7


def test_batch_indices_hand_computed():
    # sorted by (src, tgt): 1 (1,1) size 2, 3 (2,2) size 3, 0 (3,2) size 3, 2 (5,5) size 6;
    # budget 6: [1,3] costs 2*3 = 6; adding 0 would cost 9; [0,2] would cost 12; 2 alone is 6
    lengths = [(3, 2), (1, 1), (5, 5), (2, 2)]
    assert data.batch_indices(lengths, batch_tokens=6, shuffle=False) == [[1, 3], [0], [2]]
    assert data.batch_indices(lengths, batch_size=3, shuffle=False) == [[1, 3, 0], [2]]
    # the target side counts one more (BOS/EOS): 3 tokens each, so 2 sentences fit in 6, not 3
    assert data.batch_indices([(1, 2)] * 3, batch_tokens=6, shuffle=False) == [[0, 1], [2]]
    # an example over the budget gets a batch of its own, it is never dropped
    assert data.batch_indices([(10, 10), (1, 1)], batch_tokens=5, shuffle=False) == [[1], [0]]
    with pytest.raises(UserError, match="--batch-tokens or --batch-size"):
        data.batch_indices(lengths)


def random_lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(1, 30), rng.randint(1, 30)) for _ in range(n)]


def test_batch_indices_token_budget_and_determinism():
    lengths = random_lengths()
    batches = data.batch_indices(lengths, batch_tokens=200, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))   # each index once
    for b in batches:
        assert len(b) * max(max(lengths[i][0], lengths[i][1] + 1) for i in b) <= 200
    assert data.batch_indices(lengths, batch_tokens=200, seed=1, epoch=0) == batches
    assert data.batch_indices(lengths, batch_tokens=200, seed=1, epoch=1) != batches
    assert data.batch_indices(lengths, batch_tokens=200, seed=2, epoch=0) != batches
    # batches hold similar lengths: far less padding than random batches of the same sizes
    padded = sum(len(b) * max(lengths[i][0] for i in b) for b in batches)
    assert padded < 1.2 * sum(s for s, _ in lengths)


def test_batch_indices_by_sentence_count():
    lengths = random_lengths()
    batches = data.batch_indices(lengths, batch_size=16, seed=0, epoch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert sorted(len(b) for b in batches) == [500 - 31 * 16] + [16] * 31


def test_batch_indices_leaves_global_rngs_alone():
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    data.batch_indices(random_lengths(), batch_tokens=100, seed=4, epoch=2)
    synthetic.synthetic_corpus(10, seed=4)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_batches_cover_the_corpus():
    pairs = synthetic.synthetic_corpus(300, seed=2)
    src_vocab, tgt_vocab = data.build_vocabs([s for s, _ in pairs], [t for _, t in pairs])
    examples = data.encode_pairs(pairs, src_vocab, tgt_vocab)
    assert examples[0] == (src_vocab.encode(pairs[0][0]), tgt_vocab.encode(pairs[0][1]))
    batches = data.batches(examples, batch_tokens=300, seed=0, epoch=0)
    assert sum(b.ntokens for b in batches) == sum(len(t) + 1 for _, t in examples)
    for b in batches:
        for row, i in enumerate(b.ids.tolist()):
            src_ids = b.src[row][b.src_mask[row]].tolist()
            assert src_vocab.decode(src_ids) == pairs[i][0]
            assert tgt_vocab.decode(b.tgt_out[row].tolist()) == pairs[i][1]


# ---- what train.py's data flags name: the splits, the vocabularies ---------------------------

def test_a_new_vocabulary_holds_no_word_of_a_dropped_pair():
    pairs = [("a b c", "x y"), ("b c", "y z")]
    junk = [(" ".join(f"s{i}" for i in range(51)), "x"), ("a", " ".join(f"t{i}" for i in range(51))),
            ("", "t-empty"), ("s-empty", " ")]      # longer than --max-len 50 words, or empty
    for argv in [[], ["--joint-vocab"], ["--arch", "t5"]]:
        args = resolved(*FILES, *argv)
        src_vocab, tgt_vocab = data.get_vocabs(args, pairs + junk, None, None)
        words = set(src_vocab.itos) | set(tgt_vocab.itos)
        assert {"a", "b", "c", "x", "y", "z"} <= words and not any(w[0] in "st" for w in words if w[0] != "<")
        clean = data.get_vocabs(args, pairs, None, None)   # the same as without the dropped pairs
        assert [v.itos for v in clean] == [src_vocab.itos, tgt_vocab.itos]


def test_load_splits_builtin_and_span_corruption():
    splits = data.load_splits(resolved())
    assert splits == synthetic.builtin_splits() and {"train", "valid"} <= set(splits)
    mono = data.load_splits(resolved("--span-corruption"))             # the source side, as (s, s) pairs
    assert set(mono) == {"train", "valid"}
    assert mono["train"] == [(s, s) for s, _ in splits["train"]]
    assert mono["valid"] == [(s, s) for s, _ in splits["valid"]]
