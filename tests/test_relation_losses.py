"""Tests of the attention-relation losses (relation_losses.py: MiniLM / MiniEnD).

Hand-made query/key/value dicts in the format of T5Model.forward(..., return_qkv=True), checked
against a hand computation and a loop-per-row reference; then tiny T5 models for gradients."""
import math

import pytest
import torch

import model as M
from data import BOS, PAD, UserError
from kd_losses import word_kd_loss
from relation_losses import (RELATION_RECIPES, RELATION_TERMS, check_relation_setup, parse_relation_terms,
                             relation, relation_kd_loss, relation_term_loss)


def fake_qkv(seed, heads, d_kv, src_lengths, tgt_lengths, layers=2):
    """Random q/k/v, (N, heads, len, d_kv), for every layer and attention, with the masks."""
    g = torch.Generator().manual_seed(seed)
    N, S, T = len(src_lengths), max(src_lengths), max(tgt_lengths)

    def rand(n):
        return torch.randn(N, heads, n, d_kv, generator=g)

    src_mask = torch.arange(S)[None, :] < torch.tensor(src_lengths)[:, None]   # (N, S)
    tgt_mask = torch.arange(T)[None, :] < torch.tensor(tgt_lengths)[:, None]   # (N, T)
    return {"enc_self": [{"q": rand(S), "k": rand(S), "v": rand(S)} for _ in range(layers)],
            "dec_self": [{"q": rand(T), "k": rand(T), "v": rand(T)} for _ in range(layers)],
            "cross": [{"q": rand(T), "k": rand(S), "v": rand(S)} for _ in range(layers)],
            "src_mask": src_mask, "tgt_mask": tgt_mask}


def reference_term(name, student, teacher, R, s_layer=-1, t_layer=-1):
    """The same loss by explicit loops: for each sentence and each real row, slice the real (and,
    in the decoder, past) keys, compute both relations with no masks at all, and take the KL."""
    kind, first, second = RELATION_TERMS[name]

    def length(which, b):
        on_target = kind == "dec_self" or (kind == "cross" and which == "q")
        return int(student["tgt_mask" if on_target else "src_mask"][b].sum())

    def reln(qkv, layer, b, i, n_keys):
        a = qkv[kind][layer][first][b]                     # (heads, T_a, d_kv)
        k = qkv[kind][layer][second][b]
        a = a.transpose(0, 1).reshape(a.size(1), -1)[i]    # (W,) row i, heads concatenated
        k = k.transpose(0, 1).reshape(k.size(1), -1)[:n_keys]   # (n_keys, W)
        d_r = a.numel() // R
        rows = [torch.softmax(k[:, r * d_r:(r + 1) * d_r] @ a[r * d_r:(r + 1) * d_r] / math.sqrt(d_r), 0)
                for r in range(R)]
        return torch.stack(rows)                           # (R, n_keys)

    total, count = 0.0, 0
    for b in range(student["src_mask"].size(0)):
        for i in range(length(first, b)):
            n_keys = i + 1 if kind == "dec_self" else length(second, b)
            p = reln(teacher, t_layer, b, i, n_keys)
            q = reln(student, s_layer, b, i, n_keys)
            total += (p * (p.log() - q.log())).sum(-1).mean().item()
            count += 1
    return total / count


# ---------------------------------------------------------------------------------------------
# Hand values, properties
# ---------------------------------------------------------------------------------------------

def test_hand_computed_query_relation():
    # one sentence of 2 source tokens, 1 head, d_kv 1, R = 1: Reln = softmax(q_i q_j / 1)
    #   teacher q = (1, 0): row 0 softmax(1, 0) = (e, 1) / (e + 1);  row 1 softmax(0, 0) = (1/2, 1/2)
    #   student q = (0, 0): both rows uniform.  KL(p || uniform) = ln 2 - H(p)
    #   loss = (KL row 0 + KL row 1) / 2 rows = (ln 2 - H(e/(e+1), 1/(e+1)) + 0) / 2
    teacher = fake_qkv(0, 1, 1, [2], [1], layers=1)
    student = fake_qkv(1, 1, 1, [2], [1], layers=1)
    teacher["enc_self"][0]["q"] = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    student["enc_self"][0]["q"] = torch.zeros(1, 1, 2, 1)
    p = torch.tensor([math.e, 1.0]) / (math.e + 1)
    expected = (math.log(2) + (p * p.log()).sum().item()) / 2
    got = relation_term_loss("enc-qq", student, teacher, relation_heads=1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0555, abs=1e-4)


