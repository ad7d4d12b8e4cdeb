"""Tests for kd_losses.py: NLL, Word-KD (Kim & Rush 2016, 3.1), the Seq-Inter selection (3.3) and
the training loss of a batch (compute_loss), label smoothing and the divergence check."""
import math
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from data import PAD, UNK  # noqa: E402
from kd_losses import (Distillation, DivergenceCheck, compute_loss, nll_loss, nll_sum, select_seq_inter,  # noqa: E402
                       sentence_bleu, warn_unknown_words, word_kd_loss, word_kd_sum)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is much faster on a busy 2-core machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_batch(seed=0, B=3, T=5, V=7):
    """Random student/teacher logits and a PAD-padded target (sentence lengths 5, 3, 1)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    target = torch.randint(4, V, (B, T), generator=g)
    lengths = [5, 3, 1]
    for b, n in enumerate(lengths):
        target[b, n:] = PAD
    return student, teacher, target


# ---------------------------------------------------------------------------------------------
# NLL
# ---------------------------------------------------------------------------------------------

def test_nll_uniform_logits_is_log_vocab():
    V = 10
    logits = torch.zeros(2, 3, V)                       # uniform: p = 1/V everywhere
    target = torch.tensor([[4, 5, 3], [6, 3, PAD]])
    assert nll_loss(logits, target).item() == pytest.approx(math.log(V))
    loss_sum, ntokens = nll_sum(logits, target)
    assert ntokens == 5
    assert loss_sum.item() == pytest.approx(5 * math.log(V))


def test_nll_hand_example():
    # one sentence of two real tokens, V = 5:
    # position 1: logits (0, 0, 0, 0, ln 4) -> exp = (1, 1, 1, 1, 4), p(4) = 4/8;  -ln p = ln 2
    # position 2: logits (0, 0, 0, ln 5, 0) -> exp = (1, 1, 1, 5, 1), p(3) = 5/9;  -ln p = ln 9/5
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0, math.log(4.0)],
                            [0.0, 0.0, 0.0, math.log(5.0), 0.0]]])
    target = torch.tensor([[4, 3]])
    expected = (math.log(2.0) + math.log(9.0 / 5.0)) / 2
    assert nll_loss(logits, target).item() == pytest.approx(expected)


def test_nll_no_real_token_is_zero_not_nan():
    logits = torch.randn(1, 2, 5)
    target = torch.full((1, 2), PAD)
    assert nll_loss(logits, target).item() == 0.0


def test_label_smoothing_0_is_the_plain_nll_bit_for_bit():
    student, _, target = random_batch(seed=3)
    mask = target != PAD
    today = -torch.log_softmax(student[mask], -1).gather(-1, target[mask].unsqueeze(-1)).sum()
    assert torch.equal(nll_sum(student, target)[0], today)
    assert torch.equal(nll_sum(student, target, label_smoothing=0.0)[0], today)


def test_label_smoothing_hand_example_with_two_classes():
    # logits (ln 3, 0): p = (3/4, 1/4); gold class 0, ε = 0.2: target q = (0.8 + 0.1, 0.1) = (0.9, 0.1)
    # loss = -(0.9 ln 3/4 + 0.1 ln 1/4) = 0.9 * 0.287682 + 0.1 * 1.386294 = 0.397543
    logits, target = torch.tensor([[[math.log(3.0), 0.0]]]), torch.tensor([[0]])
    loss, ntokens = nll_sum(logits, target, pad=-1, label_smoothing=0.2)
    assert ntokens == 1 and loss.item() == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4), abs=1e-6)
    assert loss.item() == pytest.approx(0.397543, abs=1e-6)
    # a uniform guess scores log V, smoothed or not
    assert nll_sum(torch.zeros(1, 1, 7), torch.tensor([[5]]), label_smoothing=0.3)[0].item() == pytest.approx(
        math.log(7))


def test_label_smoothing_reaches_the_nll_of_compute_loss_with_and_without_word_kd():
    student, teacher, target = random_batch(seed=5)
    n = int((target != PAD).sum())
    batch = SimpleNamespace(src=None, src_mask=None, tgt_in=target, tgt_out=target, ntokens=n)
    smoothed = nll_sum(student, target, label_smoothing=0.1)[0] / n
    assert smoothed.item() > nll_loss(student, target).item()
    loss, _ = compute_loss(FixedLogits(student), batch, None, label_smoothing=0.1)
    assert torch.equal(loss.detach(), smoothed)
    kd = Distillation(FixedLogits(teacher).eval(), "word", alpha=0.0)
    loss, parts = compute_loss(FixedLogits(student), batch, kd, label_smoothing=0.1)
    assert torch.equal(parts["nll"], smoothed) and loss.item() == pytest.approx(smoothed.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Word-KD
# ---------------------------------------------------------------------------------------------

def test_word_kd_alpha_zero_equals_nll():
    student, teacher, target = random_batch()
    for T in (1.0, 2.0):
        got = word_kd_loss(student, teacher, target, alpha=0.0, T=T)
        assert torch.allclose(got, nll_loss(student, target))


def test_word_kd_identical_student_zero_gradient_at_alpha_one():
    student, _, target = random_batch(seed=1)
    teacher = student.clone()                          # the student IS the teacher
    s = student.clone().requires_grad_(True)
    loss = word_kd_loss(s, teacher, target, alpha=1.0)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s.grad), atol=1e-7)
    # ... but the loss is the teacher's entropy (cross-entropy form), averaged over real tokens
    mask = target != PAD
    q = torch.softmax(teacher, -1)
    entropy = -(q * torch.log_softmax(teacher, -1)).sum(-1)[mask].mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert loss.item() > 0.1

    # at alpha = 0.5 the NLL half still pulls the student towards the gold word
    s2 = student.clone().requires_grad_(True)
    word_kd_loss(s2, teacher, target, alpha=0.5).backward()
    assert s2.grad.abs().max().item() > 1e-3


def test_word_kd_gradient_is_alpha_times_p_minus_q_plus_nll_part():
    # d loss / d z = [alpha (p - q) + (1 - alpha)(p - onehot(y))] / ntokens at T = 1
    z = torch.tensor([[[0.0, 0.0, 0.0, 0.0, math.log(4.0)]]], requires_grad=True)  # p = (1,1,1,1,4)/8
    teacher = torch.tensor([[[0.0, 0.0, 0.0, math.log(5.0), 0.0]]])              # q = (1,1,1,5,1)/9
    target = torch.tensor([[4]])
    word_kd_loss(z, teacher, target, alpha=0.5).backward()
    p = torch.tensor([1, 1, 1, 1, 4]) / 8
    q = torch.tensor([1, 1, 1, 5, 1]) / 9
    onehot = torch.tensor([0, 0, 0, 0, 1.0])
    assert torch.allclose(z.grad[0, 0], 0.5 * (p - q) + 0.5 * (p - onehot), atol=1e-6)


def test_word_kd_teacher_gets_no_gradient():
    student, teacher, target = random_batch(seed=2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    word_kd_loss(student, teacher, target, alpha=0.5, T=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_padding_positions_contribute_nothing():
    student, teacher, target = random_batch(seed=3)
    pad_positions = target == PAD
    assert pad_positions.any()
    s = student.clone().requires_grad_(True)
    loss = word_kd_loss(s, teacher, target, alpha=0.5, T=2.0)
    loss.backward()
    # the gradient at padding positions is exactly zero
    assert (s.grad[pad_positions] == 0).all()
    assert (s.grad[~pad_positions] != 0).any()

    # garbage (even inf/nan) logits at padding positions do not change any loss
    student2, teacher2 = student.clone(), teacher.clone()
    student2[pad_positions] = 1e4
    teacher2[pad_positions] = float("nan")
    for alpha in (0.0, 0.5, 1.0):
        before = word_kd_loss(student, teacher, target, alpha=alpha, T=2.0)
        after = word_kd_loss(student2, teacher2, target, alpha=alpha, T=2.0)
        assert torch.allclose(before, after)
    assert torch.allclose(nll_loss(student, target), nll_loss(student2, target))


def test_word_kd_is_token_normalised_over_the_batch():
    # the batch loss is the token-weighted mean of the per-sentence losses (like NLL), so a long
    # sentence counts more than a short one; not the mean of per-sentence means
    student, teacher, target = random_batch(seed=4)
    ntok = (target != PAD).sum(1)                                  # (5, 3, 1)
    per_sentence = torch.stack([word_kd_loss(student[b:b + 1], teacher[b:b + 1], target[b:b + 1])
                                for b in range(3)])
    batch = word_kd_loss(student, teacher, target)
    assert torch.allclose(batch, (per_sentence * ntok).sum() / ntok.sum())


def test_temperature_scaling_hand_computation():
    # One target token, a vocabulary of 3 words (ids 0..2 used only as logit slots; gold = 1).
    # T = 2:
    #   teacher logits (2 ln 2, 0, 0)  / 2 = (ln 2, 0, 0)  -> q = (2, 1, 1) / 4 = (1/2, 1/4, 1/4)
    #   student logits (0, 0, 2 ln 2)  / 2 = (0, 0, ln 2)  -> p = (1, 1, 2) / 4 = (1/4, 1/4, 1/2)
    #   L_WORD-KD = -(1/2 ln 1/4 + 1/4 ln 1/4 + 1/4 ln 1/2) = 3/4 * 2 ln 2 + 1/4 ln 2 = 7/4 ln 2
    #   times T^2 = 4:  7 ln 2
    #   L_NLL at T = 1: student softmax(0, 0, 2 ln 2) = (1, 1, 4) / 6, gold 1 -> ln 6
    ln2 = math.log(2.0)
    teacher = torch.tensor([[[2 * ln2, 0.0, 0.0]]])
    student = torch.tensor([[[0.0, 0.0, 2 * ln2]]])
    target = torch.tensor([[1]])                       # 1 = UNK, a real (non-pad) token
    assert word_kd_loss(student, teacher, target, alpha=1.0, T=2.0).item() == pytest.approx(7 * ln2)
    assert word_kd_loss(student, teacher, target, alpha=0.5, T=2.0).item() == pytest.approx(
        0.5 * 7 * ln2 + 0.5 * math.log(6.0))
    # T = 1 (no scaling): q = (4, 1, 1)/6, p = (1, 1, 4)/6
    #   L_WORD-KD = -(4/6 ln 1/6 + 1/6 ln 1/6 + 1/6 ln 4/6) = ln 6 - 1/6 ln 4
    assert word_kd_loss(student, teacher, target, alpha=1.0, T=1.0).item() == pytest.approx(
        math.log(6.0) - math.log(4.0) / 6)


def test_word_kd_rejects_different_vocabularies():
    student = torch.zeros(1, 2, 5)
    teacher = torch.zeros(1, 2, 6)
    with pytest.raises(ValueError, match="vocabulary"):
        word_kd_loss(student, teacher, torch.tensor([[4, 3]]))


def test_word_kd_float32_under_bf16_logits():
    student, teacher, target = random_batch(seed=5)
    loss = word_kd_loss(student.bfloat16(), teacher.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(word_kd_loss(student, teacher, target).item(), rel=2e-2)


def test_word_kd_parts_are_the_two_terms_per_token():
    student, teacher, target = random_batch(seed=6)
    s = student.clone().requires_grad_(True)
    loss, parts = word_kd_loss(s, teacher, target, alpha=0.3, T=2.0, return_parts=True)
    assert torch.equal(loss, word_kd_loss(student, teacher, target, alpha=0.3, T=2.0))
    kd_sum, ntokens = word_kd_sum(student, teacher, target, T=2.0)
    assert ntokens == 9 and set(parts) == {"word_kd", "nll"}
    assert torch.equal(parts["word_kd"], kd_sum / ntokens)
    assert torch.equal(parts["nll"], nll_sum(student, target)[0] / ntokens)
    assert not any(v.requires_grad for v in parts.values()) and loss.requires_grad
    torch.testing.assert_close(loss, 0.3 * parts["word_kd"] + 0.7 * parts["nll"])


class FixedLogits(torch.nn.Module):
    """A stand-in model: the same logits (B, T, V) for any batch."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, src, src_mask, tgt_in):
        return self.logits, None


