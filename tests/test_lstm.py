"""Tests of lstm.py: the decoding interface agrees with teacher forcing, padding is invisible,
attention, initialisation, input feeding, the papers' sizes. Tiny models, seeded."""
import dataclasses

import pytest
import torch

import lstm
import model as M
from data import PAD, BOS


def tiny(attention="general", bidirectional=False, input_feed=True, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = M.make_config("lstm", "tiny", src_vocab=13, tgt_vocab=11, layers=layers,
                        attention=attention, bidirectional=bidirectional, input_feed=input_feed)
    return lstm.Seq2Seq(cfg).eval()


def padded(rows, length):
    """Token rows -> (B, length) PAD-padded tensor and its mask."""
    x = torch.full((len(rows), length), PAD)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    return x, x != PAD


SRC = [[5, 6, 7, 8, 9], [4, 12, 7]]
TGT_IN = [[BOS, 5, 6, 7], [BOS, 9, 10]]


def assert_steps_equal_forward(m, src, src_mask, tgt_in):
    """start + one step per target position gives teacher forcing's log-probs (as float32) and
    attention, for any model of the interface. Returns the state after each step."""
    states = []
    with torch.no_grad():
        logits, attn = m(src, src_mask, tgt_in)                   # (B, T, V), (B, T, S)
        full = torch.log_softmax(logits, -1)
        state = m.start(src, src_mask)
        for t in range(tgt_in.size(1)):
            logp, a, state = m.step(tgt_in[:, t], state)
            assert logp.dtype == torch.float32
            torch.testing.assert_close(logp, full[:, t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, attn[:, t], rtol=1e-5, atol=1e-6)
            states.append(state)
    return states


@pytest.mark.parametrize("attention", ["dot", "general", "concat"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_incremental_decoding_equals_full_forward(attention, bidirectional):
    m = tiny(attention, bidirectional)
    src, src_mask = padded(SRC, 5)
    tgt_in, _ = padded(TGT_IN, 4)
    assert_steps_equal_forward(m, src, src_mask, tgt_in)


def assert_padding_is_invisible(m, src, tgt_in, src_len, tgt_len):
    """The second sentence (3 source, 3 target tokens) gets the same logits and attention alone
    and in the batch of both, padded to src_len and tgt_len; attention never looks at padding,
    and sums to one over the real source words."""
    alone_src, alone_mask = padded(src[1:], 3)
    alone_tgt, _ = padded(tgt_in[1:], 3)
    batch_src, batch_mask = padded(src, src_len)
    batch_tgt, _ = padded(tgt_in, tgt_len)
    with torch.no_grad():
        alone, a_alone = m(alone_src, alone_mask, alone_tgt)
        batch, a_batch = m(batch_src, batch_mask, batch_tgt)
    torch.testing.assert_close(batch[1, :3], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_batch[1, :3, :3], a_alone[0], rtol=1e-5, atol=1e-6)
    assert torch.all(a_batch[1, :, 3:] == 0)
    torch.testing.assert_close(a_batch.sum(-1), torch.ones(2, tgt_len))


def test_padding_does_not_change_a_sentences_outputs():
    # extra source padding beyond the longest sentence
    assert_padding_is_invisible(tiny(bidirectional=True), SRC, TGT_IN, src_len=7, tgt_len=4)


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
    assert with_feed.rnn.W_e.weight.shape == without.rnn.W_e.weight.shape == (4 * 16, 8)   # the word's part
    assert with_feed.rnn.W[0].weight.shape[1] == 16 + 16    # [h~_{t-1}; h_{t-1}]
    assert without.rnn.W[0].weight.shape[1] == 16           # h_{t-1} only


def test_presets_have_the_papers_sizes():
    teacher = M.make_config("lstm", "kim-rush-teacher", src_vocab=50004, tgt_vocab=50004)
    student = M.make_config("lstm", "kim-rush-student", src_vocab=50004, tgt_vocab=50004)
    assert (teacher.layers, teacher.hidden, student.layers, student.hidden) == (4, 1000, 2, 500)
    # Kim & Rush (2016), Table 1: 221m teacher and 84m student parameters with 50k vocabularies.
    # Built on the meta device: shapes only, no memory.
    with torch.device("meta"):
        n_teacher = M.count_params(lstm.Seq2Seq(teacher)) / 1e6
        n_student = M.count_params(lstm.Seq2Seq(student)) / 1e6
    assert abs(n_teacher - 221) < 1 and abs(n_student - 84) < 1, (n_teacher, n_student)


def lstmcell_reference(m, cells, src, src_mask, tgt_in):
    """Teacher forcing written with torch's nn.LSTMCell (the decoder's previous form): the input
    [e_t; h~_{t-1}] through two products per layer, W_ih x + b_ih + W_hh h + b_hh."""
    state = m.start(src, src_mask)
    h, c, feed = list(state["h"].unbind(1)), list(state["c"].unbind(1)), state["feed"]
    outputs = []
    for t in range(tgt_in.size(1)):
        x = torch.cat([m.tgt_embed(tgt_in[:, t]), feed], 1)
        for i, cell in enumerate(cells):
            h[i], c[i] = cell(x, (h[i], c[i]))
            x = h[i]
        context, _ = m.attention(x, state["keys"], state["memory"], state["src_mask"])
        feed = torch.tanh(m.W_c(torch.cat([context, x], 1)))
        outputs.append(feed)
    return m.generator(torch.stack(outputs, 1))


def test_decoder_equals_lstmcells_and_their_checkpoints_load(tmp_path):
    """Weights in nn.LSTMCell's layout (as older checkpoints hold them), converted by
    from_lstm_cells, give the reference's logits; the conversion only regroups the numbers."""
    m = tiny()
    torch.manual_seed(1)
    cells = torch.nn.ModuleList([torch.nn.LSTMCell(8 + 16, 16), torch.nn.LSTMCell(16, 16)])
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("rnn.")}
    old.update({f"cells.{k}": v for k, v in cells.state_dict().items()})
    new, renamed = lstm.from_lstm_cells(old)
    assert renamed["cells.0.weight_ih"] == ["rnn.W_e.weight", "rnn.W.0.weight"]
    assert sorted(new) == sorted(m.state_dict())
    m.load_state_dict(new)
    src, src_mask = padded(SRC, 5)
    tgt_in, _ = padded(TGT_IN, 4)
    with torch.no_grad():
        logits, _ = m(src, src_mask, tgt_in)
        torch.testing.assert_close(logits, lstmcell_reference(m, cells, src, src_mask, tgt_in),
                                   rtol=1e-5, atol=1e-6)
    old["cells.1.weight_hh"][0, :3] = 0.0                       # "pruned" in the old layout
    M.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": dataclasses.asdict(m.cfg),
                       "model": old, "masks": ["cells.1.weight_hh"]}, tmp_path / "old.pt")
    loaded = M.load_checkpoint(str(tmp_path / "old.pt"))
    M.model_from_checkpoint(loaded)
    assert set(loaded["masks"]) == {"rnn.W.1.weight"}
    assert (~loaded["masks"]["rnn.W.1.weight"]).sum() == 3
