"""Tests of train.py: tiny models on 80 synthetic sentence pairs, a few steps each.

The corpus: data.synthetic_corpus(80) as files, --batch-size 16, so one epoch is exactly 5
batches; --max-steps 8 therefore crosses an epoch end (evaluation, lr schedule) and a stop
after 3 steps is in the middle of an epoch.
"""
import argparse
import json
import math
import signal

import pytest
import torch

import data
import kd_losses
import prune
import train
from model import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Line-aligned train/valid files of the built-in language pair."""
    root = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, n, seed in [("train", 80, 1), ("valid", 12, 2)]:
        pairs = data.synthetic_corpus(n, seed=seed)
        for side, k in [("src", 0), ("tgt", 1)]:
            path = root / f"{split}.{side}"
            path.write_text("".join(p[k] + "\n" for p in pairs))
            files[f"--{split}-{side}"] = str(path)
    return files


def flags(corpus, save_dir, *extra):
    args = [x for kv in corpus.items() for x in kv]
    return args + ["--save-dir", str(save_dir), "--preset", "tiny", "--batch-size", "16",
                   "--threads", "1", "--seed", "3", *map(str, extra)]


def log(save_dir):
    return [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


# a run with dropout and Adam (so resuming needs the RNG and the optimizer moments), 8 steps straight
RESUME_FLAGS = ["--dropout", "0.3", "--optim", "adam", "--lr", "0.01", "--decay-after", "0"]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("straight")
    train.main(flags(corpus, save_dir, *RESUME_FLAGS, "--max-steps", 8))
    return save_dir


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """A teacher checkpoint with a 30-word target vocabulary (the corpus has more words)."""
    save_dir = tmp_path_factory.mktemp("teacher")
    train.main(flags(corpus, save_dir, "--tgt-vocab-size", 30, "--optim", "adam", "--lr", 0.03, "--max-steps", 10))
    return save_dir / "best.pt"


# ---- training ---------------------------------------------------------------------------------


def test_first_loss_is_log_vocab_size_and_training_lowers_it(corpus, tmp_path):
    # Initial weights are uniform in [-0.1, 0.1]: the logits are nearly 0, the output nearly
    # uniform, so the first batch's loss is ~ log V. 50 Adam steps must bring it well down.
    train.main(flags(corpus, tmp_path, "--hidden", 64, "--emb-dim", 32, "--optim", "adam", "--lr", 0.03,
                     "--max-steps", 1))
    result = train.main(["--save-dir", str(tmp_path), "--resume", "--max-steps", "50"])
    records = log(tmp_path)
    assert result["step"] == 50 and result["valid_ppl"] == records[-1]["valid_ppl"]
    assert result["best_valid_ppl"] == min(r["valid_ppl"] for r in records)
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    V = load_checkpoint(tmp_path / "last.pt")["config"]["tgt_vocab"]
    assert V == 86  # the 82 target words of the 80 training pairs and the 4 specials
    assert records[0]["train_loss"] == pytest.approx(math.log(V), abs=0.02)
    assert records[-1]["train_loss"] < math.log(V) - 1.5
    assert records[-1]["valid_ppl"] < records[0]["valid_ppl"] / 3


def test_log_and_returned_metrics(straight):
    records = log(straight)
    # one evaluation at the end of epoch 1 (step 5), one where --max-steps stopped it (step 8)
    assert [(r["step"], r["epoch"]) for r in records] == [(5, 1), (8, 2)]
    # --decay-after 0: the end of epoch 1 halved the learning rate
    assert [r["lr"] for r in records] == [0.01, 0.005]
    for r in records:
        assert set(r) >= {"step", "epoch", "lr", "train_loss", "valid_ppl", "valid_bleu", "tokens_per_s", "elapsed"}
        assert r["valid_ppl"] > 1 and 0 <= r["valid_bleu"] <= 100 and r["tokens_per_s"] > 0


def test_checkpoint_loads_with_weights_only_and_holds_everything(straight):
    last = torch.load(straight / "last.pt", weights_only=True)
    assert last["format"] == "seqkd" and last["arch"] == "lstm"
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (8, 2, 3)
    assert last["lr"] == 0.005 and last["args"]["bleu_tokenize"] == "13a" and last["args"]["max_len"] == 50
    assert last["optimizer"]["state"] and set(last["rng"]) == {"torch", "cuda", "python"}
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(last)
    assert len(tgt_vocab) == last["config"]["tgt_vocab"] and last["config"]["dropout"] == 0.3
    assert last["best_valid_ppl"] == min(r["valid_ppl"] for r in log(straight))
    # best.pt is for decoding and --init: no optimizer state, and it rebuilds a working model
    best = load_checkpoint(straight / "best.pt")
    assert best["optimizer"] is None and "masks" not in best
    model = model_from_checkpoint(best)
    batch = data.collate(data.encode_pairs([("the man sees a dog", "der mann einen hund sieht")],
                                           src_vocab, tgt_vocab), [0])
    logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)
    assert logits.shape == (1, 6, len(tgt_vocab))  # 5 words + EOS


# ---- resume -----------------------------------------------------------------------------------


def test_resume_continues_identically(corpus, straight, tmp_path):
    # stop after 3 of the 5 batches of epoch 1, then resume to step 8: same as 8 steps straight
    train.main(flags(corpus, tmp_path, *RESUME_FLAGS, "--max-steps", 3))
    stopped = load_checkpoint(tmp_path / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (1, 3, 3)
    # only --resume and the new --max-steps: the other flags come from the checkpoint
    train.main(["--save-dir", str(tmp_path), "--resume", "--max-steps", "8"])
    assert_same_weights(straight / "last.pt", tmp_path / "last.pt")
    resumed, reference = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(straight / "last.pt")
    for name, state in reference["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed["optimizer"]["state"][name]["exp_avg_sq"])
    assert (resumed["epoch"], resumed["batch_in_epoch"], resumed["lr"]) == (2, 3, 0.005)
    # the epoch-end evaluation after resuming saw the same model as the straight run's
    assert log(tmp_path)[1]["valid_ppl"] == log(straight)[0]["valid_ppl"]


def test_ctrl_c_saves_the_position_and_resume_continues_identically(corpus, straight, tmp_path, monkeypatch):
    # Press Ctrl-C (a real SIGINT) during step 4: the step finishes, last.pt is saved, main returns.
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_and_press_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_press_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    result = train.main(flags(corpus, tmp_path, *RESUME_FLAGS, "--max-steps", 8))
    monkeypatch.undo()
    assert result["interrupted"] and len(calls) == 4
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C handler is back
    stopped = load_checkpoint(tmp_path / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (1, 4, 4)
    train.main(flags(corpus, tmp_path, *RESUME_FLAGS, "--max-steps", 8, "--resume"))
    assert_same_weights(straight / "last.pt", tmp_path / "last.pt")


def test_resume_and_overwrite_errors(corpus, straight, tmp_path):
    with pytest.raises(SystemExit, match="--resume: there is no .*last.pt"):
        train.main(flags(corpus, tmp_path, "--resume"))
    with pytest.raises(SystemExit, match="already holds a run.*--overwrite"):
        train.main(flags(corpus, straight))
    with pytest.raises(SystemExit, match="give all four"):
        train.main(["--train-src", corpus["--train-src"], "--save-dir", str(tmp_path)])


def test_time_limit_counts_over_resumes_evaluates_and_says_so(corpus, tmp_path):
    train.main(flags(corpus, tmp_path, "--max-steps", 2))
    # these 2 steps already took longer than 1e-9 minutes: the resumed run stops before any step
    result = train.main(flags(corpus, tmp_path, "--max-steps", 10, "--time-limit", 1e-9, "--resume"))
    records = log(tmp_path)
    assert [r["step"] for r in records] == [2, 2] and result["step"] == 2
    assert records[-1]["stopped"] == "--time-limit 1e-09 min" and "stopped" not in records[0]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


# ---- distillation ------------------------------------------------------------------------------


def test_teacher_with_another_target_vocabulary_is_refused(corpus, straight, teacher, tmp_path):
    V = load_checkpoint(straight / "last.pt")["config"]["tgt_vocab"]
    with pytest.raises(SystemExit, match=f"target vocabulary has 30 entries but the student's has {V}"):
        train.main(flags(corpus, tmp_path, "--teacher", teacher, "--vocab-from", straight / "last.pt"))


def test_student_takes_the_teachers_vocabularies(corpus, teacher, tmp_path, capsys):
    train.main(flags(corpus, tmp_path, "--teacher", teacher, "--max-steps", 1))
    assert "vocabularies from the teacher" in capsys.readouterr().out
    student = load_checkpoint(tmp_path / "last.pt")
    assert student["vocab"] == load_checkpoint(teacher)["vocab"] and student["config"]["tgt_vocab"] == 30


def test_word_kd_with_alpha_0_is_nll(corpus, teacher, tmp_path):
    runs = {}
    for name, extra in [("nll", ["--vocab-from", teacher]),
                        ("kd0", ["--teacher", teacher, "--kd-alpha", 0]),
                        ("kd.5", ["--teacher", teacher, "--kd-alpha", 0.5])]:
        train.main(flags(corpus, tmp_path / name, "--max-steps", 3, "--eval-every", 1, *extra))
        runs[name] = [r["train_loss"] for r in log(tmp_path / name)]
    assert runs["kd0"] == pytest.approx(runs["nll"], rel=1e-5)
    # at alpha 0.5 the teacher does count (not at step 1: against the near-uniform initial student
    # the cross-entropy of any teacher is ~ log V, as the NLL is)
    assert abs(runs["kd.5"][-1] - runs["nll"][-1]) > 1e-2
    nll, kd0 = load_checkpoint(tmp_path / "nll" / "last.pt"), load_checkpoint(tmp_path / "kd0" / "last.pt")
    for name, w in nll["model"].items():
        torch.testing.assert_close(kd0["model"][name], w, rtol=1e-4, atol=1e-6)


# ---- fine-tuning and pruning -----------------------------------------------------------------


def test_init_keeps_pruning_masks_through_training_and_resume(corpus, straight, tmp_path):
    ckpt = load_checkpoint(straight / "best.pt")
    model = model_from_checkpoint(ckpt)
    masks = prune.prune(model, 0.5)  # {name: bool tensor, True = kept}
    prune.apply_masks(model, masks)
    pruned = dict(ckpt, model=model.state_dict(), masks=masks)
    torch.save(pruned, tmp_path / "pruned.pt")

    # Adam with weight decay moves every weight, pruned or not; the masks must put them back to 0
    run = tmp_path / "retrain"
    train.main(flags(corpus, run, "--init", tmp_path / "pruned.pt", "--optim", "adam", "--lr", "0.01",
                     "--weight-decay", "0.1", "--max-steps", 4))
    train.main(["--save-dir", str(run), "--resume", "--max-steps", "7"])
    for path in [run / "last.pt", run / "best.pt"]:
        out = load_checkpoint(path)
        assert out["masks"].keys() == masks.keys()
        for name, keep in masks.items():
            assert torch.equal(out["masks"][name], keep)
            w = out["model"][name]
            assert (w[~keep] == 0).all(), name                                    # pruned: exactly 0
            assert not torch.equal(w[keep], pruned["model"][name][keep]), name    # kept: trained
    assert load_checkpoint(run / "last.pt")["step"] == 7


def test_init_starts_from_the_weights_with_a_new_optimizer(corpus, straight, tmp_path):
    train.main(flags(corpus, tmp_path, "--init", straight / "best.pt", "--lr", "0.5", "--max-steps", 1,
                     "--eval-every", 1))
    out, start = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(straight / "best.pt")
    assert out["config"] == start["config"] and out["vocab"] == start["vocab"]
    assert out["lr"] == 0.5 and out["step"] == 1 and out["optimizer"]["param_groups"][0]["lr"] == 0.5
    # one SGD step of lr 0.5 with the gradient clipped to norm 5 moves the weights by at most 2.5
    delta = torch.cat([(out["model"][k] - start["model"][k]).flatten() for k in start["model"]])
    assert 0 < delta.norm() <= 2.5 + 1e-4
    with pytest.raises(SystemExit, match=r"--layers \(3\) does not match --init"):
        train.main(flags(corpus, tmp_path / "x", "--init", straight / "best.pt", "--layers", 3))


def test_warmup_scales_the_first_steps_linearly(corpus, straight, tmp_path):
    """--warmup 4 with SGD: step 1 runs at lr/4, so it moves the weights exactly 1/4 as far as a
    step at the full rate (same start, same batch, same dropout); step 4 on is at the full rate."""
    start = load_checkpoint(straight / "best.pt")["model"]
    moved = {}
    for warmup, steps in [(0, 1), (4, 1), (4, 2), (4, 4)]:
        save_dir = tmp_path / f"w{warmup}s{steps}"
        train.main(flags(corpus, save_dir, "--init", straight / "best.pt", "--lr", "0.5", "--warmup", warmup,
                         "--max-steps", steps))
        out = load_checkpoint(save_dir / "last.pt")
        moved[warmup, steps] = torch.cat([(out["model"][k] - start[k]).flatten() for k in start])
        group_lr = out["optimizer"]["param_groups"][0]["lr"]
        assert group_lr == pytest.approx({(0, 1): 0.5, (4, 1): 0.125, (4, 2): 0.25, (4, 4): 0.5}[warmup, steps])
        assert out["lr"] == 0.5   # the base rate, which the decays act on
    torch.testing.assert_close(moved[4, 1], moved[0, 1] / 4, rtol=1e-4, atol=1e-7)
    with pytest.raises(SystemExit, match="--warmup must be 0"):
        train.main(flags(corpus, tmp_path / "bad", "--warmup", -1))


# ---- the T5-like model, relation KD, span corruption, --normalize (issue 5) -------------------

T5_FLAGS = ["--arch", "t5", "--preset", "t5-tiny", "--optim", "adam", "--lr", 0.01]


@pytest.fixture(scope="module")
def t5_teacher(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("t5_teacher")
    train.main(flags(corpus, save_dir, *T5_FLAGS, "--max-steps", 20, "--eval-every", 5))
    return save_dir


def test_optimizer_defaults_by_architecture(corpus, t5_teacher):
    """--optim: SGD lr 1.0 for the LSTM, Adafactor lr 1e-2 for T5, also when --init names a T5."""
    parser = train.build_parser()
    for extra, optim, lr in [([], "sgd", 1.0), (["--arch", "t5"], "adafactor", 0.01),
                             (["--init", str(t5_teacher / "best.pt")], "adafactor", 0.01),
                             (["--arch", "t5", "--optim", "adam"], "adam", 1e-3)]:
        args = parser.parse_args([x for kv in corpus.items() for x in kv] + extra)
        train.resolve_defaults(args)
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
    assert src_vocab is tgt_vocab and data.sentinel_ids(src_vocab) == list(range(4, 104))  # 100 sentinels


def test_beam_cli_translates_with_a_t5_checkpoint(corpus, t5_teacher, tmp_path, capsys):
    import beam
    out = tmp_path / "hyps.txt"
    beam.main(["--ckpt", str(t5_teacher / "best.pt"), "--src", corpus["--valid-src"], "--ref", corpus["--valid-tgt"],
               "--beam", "2", "--out", str(out), "--no-progress"])
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


def test_relation_kd_step_is_kd_losses_relation_kd_loss(corpus, t5_teacher, tmp_path):
    # a T5 student half the teacher's width (inner 8 vs 16), one step of MiniEnD-D + NLL
    teacher = t5_teacher / "best.pt"
    train.main(flags(corpus, tmp_path / "s0", *T5_FLAGS, "--d-model", 8, "--d-kv", 4, "--teacher", teacher,
                     "--max-steps", 1))
    student0 = tmp_path / "s0" / "last.pt"
    terms = "miniend-d,nll=0.5"
    train.main(flags(corpus, tmp_path / "s1", "--init", student0, "--teacher", teacher, "--kd", "relation",
                     "--relation-terms", terms, "--relation-heads", 4, "--max-steps", 1, "--eval-every", 1))
    record = log(tmp_path / "s1")[0]

    batch = first_batch(corpus, load_checkpoint(teacher))
    student = model_from_checkpoint(load_checkpoint(student0))
    teacher_model = model_from_checkpoint(load_checkpoint(teacher))
    with torch.no_grad():
        s_logits, _, s_qkv = student(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)
        t_logits, _, t_qkv = teacher_model(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)
    loss, parts = kd_losses.relation_kd_loss(s_qkv, t_qkv, kd_losses.parse_relation_terms(terms), 4,
                                             student_logits=s_logits, teacher_logits=t_logits, target=batch.tgt_out)
    assert record["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert record["train_parts"].keys() == parts.keys() == {"logit", "nll", "dec-qq", "dec-kk", "dec-vv",
                                                            "cross-qk", "cross-vv"}
    for name, value in parts.items():
        assert record["train_parts"][name] == pytest.approx(value.item(), rel=1e-5), name


def test_normalize_sents_is_tokens_times_ntokens_over_sentences(corpus, straight, t5_teacher, tmp_path):
    batch = first_batch(corpus, load_checkpoint(t5_teacher / "best.pt"))
    B, ntokens = batch.src.size(0), batch.ntokens
    assert ntokens / B > 5
    student = model_from_checkpoint(load_checkpoint(t5_teacher / "best.pt"))
    teacher = model_from_checkpoint(load_checkpoint(t5_teacher / "best.pt"))
    for kd in [None, train.Distillation(teacher, "word", alpha=0.5),
               train.Distillation(teacher, "relation", terms={"logit": 1.0, "enc-kk": 1.0}, relation_heads=2)]:
        per_token, parts = train.compute_loss(student, batch, kd, normalize="tokens")
        per_sentence, parts_sents = train.compute_loss(student, batch, kd, normalize="sents")
        assert per_sentence.item() == pytest.approx(per_token.item() * ntokens / B, rel=1e-6)
        assert parts_sents["loss"] == parts["loss"] == per_token          # the log stays per token
    nll_sum, _ = kd_losses.nll_sum(student(batch.src, batch.src_mask, batch.tgt_in)[0], batch.tgt_out)
    assert train.compute_loss(student, batch, None, "sents")[0].item() == pytest.approx(nll_sum.item() / B, rel=1e-6)

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