def test_compute_loss_word_kd_is_word_kd_loss_and_sents_scales_it():
    student, teacher, target = random_batch(seed=7)
    B = target.size(0)
    batch = SimpleNamespace(src=torch.zeros(B, 2, dtype=torch.long), src_mask=None, tgt_in=target,
                            tgt_out=target, ntokens=int((target != PAD).sum()))
    kd = Distillation(FixedLogits(teacher).eval(), "word", alpha=0.5, temperature=2.0)
    loss, parts = compute_loss(FixedLogits(student), batch, kd)
    expected, expected_parts = word_kd_loss(student, teacher, target, alpha=0.5, T=2.0, return_parts=True)
    assert torch.equal(loss.detach(), expected) and torch.equal(parts["loss"], expected)
    assert torch.equal(parts["word_kd"], expected_parts["word_kd"]) and torch.equal(parts["nll"], expected_parts["nll"])
    per_sentence, _ = compute_loss(FixedLogits(student), batch, kd, normalize="sents")
    assert per_sentence.item() == pytest.approx(expected.item() * batch.ntokens / B, rel=1e-6)
    nll, nll_parts = compute_loss(FixedLogits(student), batch, None)
    assert torch.equal(nll.detach(), nll_loss(student, target)) and set(nll_parts) == {"loss"}


