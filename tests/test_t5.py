"""Tests of the T5-like model (t5.py): relative-position buckets, RMS norm, the
tied output layer, T5's initialisation, padding invariance, the key/value cache, the recorded
queries/keys/values, config errors, checkpoints, and beam search on it. Tiny models, seeded."""
import dataclasses
import math

import pytest
import torch

import beam
import model as M
import t5
from data import BOS, EOS, PAD, UserError
from test_lstm import assert_padding_is_invisible, assert_steps_equal_forward, padded


def tiny_t5(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = M.make_config("t5", "t5-tiny", src_vocab=13, tgt_vocab=13, **overrides)
    return t5.T5Model(cfg).eval()


SRC = [[5, 6, 7, 8, 9, 10], [4, 12, 7]]
TGT_IN = [[BOS, 5, 6, 7, 8], [BOS, 9, 10]]


# ---------------------------------------------------------------------------------------------
# Relative positions and RMS norm
# ---------------------------------------------------------------------------------------------

def buckets(distances, bidirectional):
    return t5.relative_position_bucket(torch.tensor(distances), bidirectional, 32, 128).tolist()


def test_bidirectional_buckets_hand_values():
    # 16 buckets per direction; distances 0..7 exact; 8..127 logarithmic in buckets 8..15:
    #   d -> 8 + floor(8 * log(d / 8) / log(128 / 8)):  12 -> 8 + floor(1.17) = 9,  16 -> 10,
    #   32 -> 12, 64 -> 14, 128 -> 16 -> clipped to 15. Keys after the query: +16.
    before = [0, -1, -7, -8, -11, -12, -16, -32, -64, -100, -128, -1000]
    assert buckets(before, True) == [0, 1, 7, 8, 8, 9, 10, 12, 14, 15, 15, 15]
    after = [1, 7, 8, 12, 16, 100, 1000]
    assert buckets(after, True) == [17, 23, 24, 25, 26, 31, 31]


def test_causal_buckets_hand_values():
    # all 32 buckets look back; 0..15 exact; d -> 16 + floor(16 * log(d / 16) / log(128 / 16)):
    #   17 -> 16 + floor(0.47) = 16,  32 -> 16 + floor(16/3) = 21,  64 -> 16 + floor(32/3) = 26,
    #   128 -> 32 -> clipped to 31.
    # Keys after the query (masked in the decoder anyway) share bucket 0.
    assert buckets([0, -1, -15, -16, -17, -32, -64, -128, -5000], False) == \
        [0, 1, 15, 16, 16, 21, 26, 31, 31]
    assert buckets([1, 3, 200], False) == [0, 0, 0]


def test_position_bias_depends_only_on_the_distance():
    m = tiny_t5()
    bias = m.enc_position(5, 5)                                         # (1, heads, 5, 5)
    assert bias.shape == (1, 2, 5, 5)
    table = m.enc_position.bias.weight                                  # (32, heads)
    assert torch.equal(bias[0, :, 1, 3], table[16 + 2])                 # key 2 after the query
    assert torch.equal(bias[0, :, 3, 1], table[2])                      # key 2 before
    # the decoder's bias for a query at offset 4 is row 4 of the full table
    full = m.dec_position(6, 6)
    torch.testing.assert_close(m.dec_position(1, 5, offset=4)[0, :, 0], full[0, :, 4, :5])


def test_rms_norm_hand_vector():
    norm = t5.RMSNorm(2, eps=0.0)
    x = torch.tensor([3.0, 4.0])                  # mean of squares (9 + 16) / 2 = 12.5
    r = math.sqrt(12.5)
    torch.testing.assert_close(norm(x), torch.tensor([3 / r, 4 / r]))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(norm(x), torch.tensor([6 / r, 2 / r]))
    # no mean subtraction (LayerNorm would give zeros here), no bias parameter
    torch.testing.assert_close(t5.RMSNorm(2, eps=0.0)(torch.tensor([1.0, 1.0])), torch.ones(2))
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    # the mean of squares is computed in float32: 300^2 + 400^2 overflows float16 (max 65504)
    half = t5.RMSNorm(2, eps=0.0)(torch.tensor([300.0, 400.0], dtype=torch.float16))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), torch.tensor([300 / 353.5534, 400 / 353.5534]),
                               rtol=2e-3, atol=0)


# ---------------------------------------------------------------------------------------------
# Output layer, parameters, initialisation
# ---------------------------------------------------------------------------------------------

