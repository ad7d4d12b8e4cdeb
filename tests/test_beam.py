"""Tests for beam.py: the searches on a hand-made probability table, scoring, a real LSTM.

The fake model's next-token distribution depends only on the previous token and on the first
source token (its "context"), so every expected hypothesis and score below is computed by hand
from the tables. Vocabulary: <pad>=0 <unk>=1 <s>=2 </s>=3 a=4 b=5 c=6. test_translate.py and
test_report.py use the same model (TableModel) and the same tiny LSTM (tiny_lstm).
"""
import itertools
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import beam  # noqa: E402
import data  # noqa: E402
import model as seqmodel  # noqa: E402
from data import BOS, EOS, SPECIALS  # noqa: E402

A, B_, C = 4, 5, 6          # token ids of the words a, b, c
V = 7


def table(rows):
    """rows: {prev token: {next token: prob}} -> (V, V) probability table. Rows not given
    (PAD, UNK, EOS as the previous token) are uniform, so teacher forcing never sees NaN."""
    t = torch.full((V, V), 1.0 / V)
    for prev, dist in rows.items():
        t[prev] = 0.0
        for tok, p in dist.items():
            t[prev, tok] = p
        assert abs(t[prev].sum().item() - 1.0) < 1e-6
    return t


TABLES = torch.stack([
    # context 0 (source starts with "a"): greedy takes a (.5) then </s> (.4): p = .2,
    # but b </s> has p = .4 * .9 = .36 -> beam 2 finds it.
    table({BOS: {A: .5, B_: .4, EOS: .1},
           A: {EOS: .4, B_: .35, C: .25},
           B_: {EOS: .9, C: .1},
           C: {EOS: 1.0}}),
    # context 1 ("b ..."): "" has p = .55 (best raw sum); "a b" has p = .45 * .9 * .9 = .3645
    # over 3 tokens, the best per-token score -> length normalisation prefers it.
    table({BOS: {EOS: .55, A: .45},
           A: {B_: .9, EOS: .1},
           B_: {EOS: .9, C: .1},
           C: {EOS: 1.0}}),
    # context 2 ("c ..."): </s> is always the least likely (.01), a the most likely word (.6):
    # greedy runs to the maximum length, where </s> is forced.
    table({prev: {A: .6, B_: .39, EOS: .01} for prev in (BOS, A, B_, C)}),
])


class TableModel(nn.Module):
    """p(y_t | y_<t, x) = TABLES[context(x)][y_{t-1}], context = first source token - 4.
    Attention is uniform over the real source tokens. Implements start/step/reorder/forward."""
    source_state = ("ctx", "src_mask")

    def __init__(self, tables=TABLES):
        super().__init__()
        self.register_buffer("logp", tables.log())          # (contexts, V, V), log 0 = -inf

    def start(self, src, src_mask):
        return {"ctx": src[:, 0] - A, "src_mask": src_mask}

    def step(self, prev, state):
        mask = state["src_mask"].float()
        return self.logp[state["ctx"], prev], mask / mask.sum(1, keepdim=True), state

    @staticmethod
    def reorder(state, index):
        return {k: v.index_select(0, index) for k, v in state.items()}

    def forward(self, src, src_mask, tgt_in):
        ctx = (src[:, 0] - A).unsqueeze(1).expand_as(tgt_in)
        mask = src_mask.float()
        attn = (mask / mask.sum(1, keepdim=True)).unsqueeze(1).expand(-1, tgt_in.size(1), -1)
        return self.logp[ctx, tgt_in], attn                  # (B, T, V), (B, T, S)


VOCAB = data.WordVocab(SPECIALS + ["a", "b", "c"])
L = math.log


def src_batch(seqs):
    return beam.pad_sources(seqs, "cpu")


# ---------------------------------------------------------------------------------------------
# Searches on the hand-made table
# ---------------------------------------------------------------------------------------------

def test_greedy_is_not_optimal_and_beam_2_finds_the_better_hypothesis():
    model = TableModel()
    src, mask = src_batch([[A]])
    hyps, scores, _ = beam.greedy(model, src, mask)
    assert hyps == [[A]]
    assert scores[0].item() == pytest.approx(L(.5) + L(.4), abs=1e-6)      # p = .2
    out = beam.beam_search(model, src, mask, beam=2, nbest=1)
    assert [toks for toks, _ in out[0]] == [[B_]]
    assert out[0][0][1] == pytest.approx(L(.4) + L(.9), abs=1e-6)           # p = .36