def test_unknown_words_warning_only_above_5_percent_of_a_taken_vocabulary(capsys):
    examples = [([4, 5, UNK], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]), ([4], [4, 5, 6, 7, 8, 9, 10, 11, 12, UNK])]
    fresh, resumed = SimpleNamespace(resume=False), SimpleNamespace(resume=True)
    warn_unknown_words(fresh, examples, "--init a.pt")        # 25% of the source, 5% of the target
    assert capsys.readouterr().out == ("warning: 25.0% of the training source tokens and 5.0% of the target "
                                       "tokens are <unk> in the vocabularies of --init a.pt: they were built on "
                                       "other text\n")
    warn_unknown_words(fresh, [(t, t) for _, t in examples], "--init a.pt")  # 5% is not more than 5%
    warn_unknown_words(fresh, examples, None)                 # a new vocabulary, of this text
    warn_unknown_words(resumed, examples, "last.pt")          # warned of when the run began
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# Seq-Inter selection
# ---------------------------------------------------------------------------------------------

def test_seq_inter_picks_exact_match():
    ref = "the cat sat on the mat"
    hyps = ["a dog ran away", "the cat sat", "the cat sat on the mat", "the cat sat on a mat"]
    assert select_seq_inter(hyps, ref) == 2


def test_seq_inter_picks_closest_by_hand_counted_ngrams():
    ref = "the cat sat on the mat"
    # best is NOT first, so a function returning 0 fails
    hyps = ["the dog sat on a rug",      # matches: 3/6 unigrams, 1/5 bigrams ("sat on"), 0 tri, 0 4-gram
            "a mat",                      # 1/2 unigrams, 0/1 bigrams, short: brevity penalty
            "the cat sat on the rug"]     # 5/6, 4/5, 3/4, 2/3, same length: BP = 1
    assert select_seq_inter(hyps, ref) == 2
    # the last one by hand: BLEU = (5/6 * 4/5 * 3/4 * 2/3)^(1/4) = (1/3)^(1/4) = 75.98
    assert sentence_bleu(hyps[2], ref) == pytest.approx(100 * (1 / 3) ** 0.25, abs=0.01)