def test_tied_output_is_scaled_embedding_transpose():
    m = tiny_t5()                                  # d_model 16: scale 16^-0.5 = 1/4
    y = torch.ones(1, 16)
    expected = m.embed.weight.sum(1) / 4           # (V,): logit_v = 1/4 * sum_j E[v, j]
    torch.testing.assert_close(m.output(y)[0], expected)
    assert m.lm_head is None and m.src_embed is None
    # one embedding matrix in all: encoder input, decoder input and output
    assert sum(p.dim() == 2 and p.shape[0] == 13 for p in m.parameters()) == 1

    untied = tiny_t5(tie_output=False, share_embeddings=False)
    torch.testing.assert_close(untied.output(y), untied.lm_head(y))   # no scaling when untied
    assert sum(p.dim() == 2 and p.shape[0] == 13 for p in untied.parameters()) == 3


def test_no_bias_terms_anywhere():
    m = tiny_t5(ff="gated-gelu")
    for name, module in m.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None, name


def test_initialisation_follows_t5():
    torch.manual_seed(0)
    cfg = M.make_config("t5", "t5-builtin", src_vocab=500, tgt_vocab=500)  # d_model 128, d_kv 32
    m = t5.T5Model(cfg)
    D, dk, H, dff = 128, 32, 4, 512
    attn, ff = m.encoder[0].self_attn, m.encoder[0].ff
    expected = {"embed": (m.embed.weight, 1.0),
                "q": (attn.q.weight, (D * dk) ** -0.5), "k": (attn.k.weight, D ** -0.5),
                "v": (attn.v.weight, D ** -0.5), "o": (attn.o.weight, (H * dk) ** -0.5),
                "wi": (ff.wi.weight, D ** -0.5), "wo": (ff.wo.weight, dff ** -0.5)}
    for name, (w, std) in expected.items():
        assert w.std().item() == pytest.approx(std, rel=0.05), name
    assert torch.equal(m.enc_norm.weight, torch.ones(D))


# ---------------------------------------------------------------------------------------------
# The decoding interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"ff": "gated-gelu", "tie_output": False},
                                       {"dec_layers": 3, "share_embeddings": False}])
def test_cached_decoding_equals_full_forward(overrides):
    m = tiny_t5(**overrides)
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    states = assert_steps_equal_forward(m, src, src_mask, tgt_in)
    for t, state in enumerate(states):
        assert state["dec0.self_k"].shape == (2, 2, t + 1, 8)           # the cache grows
    # ... and the cache is batch-first: reorder picks rows of every entry
    new = m.reorder(state, torch.tensor([1, 1, 0]))
    assert all(v.shape[0] == 3 for v in new.values())
    assert torch.equal(new["dec1.self_v"][2], state["dec1.self_v"][0])


def test_padding_does_not_change_a_sentences_outputs():
    # extra padding beyond the longest sentence; the attention checked is the cross-attention
    assert_padding_is_invisible(tiny_t5(), SRC, TGT_IN, src_len=9, tgt_len=7)


def test_bos_is_read_as_the_pad_start_token():
    m = tiny_t5()
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    pad_start = tgt_in.clone()
    pad_start[:, 0] = PAD
    with torch.no_grad():
        torch.testing.assert_close(m(src, src_mask, tgt_in)[0], m(src, src_mask, pad_start)[0])
        # and the start token is a trained vector, not a zero padding row
        assert m.embed.weight[PAD].abs().sum() > 0