def test_nbest_list_order_and_scores():
    model = TableModel()
    src, mask = src_batch([[A]])
    # beam 3, step 1: a .5, b .4, </s> .1 (finished: ""); step 2: b</s> .36, a</s> .2, a b .175.
    # Three hypotheses have finished, but the live "a b" (.175) beats the third (.1): step 3
    # finishes "a b" (.175 * .9 = .1575), and the live "a b c" (.0175) can no longer enter.
    # (A rule "stop once K hypotheses have finished" would return "" as the third.)
    out = beam.beam_search(model, src, mask, beam=3, nbest=3)[0]
    assert [toks for toks, _ in out] == [[B_], [A], [A, B_]]
    expected = [L(.4) + L(.9), L(.5) + L(.4), L(.5) + L(.35) + L(.9)]
    assert [s for _, s in out] == pytest.approx(expected, abs=1e-6)
    # the best entry does not depend on how many we ask for
    assert beam.beam_search(model, src, mask, beam=3, nbest=1)[0] == out[:1]


def test_beam_1_equals_greedy():
    model = TableModel()
    seqs = [[A], [B_, B_], [C, A, B_], [A, C]]
    src, mask = src_batch(seqs)
    hyps, scores, _ = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=2)
    out = beam.beam_search(model, src, mask, beam=1, max_len_a=1.0, max_len_b=2)
    assert [entries[0][0] for entries in out] == hyps
    assert [entries[0][1] for entries in out] == scores.tolist()
    assert hyps == [[A], [], [A] * 4, [A]]          # c..: 4 words and the forced </s>


def test_sentence_decodes_the_same_alone_and_in_a_batch():
    model = TableModel()
    seqs = [[A], [B_, B_], [C, A, B_], [A, C, C, C]]
    src, mask = src_batch(seqs)
    batched = beam.beam_search(model, src, mask, beam=3, nbest=2, max_len_a=1.0, max_len_b=1)
    g_hyps, g_scores, g_attn = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=1)
    for i, s in enumerate(seqs):
        one_src, one_mask = src_batch([s])
        assert beam.beam_search(model, one_src, one_mask, beam=3, nbest=2,
                                max_len_a=1.0, max_len_b=1)[0] == batched[i]
        h, sc, at = beam.greedy(model, one_src, one_mask, max_len_a=1.0, max_len_b=1)
        assert h[0] == g_hyps[i] and sc[0].item() == g_scores[i].item()
        assert torch.equal(at[0], g_attn[i])
        assert g_attn[i].shape == (len(g_hyps[i]) + 1, len(s))    # every output ends in </s>


def test_max_length_forces_eos_and_counts_its_log_prob():
    model = TableModel()
    src, mask = src_batch([[C, A, A]])                    # S = 3, max_len = 1.0 * 3 + 2 = 5
    hyps, scores, attn = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=2)
    # four times a (.6), then </s> (.01), the only token step 5 may produce
    assert hyps == [[A] * 4] and scores[0].item() == pytest.approx(4 * L(.6) + L(.01), abs=1e-5)
    assert attn[0].shape == (5, 3)
    out = beam.beam_search(model, src, mask, beam=2, nbest=2, max_len_a=1.0, max_len_b=2)[0]
    assert [len(toks) for toks, _ in out] == [4, 4]
    assert out[0] == ([A] * 4, pytest.approx(4 * L(.6) + L(.01), abs=1e-5))
    assert out[1][1] == pytest.approx(3 * L(.6) + L(.39) + L(.01), abs=1e-5)   # one b
    assert beam.score_pairs(model, [[C, A, A]] * 2, [h for h, _ in out]) == pytest.approx(
        [s for _, s in out], abs=1e-5)                    # = the teacher-forced scores


def test_length_normalisation_changes_the_ranking():
    model = TableModel()
    src, mask = src_batch([[B_]])
    raw = beam.beam_search(model, src, mask, beam=3, nbest=1)[0]
    assert raw == [([], pytest.approx(L(.55), abs=1e-6))]          # "" beats "a b" (.3645)
    # every output: "" (log .55 / 1), "a" (log .045 / 2), "a b" (log .3645 / 3), "a b c"
    # (log .0405 / 4); normalised, "a b c" (-0.80) beats "a" (-1.55)
    norm = beam.beam_search(model, src, mask, beam=3, nbest=3, length_norm=True)[0]
    assert [toks for toks, _ in norm] == [[A, B_], [], [A, B_, C]]
    assert [s for _, s in norm] == pytest.approx(
        [L(.45 * .9 * .9) / 3, L(.55) / 1, L(.45 * .9 * .1) / 4], abs=1e-6)