def test_seq_inter_ties_pick_the_earlier_hypothesis():
    ref = "a b c d"
    # "a b x d" and "a x c d" both match 3/4 unigrams, 1/3 bigrams, 0/2 trigrams, 0/1 4-grams;
    # with 'exp' smoothing the zero counts become 1/2 and 1/4 matches:
    # BLEU = (3/4 * 1/3 * 1/4 * 1/4)^(1/4) = 35.36 for both
    assert sentence_bleu("a b x d", ref) == pytest.approx(sentence_bleu("a x c d", ref))
    assert sentence_bleu("a b x d", ref) == pytest.approx(100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25,
                                                          abs=0.01)
    assert select_seq_inter(["z z z z", "a b x d", "a x c d"], ref) == 1
    assert select_seq_inter(["z z z z", "a x c d", "a b x d"], ref) == 1
    assert select_seq_inter(["a b c d", "a b c d"], ref) == 0       # duplicates in the n-best


def test_seq_inter_empty_hypotheses():
    assert select_seq_inter(["", "the mat"], "the cat sat on the mat") == 1
    assert select_seq_inter(["", ""], "the cat") == 0
    with pytest.raises(ValueError):
        select_seq_inter([], "the cat")


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------

def feed(check, losses, ntokens=10, first_step=1):
    """One batch a step with these per-token losses; the check's answer after each step."""
    said = []
    for step, value in enumerate(losses, start=first_step):
        check.add({"loss": torch.tensor(value)}, ntokens)
        said.append(check.check(step))
    return said


