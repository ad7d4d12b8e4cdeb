"""Tests of model.py: the decoding interface agrees with teacher forcing, padding is invisible,
checkpoints round-trip. Tiny models, seeded."""
from dataclasses import asdict

import pytest
import torch

import model as M
from data import PAD, BOS, UserError


def tiny(attention="general", bidirectional=False, input_feed=True, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = M.make_config("lstm", "tiny", src_vocab=13, tgt_vocab=11, layers=layers,
                        attention=attention, bidirectional=bidirectional, input_feed=input_feed)
    return M.Seq2Seq(cfg).eval()


def padded(rows, length):
    """Token rows -> (B, length) PAD-padded tensor and its mask."""
    x = torch.full((len(rows), length), PAD)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    return x, x != PAD


SRC = [[5, 6, 7, 8, 9], [4, 12, 7]]
TGT_IN = [[BOS, 5, 6, 7], [BOS, 9, 10]]


@pytest.mark.parametrize("attention", ["dot", "general", "concat"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_incremental_decoding_equals_full_forward(attention, bidirectional):
    m = tiny(attention, bidirectional)
    src, src_mask = padded(SRC, 5)
    tgt_in, _ = padded(TGT_IN, 4)
    with torch.no_grad():
        logits, attn = m(src, src_mask, tgt_in)                   # (B, T, V), (B, T, S)
        full = torch.log_softmax(logits, -1)
        state = m.start(src, src_mask)
        for t in range(tgt_in.size(1)):
            logp, a, state = m.step(tgt_in[:, t], state)
            torch.testing.assert_close(logp, full[:, t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, attn[:, t], rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_a_sentences_outputs():
    m = tiny(bidirectional=True)
    alone_src, alone_mask = padded(SRC[1:], 3)
    alone_tgt, _ = padded(TGT_IN[1:], 3)
    batch_src, batch_mask = padded(SRC, 7)       # extra padding beyond the longest sentence
    batch_tgt, _ = padded(TGT_IN, 4)
    with torch.no_grad():
        alone, a_alone = m(alone_src, alone_mask, alone_tgt)
        batch, a_batch = m(batch_src, batch_mask, batch_tgt)
    torch.testing.assert_close(batch[1, :3], alone[0], rtol=1e-5, atol=1e-5)
    # attention never looks at padding, and sums to one over the real source words
    assert torch.all(a_batch[1, :, 3:] == 0)
    torch.testing.assert_close(a_batch.sum(-1), torch.ones(2, 4))


def test_attention_weights_are_a_softmax_of_the_dot_score():
    # dot attention on a one-word source must put all weight on that word
    m = tiny("dot")
    src, src_mask = padded([[5]], 1)
    with torch.no_grad():
        _, attn = m(src, src_mask, torch.tensor([[BOS, 4]]))
    assert torch.allclose(attn, torch.ones(1, 2, 1))


def test_reorder_selects_rows_of_every_state_entry():
    m = tiny()
    src, src_mask = padded(SRC, 5)
    state = m.start(src, src_mask)
    index = torch.tensor([1, 1, 0])
    new = m.reorder(state, index)
    assert set(new) == set(state)
    for k in state:
        assert new[k].shape[0] == 3
        assert torch.equal(new[k][0], state[k][1]) and torch.equal(new[k][2], state[k][0])


def test_uniform_initialisation_in_range():
    m = tiny()
    for p in m.parameters():
        assert p.abs().max() <= 0.1


def test_no_input_feed_has_smaller_first_layer():
    with_feed, without = tiny(input_feed=True), tiny(input_feed=False)
    assert with_feed.cells[0].weight_ih.shape[1] == 8 + 16    # emb + h~
    assert without.cells[0].weight_ih.shape[1] == 8


def test_checkpoint_round_trip(tmp_path):
    m = tiny()
    path = tmp_path / "m.pt"
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(m.cfg), "model": m.state_dict(),
            "vocab": {"src": {"kind": "word", "itos": ["a"]}}, "blob": b"\x00\x01"}
    M.save_checkpoint(ckpt, path)
    assert not (tmp_path / "m.pt.tmp").exists()
    loaded = M.model_from_checkpoint(M.load_checkpoint(str(path)))
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a seqkd checkpoint"):
        M.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        M.load_checkpoint(str(tmp_path / "garbage.pt"))
    with pytest.raises(UserError, match="unknown architecture"):
        M.build_model("gru", {})


def test_config_errors():
    with pytest.raises(UserError, match="--preset"):
        M.make_config("lstm", "huge")
    with pytest.raises(UserError, match="--attention"):
        M.make_config("lstm", "tiny", attention="bahdanau")
    with pytest.raises(UserError, match="even"):
        M.make_config("lstm", "tiny", hidden=15, bidirectional=True)


def test_presets_have_the_papers_sizes():
    teacher = M.make_config("lstm", "kim-rush-teacher", src_vocab=50004, tgt_vocab=50004)
    student = M.make_config("lstm", "kim-rush-student", src_vocab=50004, tgt_vocab=50004)
    assert (teacher.layers, teacher.hidden, student.layers, student.hidden) == (4, 1000, 2, 500)
    # Kim & Rush (2016), Table 1: 221m teacher and 84m student parameters with 50k vocabularies.
    # Built on the meta device: shapes only, no memory.
    with torch.device("meta"):
        n_teacher = M.count_params(M.Seq2Seq(teacher)) / 1e6
        n_student = M.count_params(M.Seq2Seq(student)) / 1e6
    assert abs(n_teacher - 221) < 1 and abs(n_student - 84) < 1, (n_teacher, n_student)