def test_score_equals_search_score_and_table_products():
    model = TableModel()
    got = beam.score_pairs(model, [[A], [A], [B_, A]], [[B_], [A, C], [A, B_]])
    want = [L(.4 * .9), L(.5 * .25 * 1.0), L(.45 * .9 * .9)]
    assert got == pytest.approx(want, abs=1e-6)



def test_beam_2_does_not_stop_on_k_finished_and_beats_greedy_no_more():
    # step 1 keeps a (.5), b (.3); step 2: a c (.45), b </s> (.18); step 3: a c b (.315),
    # a c </s> (.135). Two hypotheses have finished, but the live "a c b" can still win:
    # step 4 finishes it at .315 * .6 = .189 > .18. Greedy takes the same path.
    model = TableModel(torch.stack([table({BOS: {A: .5, B_: .3, EOS: .2}, A: {C: .9, EOS: .1},
                                           B_: {EOS: .6, A: .4}, C: {B_: .7, EOS: .3}})]))
    src, mask = src_batch([[A]])
    hyps, scores, _ = beam.greedy(model, src, mask)
    assert hyps == [[A, C, B_]] and scores[0].item() == pytest.approx(L(.189), abs=1e-6)
    out = beam.beam_search(model, src, mask, beam=2, nbest=1)[0]
    assert out == [([A, C, B_], pytest.approx(L(.189), abs=1e-6))]   # not "b" (.18)


def test_pad_and_bos_are_never_generated():
    # <pad> and <s> have the highest probabilities; the search must take a, then </s>, and
    # its score is the teacher-forced one (log .3 + log .5), not renormalised
    model = TableModel(torch.stack([table({BOS: {data.PAD: .4, BOS: .2, A: .3, EOS: .1},
                                           A: {BOS: .5, EOS: .5}})]))
    src, mask = src_batch([[A]])
    hyps, scores, _ = beam.greedy(model, src, mask)
    assert hyps == [[A]] and scores[0].item() == pytest.approx(L(.3) + L(.5), abs=1e-6)
    out = beam.beam_search(model, src, mask, beam=3, nbest=3, max_len_a=0.0, max_len_b=3)[0]
    assert all(data.PAD not in h and BOS not in h for h, _ in out)
    assert [h for h, _ in out] == [[A], []]     # a </s> .15, </s> .1: no other output has p > 0
    assert beam.score_pairs(model, [[A]] * 2, [h for h, _ in out[:2]]) == pytest.approx(
        [sc for _, sc in out[:2]], abs=1e-6)


def test_greedy_equals_beam_1_with_ties_and_length_normalisation():
    # a and b tie at step 1 (.4 each): both searches break the tie the same way
    model = TableModel(torch.stack([table({BOS: {A: .4, B_: .4, EOS: .2}, A: {EOS: .7, C: .3},
                                           B_: {EOS: .7, C: .3}, C: {EOS: 1.0}})]))
    src, mask = src_batch([[A], [A, A]])
    for norm in (False, True):
        hyps, scores, _ = beam.greedy(model, src, mask, length_norm=norm)
        out = beam.beam_search(model, src, mask, beam=1, length_norm=norm)
        assert [e[0][0] for e in out] == hyps and [e[0][1] for e in out] == scores.tolist()
        assert scores[0].item() == pytest.approx((L(.4) + L(.7)) / (2 if norm else 1), abs=1e-6)
        by_file = beam.decode_ids(model, [[A]], beam=1, length_norm=norm)[0]
        assert by_file == [(hyps[0], pytest.approx(scores[0].item(), abs=1e-7))]


def every_output(words, max_words):
    outputs = [[]]
    for n in range(1, max_words + 1):
        outputs += [list(t) for t in itertools.product(words, repeat=n)]
    return outputs


@pytest.mark.parametrize("length_norm", [False, True])
def test_full_width_beam_equals_an_exhaustive_search(length_norm):
    # A random LSTM over the words <unk> a b c: every output of at most 3 words and </s>
    # (max_len 4), scored by teacher forcing, ranked; a beam of 64 holds every live prefix
    # (4^3 at step 3), so its n-best lists must be exactly the top of that ranking.
    torch.manual_seed(3)
    cfg = seqmodel.make_config("lstm", "tiny", src_vocab=V, tgt_vocab=V)
    m = seqmodel.build_model("lstm", asdict(cfg)).eval()
    outputs = every_output([data.UNK, A, B_, C], 3)                    # 85 outputs
    for source in ([A, B_], [C]):
        scores = beam.score_pairs(m, [source] * len(outputs), outputs)
        ranks = [sc / (len(o) + 1) if length_norm else sc for o, sc in zip(outputs, scores)]
        truth = sorted(zip(ranks, map(tuple, outputs)), key=lambda e: -e[0])
        src, mask = src_batch([source])
        for K, nbest in [(64, 1), (64, 10), (85, 85)]:
            got = beam.beam_search(m, src, mask, beam=K, nbest=nbest, max_len_a=0.0,
                                   max_len_b=4, length_norm=length_norm)[0]
            assert [tuple(h) for h, _ in got] == [o for _, o in truth[:nbest]]
            assert [sc for _, sc in got] == pytest.approx([r for r, _ in truth[:nbest]], abs=1e-5)