@pytest.mark.parametrize("name", list(RELATION_TERMS))
def test_zero_for_identical_models_and_positive_otherwise(name):
    teacher = fake_qkv(0, 2, 4, [5, 3], [4, 2])
    assert relation_term_loss(name, teacher, teacher, relation_heads=2).item() == pytest.approx(0, abs=1e-6)
    student = fake_qkv(1, 2, 4, [5, 3], [4, 2])
    assert relation_term_loss(name, student, teacher, relation_heads=2).item() > 1e-3


@pytest.mark.parametrize("name", list(RELATION_TERMS))
def test_equals_the_loop_reference_across_widths_and_head_counts(name):
    # teacher: 4 heads x 6 = 24 wide; student: 3 heads x 4 = 12 wide; R = 3 divides both.
    # The reference slices away padded rows, padded keys and (decoder) future keys, so a match
    # means the masks do exactly that, and the averaging is over relation heads and real rows.
    teacher = fake_qkv(0, 4, 6, [5, 3, 1], [4, 2, 3], layers=3)
    student = fake_qkv(1, 3, 4, [5, 3, 1], [4, 2, 3], layers=2)
    got = relation_term_loss(name, student, teacher, relation_heads=3, student_layer=0, teacher_layer=1)
    assert got.item() == pytest.approx(reference_term(name, student, teacher, 3, 0, 1), rel=1e-5)


def test_padded_rows_and_future_positions_are_ignored():
    teacher = fake_qkv(0, 2, 4, [5, 3], [4, 2])
    student = fake_qkv(1, 2, 4, [5, 3], [4, 2])
    before = {name: relation_term_loss(name, student, teacher, 2) for name in RELATION_TERMS}
    # garbage at every padded position, in both models: no term changes
    for qkv in (teacher, student):
        for kind in ("enc_self", "dec_self", "cross"):
            for layer in qkv[kind]:
                for which in "qkv":
                    on_target = kind == "dec_self" or (kind == "cross" and which == "q")
                    mask = qkv["tgt_mask" if on_target else "src_mask"]
                    layer[which].masked_fill_(~mask[:, None, :, None], 1e4)
    for name in RELATION_TERMS:
        assert relation_term_loss(name, student, teacher, 2).item() == pytest.approx(before[name].item(), rel=1e-6)
    # a causal relation has nothing above the diagonal, and its first row is the position itself
    q = student["dec_self"][-1]["q"]
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    p = relation(q, q, 2, allowed).exp()                                # (N, R, 4, 4)
    assert torch.all(p[..., ~allowed] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 4))
    assert torch.all(p[..., 0, 0] == 1)


def test_relation_heads_must_divide_both_widths():
    teacher = fake_qkv(0, 4, 6, [3], [2])       # width 24
    student = fake_qkv(1, 2, 4, [3], [2])       # width 8
    with pytest.raises(UserError, match=r"--relation-heads 3 .* teacher's is 24, the student's 8.*divisor of 8"):
        relation_term_loss("enc-qq", student, teacher, relation_heads=3)
    relation_term_loss("enc-qq", student, teacher, relation_heads=4)
    with pytest.raises(UserError, match="--relation-student-layer 5"):
        relation_term_loss("dec-kk", student, teacher, relation_heads=4, student_layer=5)


# ---------------------------------------------------------------------------------------------
# Term parsing and the combined loss
# ---------------------------------------------------------------------------------------------

def test_parse_relation_terms():
    assert parse_relation_terms("minilm") == {"enc-qq": 1.0, "enc-kk": 1.0, "enc-vv": 1.0}
    d = parse_relation_terms("miniend-d")
    assert set(d) == {"logit", "dec-qq", "dec-kk", "dec-vv", "cross-qk", "cross-vv"}
    assert set(parse_relation_terms("miniend-e")) == set(RELATION_RECIPES["miniend-e"])
    assert "logit" not in parse_relation_terms("miniend-d,logit=0")
    assert parse_relation_terms("MiniLM, nll=0.5, enc-vv=2") == \
        {"enc-qq": 1.0, "enc-kk": 1.0, "enc-vv": 2.0, "nll": 0.5}
    for bad in ("minilm,foo", "enc-qq=-1", "enc-qq=x", "logit=0", "minilm=2"):
        with pytest.raises(UserError, match="--relation-terms"):
            parse_relation_terms(bad)