def test_divergence_nan_or_inf_is_seen_at_the_next_check_of_every_10_steps():
    for bad in [math.nan, math.inf]:
        said = feed(DivergenceCheck(vocab_size=100), [2.0] * 13 + [bad] + [2.0] * 10)
        assert said[:19] == [None] * 19 and said[19].startswith(f"training diverged: the training loss is {bad} "
                                                                 "by step 20; lower --lr")
        assert "\n" not in said[19] and said[19].endswith("start again with --overwrite")


def test_divergence_a_window_above_log_v_after_the_first_one():
    check, log_v = DivergenceCheck(vocab_size=100), math.log(100)      # 4.605
    check.window = 20
    # steps 1-20 far above log V (as at the start of some runs): not judged; steps 21-40: a mean of 4.7
    said = feed(check, [50.0] * 20 + [4.6] * 10 + [4.8] * 10)
    assert said[:39] == [None] * 39
    assert said[39].startswith(f"training diverged: the mean training loss of steps 21-40 is 4.7 a token, above "
                               f"log 100 = {log_v:.4g}, that of a uniform guess")
    assert feed(check, [4.6] * 20, first_step=41) == [None] * 20      # below log V: training goes on
    assert feed(check, [4.7] * 20, first_step=61)[-1].startswith("training diverged: the mean training loss of "
                                                                 "steps 61-80 is 4.7")
    relation = DivergenceCheck(100, Distillation(None, "relation", terms={"enc-qq": 1.0}), {"sum": 0.0, "tokens": 0})
    relation.window = 20
    assert feed(relation, [50.0] * 40) == [None] * 40                  # not an NLL: no log V rule


def test_a_diverging_run_stops_with_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    """SGD at lr 1e6 on 80 pairs, 5 steps an epoch: the loss runs far above log V (V = 86 target words)."""
    import synthetic
    import train
    argv = ["--save-dir", str(tmp_path / "run"), "--preset", "tiny", "--batch-size", "16", "--optim", "sgd",
            "--lr", "1e6", "--epochs", "100", "--seed", "3"]     # no --threads: on the CPU 1, and it says so
    for split, n, seed in [("train", 80, 1), ("valid", 12, 2)]:
        for side, k in [("src", 0), ("tgt", 1)]:
            (tmp_path / f"{split}.{side}").write_text("".join(p[k] + "\n" for p in synthetic.synthetic_corpus(n, seed)))
            argv += [f"--{split}-{side}", str(tmp_path / f"{split}.{side}")]
    monkeypatch.setattr(DivergenceCheck, "window", 10)           # steps 11-20: the first window judged
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert re.fullmatch(r"error: training diverged: the mean training loss of steps 11-20 is \S+ a token, above "
                        r"log 86 = 4.454, that of a uniform guess; lower --lr .* --overwrite", str(e.value))
    assert "CPU threads: 1 (--threads N to change)\n" in capsys.readouterr().out and torch.get_num_threads() == 1
    assert not (tmp_path / "run" / ".lock").exists()