def test_decoder_is_causal():
    m = tiny_t5()
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    changed = tgt_in.clone()
    changed[:, 3:] = 11                              # change the future of positions 0..2
    with torch.no_grad():
        a, b = m(src, src_mask, tgt_in)[0], m(src, src_mask, changed)[0]
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_return_qkv_shapes_and_same_outputs():
    m = tiny_t5(dec_layers=3)
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    with torch.no_grad():
        logits, attn = m(src, src_mask, tgt_in)
        logits2, attn2, qkv = m(src, src_mask, tgt_in, return_qkv=True)
    assert torch.equal(logits, logits2) and torch.equal(attn, attn2)
    assert len(qkv["enc_self"]) == 2 and len(qkv["dec_self"]) == 3 and len(qkv["cross"]) == 3
    for layer in qkv["enc_self"]:
        assert all(layer[x].shape == (2, 2, 6, 8) for x in "qkv")
    for layer in qkv["dec_self"]:
        assert all(layer[x].shape == (2, 2, 5, 8) for x in "qkv")
    for layer in qkv["cross"]:
        assert layer["q"].shape == (2, 2, 5, 8)
        assert layer["k"].shape == layer["v"].shape == (2, 2, 6, 8)
    assert torch.equal(qkv["src_mask"], src_mask)
    assert qkv["tgt_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    # the recorded queries are the layer's: recompute layer 0's encoder queries by hand
    with torch.no_grad():
        x = m.embed(src)
        q0 = m.encoder[0].self_attn.q(m.encoder[0].self_norm(x)).view(2, 6, 2, 8).transpose(1, 2)
    torch.testing.assert_close(qkv["enc_self"][0]["q"], q0)


def test_encoder_only_records_the_encoders_qkv_and_skips_the_decoder(monkeypatch):
    m = tiny_t5()
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    with torch.no_grad():
        _, _, full = m(src, src_mask, tgt_in, return_qkv=True)
        monkeypatch.setattr(m, "decode", None)      # calling the decoder would fail
        logits, attn, enc = m(src, src_mask, tgt_in, return_qkv=True, encoder_only=True)
    assert logits is None and attn is None and enc.keys() == {"enc_self", "src_mask"}
    for a, b in zip(full["enc_self"], enc["enc_self"], strict=True):
        assert all(torch.equal(a[x], b[x]) for x in "qkv")


def test_gradients_reach_every_parameter():
    m = tiny_t5(ff="gated-gelu", tie_output=False, share_embeddings=False).train()
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    logits, _ = m(src, src_mask, tgt_in)
    logits.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# Configs, checkpoints, beam search
# ---------------------------------------------------------------------------------------------

def test_make_config_presets_and_errors():
    cfg = M.make_config("t5", "t5-teacher", src_vocab=100, tgt_vocab=100, layers=None)
    assert (cfg.layers, cfg.d_model, cfg.heads * cfg.d_kv) == (6, 512, 512)
    assert M.make_config("t5", "t5-student-small").d_model == 256
    assert M.make_config("t5", "t5-student").d_model == 384
    # LSTM-only overrides are ignored for t5, and the other way round
    assert M.make_config("t5", "t5-tiny", hidden=99, attention="dot").d_model == 16
    with pytest.raises(UserError, match="--preset tiny"):
        M.make_config("t5", "tiny")
    with pytest.raises(UserError, match="--preset t5-tiny"):
        M.make_config("lstm", "t5-tiny")
    with pytest.raises(UserError, match="joint vocabulary"):
        M.make_config("t5", "t5-tiny", src_vocab=10, tgt_vocab=12)
    M.make_config("t5", "t5-tiny", src_vocab=10, tgt_vocab=12, share_embeddings=False)
    with pytest.raises(UserError, match="--ff"):
        M.make_config("t5", "t5-tiny", ff="swish")
    with pytest.raises(UserError, match="--arch"):
        M.make_config("gpt")


def test_checkpoint_round_trip(tmp_path):
    m = tiny_t5(dec_layers=1)
    path = tmp_path / "t5.pt"
    M.save_checkpoint({"format": "seqkd", "arch": "t5", "config": dataclasses.asdict(m.cfg),
                       "model": m.state_dict()}, path)
    m2 = M.model_from_checkpoint(M.load_checkpoint(str(path)))
    assert isinstance(m2, t5.T5Model) and len(m2.decoder) == 1
    src, src_mask = padded(SRC, 6)
    tgt_in, _ = padded(TGT_IN, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(src, src_mask, tgt_in)[0], m2(src, src_mask, tgt_in)[0])


def test_greedy_and_beam_search_run_on_t5():
    m = tiny_t5(seed=3)
    src, src_mask = padded(SRC, 6)
    hyps, scores, _ = beam.greedy(m, src, src_mask, max_len_a=1.0, max_len_b=3)
    # greedy's score is the teacher-forced log-probability of its output incl. EOS
    for b, hyp in enumerate(hyps):
        if len(hyp) == int(src_mask[b].sum()) + 3:                    # hit the length limit
            continue
        tgt_in = torch.tensor([[BOS] + hyp])
        tgt_out = torch.tensor([hyp + [EOS]])
        with torch.no_grad():
            logp = torch.log_softmax(m(src[b:b + 1], src_mask[b:b + 1], tgt_in)[0], -1)
        expected = logp[0].gather(1, tgt_out[0][:, None]).sum()
        assert scores[b].item() == pytest.approx(expected.item(), abs=1e-4)
    # beam 1 is greedy
    one = beam.beam_search(m, src, src_mask, beam=1, max_len_a=1.0, max_len_b=3)
    assert [n[0][0] for n in one] == hyps
    five = beam.beam_search(m, src, src_mask, beam=5, nbest=2, max_len_a=1.0, max_len_b=3)
    assert all(len(n) == 2 for n in five)