def tiny_t5(seed, preset_overrides):
    torch.manual_seed(seed)
    return M.T5Model(M.make_config("t5", "t5-tiny", src_vocab=11, tgt_vocab=11, **preset_overrides))


def batch():
    src = torch.tensor([[4, 5, 6, 7], [8, 9, PAD, PAD]])
    tgt_in = torch.tensor([[BOS, 4, 5], [BOS, 6, PAD]])
    tgt_out = torch.tensor([[4, 5, 3], [6, 3, PAD]])
    return src, src != PAD, tgt_in, tgt_out


def test_combined_loss_is_the_weighted_sum_of_its_terms():
    teacher = tiny_t5(0, dict(d_model=24, heads=3, d_kv=8)).eval()     # width 24, 2 + 2 layers
    student = tiny_t5(1, dict(layers=1, heads=2, d_kv=6))               # width 12, 1 + 1 layers
    src, src_mask, tgt_in, tgt_out = batch()
    with torch.no_grad():
        t_logits, _, t_qkv = teacher(src, src_mask, tgt_in, return_qkv=True)
    s_logits, _, s_qkv = student(src, src_mask, tgt_in, return_qkv=True)
    terms = parse_relation_terms("miniend-e,nll=0.5,enc-vv=2")
    loss, parts = relation_kd_loss(s_qkv, t_qkv, terms, relation_heads=4,
                                   student_logits=s_logits, teacher_logits=t_logits, target=tgt_out)
    assert set(parts) == set(terms)
    expected = sum(w * parts[name] for name, w in terms.items())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["logit"], word_kd_loss(s_logits, t_logits, tgt_out, alpha=1.0))
    assert all(v > 0 and not v.requires_grad for v in parts.values())
    # the same teacher and student configs pass the start-of-training check ...
    check_relation_setup(terms, 4, student.cfg, teacher.cfg)
    # ... which catches a bad R, a missing layer and an LSTM before the first batch
    with pytest.raises(UserError, match="--relation-heads"):
        check_relation_setup(terms, 5, student.cfg, teacher.cfg)
    with pytest.raises(UserError, match="--relation-teacher-layer 2"):
        check_relation_setup(terms, 4, student.cfg, teacher.cfg, teacher_layer=2)
    lstm = M.make_config("lstm", "tiny", src_vocab=11, tgt_vocab=11)
    with pytest.raises(UserError, match="--arch t5"):
        check_relation_setup(terms, 4, student.cfg, lstm)
    check_relation_setup({"logit": 1.0}, 4, lstm, lstm)                # no relation term: fine


# which student projections each term must reach
REACHES = {"enc-qq": [("encoder", "self_attn", "q")], "enc-kk": [("encoder", "self_attn", "k")],
           "enc-vv": [("encoder", "self_attn", "v")], "dec-qq": [("decoder", "self_attn", "q")],
           "dec-kk": [("decoder", "self_attn", "k")], "dec-vv": [("decoder", "self_attn", "v")],
           "cross-qk": [("decoder", "cross_attn", "q"), ("decoder", "cross_attn", "k")],
           "cross-vv": [("decoder", "cross_attn", "v")]}


@pytest.mark.parametrize("name", list(RELATION_TERMS))
def test_gradient_of_each_term_reaches_the_students_attention_projections(name):
    teacher = tiny_t5(0, dict(d_model=24, heads=3, d_kv=8)).eval()
    student = tiny_t5(1, dict(heads=2, d_kv=6))
    src, src_mask, tgt_in, _ = batch()
    with torch.no_grad():
        _, _, t_qkv = teacher(src, src_mask, tgt_in, return_qkv=True)
    _, _, s_qkv = student(src, src_mask, tgt_in, return_qkv=True)
    loss, _ = relation_kd_loss(s_qkv, t_qkv, {name: 1.0}, relation_heads=4)
    loss.backward()
    for stack, attention, proj in REACHES[name]:
        last = getattr(student, stack)[-1]
        grad = getattr(getattr(last, attention), proj).weight.grad
        assert grad is not None and grad.abs().sum() > 0, (stack, attention, proj)
    # nothing computed after the related vectors gets a gradient: the feed-forward of the same
    # layer, and for encoder terms the whole decoder; the teacher gets none at all
    assert getattr(student, REACHES[name][0][0])[-1].ff.wo.weight.grad is None
    if name.startswith("enc"):
        assert all(p.grad is None for p in student.decoder.parameters())
    assert all(p.grad is None for p in teacher.parameters())
