"""Tests for train.py with the T5-like model: optimizer defaults, Adafactor, relation KD, span
corruption, --normalize. The corpus, the helpers and the plain LSTM run come from test_train.py."""
import argparse
import math

import pytest
import torch

import data
import kd_losses
import relation_losses
import span_corruption
import train
from flags import build_parser, resolve_defaults
from model import load_checkpoint, model_from_checkpoint
from test_train import corpus, flags, log, straight  # noqa: F401 (fixtures)

# ---- the T5-like model, relation KD, span corruption, --normalize ----------------------------

T5_FLAGS = ["--arch", "t5", "--preset", "t5-tiny", "--optim", "adam", "--lr", 0.01]


@pytest.fixture(scope="module")
def t5_teacher(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("t5_teacher")
    train.main(flags(corpus, save_dir, *T5_FLAGS, "--max-steps", 20, "--eval-every", 5))
    return save_dir


def test_optimizer_defaults_by_architecture(corpus, t5_teacher):
    """--optim: SGD lr 1.0 for the LSTM, Adafactor lr 1e-2 for T5, also when --init names a T5."""
    parser = build_parser()
    for extra, optim, lr in [([], "sgd", 1.0), (["--arch", "t5"], "adafactor", 0.01),
                             (["--init", str(t5_teacher / "best.pt")], "adafactor", 0.01),
                             (["--arch", "t5", "--optim", "adam"], "adam", 1e-3)]:
        args = parser.parse_args([x for kv in corpus.items() for x in kv] + extra)
        resolve_defaults(args)
        assert (args.optim, args.lr) == (optim, lr), extra


def test_adafactor_first_step_is_lr_times_the_weight_rms(corpus, t5_teacher, tmp_path):
    """Adafactor (T5's optimizer) steps relative to a weight's size. On the first step its second
    moment is g^2 itself, so a vector weight (not factored) moves by lr * RMS(w) * sign(g) per
    element: each RMS norm scale (near 1) moves by exactly 0.01 * its RMS, whatever its gradient."""
    start = load_checkpoint(t5_teacher / "best.pt")["model"]
    train.main(flags(corpus, tmp_path, "--init", t5_teacher / "best.pt", "--optim", "adafactor", "--lr", 0.01,
                     "--clip", 0, "--dropout", 0, "--max-steps", 1))
    after = load_checkpoint(tmp_path / "last.pt")["model"]
    scales = [k for k in start if "norm" in k]
    assert len(scales) >= 4 and all(start[k].dim() == 1 for k in scales)
    for k in scales:
        rms = start[k].pow(2).mean().sqrt()
        moved = (after[k] - start[k]).abs()
        moved = moved[moved > 0]                    # (a weight whose gradient is exactly 0 stays)
        assert len(moved) > 0.9 * start[k].numel(), k
        torch.testing.assert_close(moved, torch.full_like(moved, 0.01 * rms.item()), rtol=1e-3, atol=1e-6)
    # a matrix (factored second moment) moves by at most lr * RMS(W) (update clipping, d = 1):
    # the small query weights move far less than the embedding. Adam would move both by ~lr.
    for k in start:
        if start[k].dim() == 2:
            assert (after[k] - start[k]).pow(2).mean().sqrt() <= 0.01 * start[k].pow(2).mean().sqrt() * 1.001, k


def test_t5_trains_with_a_joint_vocabulary_and_the_loss_falls(t5_teacher):
    records = log(t5_teacher)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    losses = [r["train_loss"] for r in records]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.5
    assert records[-1]["valid_ppl"] < records[0]["valid_ppl"]
    ckpt = load_checkpoint(t5_teacher / "best.pt")
    assert ckpt["arch"] == "t5" and ckpt["config"]["share_embeddings"] and ckpt["config"]["d_model"] == 16
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(ckpt)
    assert src_vocab is tgt_vocab and span_corruption.sentinel_ids(src_vocab) == list(range(4, 104))  # 100 sentinels


def test_translate_cli_translates_with_a_t5_checkpoint(corpus, t5_teacher, tmp_path, capsys):
    import translate
    out = tmp_path / "hyps.txt"
    translate.main(["--ckpt", str(t5_teacher / "best.pt"), "--src", corpus["--valid-src"],
                    "--ref", corpus["--valid-tgt"], "--beam", "2", "--out", str(out), "--no-progress"])
    hyps = out.read_text().splitlines()
    assert len(hyps) == 12 and sum(bool(h) for h in hyps) >= 6
    printed = capsys.readouterr()
    assert "BLEU" in printed.out + printed.err   # the score against --ref


def test_architecture_errors_are_one_line(corpus, straight, t5_teacher, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --arch lstm, but --init .*best.pt is a t5 model: drop --arch"):
        train.main(flags(corpus, tmp_path, "--arch", "lstm", "--init", t5_teacher / "best.pt"))
    with pytest.raises(SystemExit, match=r"^error: --hidden is a flag of --arch lstm, but the model is t5"):
        train.main(flags(corpus, tmp_path, *T5_FLAGS, "--hidden", 8))
    with pytest.raises(SystemExit, match=r"^error: --kd relation .* the teacher .* is an lstm model"):
        train.main(flags(corpus, tmp_path, *T5_FLAGS, "--teacher", straight / "best.pt", "--kd", "relation"))
    with pytest.raises(SystemExit, match=r"^error: --kd-alpha is for --kd word"):
        train.main(flags(corpus, tmp_path, "--teacher", t5_teacher / "best.pt", "--kd", "relation", "--kd-alpha", 0.5))


def test_word_kd_from_a_t5_teacher_into_an_lstm(corpus, t5_teacher, tmp_path):
    train.main(flags(corpus, tmp_path, "--teacher", t5_teacher / "best.pt", "--max-steps", 2, "--eval-every", 2))
    record = log(tmp_path)[-1]
    assert load_checkpoint(tmp_path / "last.pt")["arch"] == "lstm"
    parts = record["train_parts"]  # the two terms of L = 0.5 L_WORD-KD + 0.5 L_NLL, per token
    assert record["train_loss"] == pytest.approx(0.5 * parts["word_kd"] + 0.5 * parts["nll"], rel=1e-5)


def first_batch(corpus, vocab_ckpt, batch_size=16, seed=3):
    """The first training batch train.main builds with flags(corpus, ...)."""
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(vocab_ckpt)
    pairs, _ = data.clean_pairs(data.read_parallel(corpus["--train-src"], corpus["--train-tgt"]), max_len=50,
                                src_vocab=src_vocab, tgt_vocab=tgt_vocab, verbose=False)
    examples = data.encode_pairs(pairs, src_vocab, tgt_vocab)
    batching = argparse.Namespace(batch_tokens=None, batch_size=batch_size, seed=seed)
    return data.collate(examples, train.make_batches(examples, batching, shuffle=True, epoch=1)[0])


@pytest.mark.parametrize("terms, names", [
    ("miniend-d,nll=0.5", {"logit", "nll", "dec-qq", "dec-kk", "dec-vv", "cross-qk", "cross-vv"}),
    ("minilm", {"enc-qq", "enc-kk", "enc-vv"}),       # trained on the encoders alone (encoder_only)
])
def test_relation_kd_step_is_kd_losses_relation_kd_loss(corpus, t5_teacher, tmp_path, terms, names):
    # a T5 student half the teacher's width (inner 8 vs 16), one step of MiniEnD-D + NLL, or of MiniLM
    teacher = t5_teacher / "best.pt"
    train.main(flags(corpus, tmp_path / "s0", *T5_FLAGS, "--d-model", 8, "--d-kv", 4, "--teacher", teacher,
                     "--max-steps", 1))
    student0 = tmp_path / "s0" / "last.pt"
    train.main(flags(corpus, tmp_path / "s1", "--init", student0, "--teacher", teacher, "--kd", "relation",
                     "--relation-terms", terms, "--relation-heads", 4, "--max-steps", 1, "--eval-every", 1))
    record = log(tmp_path / "s1")[0]

    batch = first_batch(corpus, load_checkpoint(teacher))
    student = model_from_checkpoint(load_checkpoint(student0))
    teacher_model = model_from_checkpoint(load_checkpoint(teacher))
    with torch.no_grad():
        s_logits, _, s_qkv = student(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)
        t_logits, _, t_qkv = teacher_model(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)
    loss, parts = relation_losses.relation_kd_loss(s_qkv, t_qkv, relation_losses.parse_relation_terms(terms), 4,
                                                   student_logits=s_logits, teacher_logits=t_logits,
                                                   target=batch.tgt_out)
    assert record["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert record["train_parts"].keys() == parts.keys() == names
    for name, value in parts.items():
        assert record["train_parts"][name] == pytest.approx(value.item(), rel=1e-5), name


def test_best_metric_loss_keeps_the_model_with_the_lowest_validation_objective(corpus, t5_teacher, tmp_path):
    """--best-metric loss with relation KD: every evaluation logs the objective on the validation data, the
    token-weighted mean of compute_loss over its batches (recomputed here from last.pt), and best.pt is the
    model of the evaluation with the lowest one."""
    teacher = t5_teacher / "best.pt"
    train.main(flags(corpus, tmp_path, *T5_FLAGS, "--d-model", 8, "--d-kv", 4, "--teacher", teacher, "--kd",
                     "relation", "--relation-terms", "minilm,enc-qq=0", "--relation-heads", 4, "--best-metric", "loss",
                     "--max-steps", 12, "--eval-every", 2, "--lr", 0.05))
    records = log(tmp_path)
    losses = [r["valid_loss"] for r in records]
    assert len(losses) == 6 and len(set(losses)) == 6
    best = min(records, key=lambda r: r["valid_loss"])
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best["step"]

    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(load_checkpoint(teacher))
    pairs, _ = data.clean_pairs(data.read_parallel(corpus["--valid-src"], corpus["--valid-tgt"]), verbose=False)
    examples = data.encode_pairs(pairs, src_vocab, tgt_vocab)
    batching = argparse.Namespace(batch_tokens=None, batch_size=16, seed=3)
    kd = kd_losses.Distillation(model_from_checkpoint(load_checkpoint(teacher)), "relation",
                                terms={"enc-kk": 1.0, "enc-vv": 1.0}, relation_heads=4)
    student = model_from_checkpoint(load_checkpoint(tmp_path / "last.pt")).eval()
    total, ntokens = 0.0, 0
    for idxs in train.make_batches(examples, batching, shuffle=False):
        batch = data.collate(examples, idxs)
        with torch.no_grad():
            total += kd_losses.compute_loss(student, batch, kd)[0].item() * batch.ntokens
        ntokens += batch.ntokens
    assert records[-1]["valid_loss"] == pytest.approx(total / ntokens, rel=1e-5)


def test_best_metric_loss_without_a_teacher_is_the_log_of_the_perplexity(corpus, tmp_path):
    train.main(flags(corpus, tmp_path, "--best-metric", "loss", "--max-steps", 4, "--eval-every", 2))
    for r in log(tmp_path):
        assert r["valid_loss"] == pytest.approx(math.log(r["valid_ppl"]), rel=1e-5)


def test_normalize_sents_is_tokens_times_ntokens_over_sentences(corpus, straight, t5_teacher, tmp_path):
    batch = first_batch(corpus, load_checkpoint(t5_teacher / "best.pt"))
    B, ntokens = batch.src.size(0), batch.ntokens
    assert ntokens / B > 5
    student = model_from_checkpoint(load_checkpoint(t5_teacher / "best.pt"))
    teacher = model_from_checkpoint(load_checkpoint(t5_teacher / "best.pt"))
    for kd in [None, kd_losses.Distillation(teacher, "word", alpha=0.5),
               kd_losses.Distillation(teacher, "relation", terms={"logit": 1.0, "enc-kk": 1.0}, relation_heads=2)]:
        per_token, parts = kd_losses.compute_loss(student, batch, kd, normalize="tokens")
        per_sentence, parts_sents = kd_losses.compute_loss(student, batch, kd, normalize="sents")
        assert per_sentence.item() == pytest.approx(per_token.item() * ntokens / B, rel=1e-6)
        assert parts_sents["loss"] == parts["loss"] == per_token          # the log stays per token
    nll_sum, _ = kd_losses.nll_sum(student(batch.src, batch.src_mask, batch.tgt_in)[0], batch.tgt_out)
    per_sentence = kd_losses.compute_loss(student, batch, None, "sents")[0]
    assert per_sentence.item() == pytest.approx(nll_sum.item() / B, rel=1e-6)

    # through train.main: one SGD step without clipping moves the weights ntokens/B times as far
    runs = {}
    for how in ["tokens", "sents"]:
        run = tmp_path / how
        train.main(flags(corpus, run, "--init", t5_teacher / "best.pt", "--normalize", how, "--clip", 0,
                         "--optim", "sgd", "--lr", 0.1, "--max-steps", 1, "--eval-every", 1))
        after = load_checkpoint(run / "last.pt")["model"]
        start = load_checkpoint(t5_teacher / "best.pt")["model"]
        runs[how] = torch.cat([(after[k] - start[k]).flatten() for k in start])
        assert log(run)[0]["train_loss"] == pytest.approx(log(tmp_path / "tokens")[0]["train_loss"], rel=1e-6)
    assert runs["tokens"].abs().max() > 1e-3   # (float32 rounding of w + Δw is ~1e-7 |w|)
    torch.testing.assert_close(runs["sents"], runs["tokens"] * ntokens / B, rtol=1e-3, atol=1e-5)


def test_span_corruption_then_translation_with_init(corpus, straight, tmp_path, capsys):
    # task-agnostic stage: span corruption of the training source only (no target files needed)
    mono = ["--train-src", corpus["--train-src"], "--valid-src", corpus["--valid-src"]]
    run = tmp_path / "span"
    train.main(mono + ["--save-dir", str(run), *map(str, T5_FLAGS), "--span-corruption", "--batch-size", "16",
                       "--max-steps", "6", "--eval-every", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert "joint (--span-corruption: one language), 100 of them sentinels" in out and "<X0>" in out
    records = log(run)
    assert [r["step"] for r in records] == [3, 6] and records[1]["train_loss"] < records[0]["train_loss"]
    # then translation, from its weights and vocabulary
    train.main(flags(corpus, tmp_path / "ft", "--init", run / "best.pt", "--max-steps", 1))
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["vocab"] == load_checkpoint(run / "best.pt")["vocab"]
    # the LSTM vocabularies hold no sentinels
    with pytest.raises(SystemExit, match=r"--span-corruption needs one joint vocabulary"):
        train.main(mono + ["--save-dir", str(tmp_path / "x"), "--span-corruption", "--vocab-from",
                           str(straight / "best.pt")])