# ---------------------------------------------------------------------------------------------
# A real (tiny, random) LSTM: consistency with teacher forcing, and the command line
# ---------------------------------------------------------------------------------------------

SRC = ["the cat sees a dog", "", "a dog", "the dog sees the cat today", "cat"]
REF = ["die katze sieht einen hund", "", "ein hund", "der hund sieht heute die katze", "katze"]


def tiny_lstm(seed=0):
    torch.manual_seed(seed)
    src_vocab = data.WordVocab.build(SRC, 20)
    tgt_vocab = data.WordVocab.build(REF, 20)
    cfg = seqmodel.make_config("lstm", "tiny", src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab))
    m = seqmodel.build_model("lstm", asdict(cfg)).eval()
    with torch.no_grad():
        m.generator.bias[EOS] += 1.5      # ends most sentences before the maximum length
    return m, src_vocab, tgt_vocab, cfg


def test_real_model_search_scores_equal_teacher_forced_scores():
    m, sv, tv, _ = tiny_lstm()
    seqs = [sv.encode(s) for s in SRC if s]
    src, mask = beam.pad_sources(seqs, "cpu")
    hyps, scores, _ = beam.greedy(m, src, mask)
    out = beam.beam_search(m, src, mask, beam=3, nbest=3)
    max_len = beam.max_lengths(mask, 2.0, 10).tolist()
    pairs = [(s, h, sc) for s, h, sc, n in zip(seqs, hyps, scores.tolist(), max_len) if len(h) < n]
    pairs += [(s, h, sc) for s, entries, n in zip(seqs, out, max_len)
              for h, sc in entries if len(h) < n]
    assert len(pairs) >= 6                                   # ended with </s>: include its log p
    forced = beam.score_pairs(m, [p[0] for p in pairs], [p[1] for p in pairs])
    assert forced == pytest.approx([p[2] for p in pairs], abs=1e-4)
    assert [e[0][0] for e in beam.beam_search(m, src, mask, beam=1)] == hyps
    for i, s in enumerate(seqs):                             # alone == in a batch
        one = beam.beam_search(m, *beam.pad_sources([s], "cpu"), beam=3, nbest=3)[0]
        assert [h for h, _ in one] == [h for h, _ in out[i]]
        assert [x for _, x in one] == pytest.approx([x for _, x in out[i]], abs=1e-4)


def test_beam_py_as_a_script_names_translate_py():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    run = subprocess.run([sys.executable, "beam.py", "--ckpt", "m.pt", "--src", "a b.txt"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("error: the translation command is now translate.py: "
                          "python translate.py --ckpt m.pt --src 'a b.txt'\n")


@pytest.mark.parametrize("arch", ["lstm", "t5"])
def test_beams_share_the_source_state_unchanged(arch):
    """Leaving the source's entries (model.source_state) unreordered within a sentence's beams
    gives the same n-best lists and scores as reordering every entry."""
    torch.manual_seed(0)
    preset = {"lstm": "tiny", "t5": "t5-tiny"}[arch]
    m = seqmodel.build_model(arch, asdict(seqmodel.make_config(arch, preset, src_vocab=15, tgt_vocab=15))).eval()
    P = data.PAD
    src = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 4, P, P, P], [7, 7, 7, 7, P, P]])
    fast = beam.beam_search(m, src, src != P, beam=4, nbest=4, max_len_a=1.5, max_len_b=2)
    m.source_state = ()                                   # every entry reordered at every step
    full = beam.beam_search(m, src, src != P, beam=4, nbest=4, max_len_a=1.5, max_len_b=2)
    assert [[seq for seq, _ in hyps] for hyps in fast] == [[seq for seq, _ in hyps] for hyps in full]
    assert [[s for _, s in hyps] for hyps in fast] == [[s for _, s in hyps] for hyps in full]
