"""Tests of train.py (and its flags): tiny models on 80 synthetic sentence pairs, a few steps each.

The corpus: synthetic.synthetic_corpus(80) as files, --batch-size 16, so one epoch is exactly 5
batches; --max-steps 8 therefore crosses an epoch end (evaluation, lr schedule) and a stop
after 3 steps is in the middle of an epoch.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import CHRF

import beam
import data
import prune
import synthetic
import train
from flags import build_parser, resolve_defaults
from model import PRESETS, load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Line-aligned train/valid files of the built-in language pair."""
    root = tmp_path_factory.mktemp("corpus")
    files = {}
    for split, n, seed in [("train", 80, 1), ("valid", 12, 2)]:
        pairs = synthetic.synthetic_corpus(n, seed=seed)
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


def without_times(records):
    """Log rows without what a clock measures: the rest must repeat bit for bit."""
    return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in records]


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


def test_log_and_returned_metrics(corpus, straight, teacher):
    records = log(straight)
    # one evaluation at the end of epoch 1 (step 5), one where --max-steps stopped it (step 8)
    assert [(r["step"], r["epoch"]) for r in records] == [(5, 1), (8, 2)]
    # --decay-after 0: the end of epoch 1 halved the learning rate
    assert [r["lr"] for r in records] == [0.01, 0.005]
    for r in records:
        assert set(r) >= {"step", "epoch", "lr", "train_loss", "valid_ppl", "valid_bleu", "tokens_per_s", "elapsed"}
        assert r["valid_ppl"] > 1 and 0 <= r["valid_bleu"] <= 100 and r["tokens_per_s"] > 0
    # BLEU and chrF of the same greedy output: of the teacher's last.pt, the model of its last evaluation
    last, row = load_checkpoint(teacher.parent / "last.pt"), log(teacher.parent)[-1]
    pairs = data.read_parallel(corpus["--valid-src"], corpus["--valid-tgt"])
    hyps = beam.translate(model_from_checkpoint(last), *data.vocabs_from_checkpoint(last), [s for s, _ in pairs])
    refs = [t for _, t in pairs]
    assert row["valid_bleu"] == beam.bleu(hyps, refs).score and row["valid_chrf"] > 0
    assert row["valid_chrf"] == CHRF().corpus_score(hyps, [refs]).score and any(hyps)


def test_checkpoint_loads_with_weights_only_and_holds_everything(straight):
    last = torch.load(straight / "last.pt", weights_only=True)
    assert last["format"] == "seqkd" and last["arch"] == "lstm"
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (8, 2, 3)
    assert last["lr"] == 0.005 and last["args"]["bleu_tokenize"] == "13a" and last["args"]["max_len"] == 50
    assert last["optimizer"]["state"] and set(last["rng"]) == {"torch", "cuda", "python"}
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(last)
    assert len(tgt_vocab) == last["config"]["tgt_vocab"] and last["config"]["dropout"] == 0.3
    assert last["best_valid_ppl"] == min(r["valid_ppl"] for r in log(straight))
    record = json.loads((straight / "run.json").read_text())   # the resolved settings: the preset's size too
    assert record["settings"]["model"]["hidden"] == PRESETS["tiny"]["hidden"] and re.fullmatch(
        "[0-9a-f]{40}", record["code"]["commit"]) and record["settings"]["normalize"] == "tokens"
    # best.pt is for decoding and --init: no optimizer state, and it rebuilds a working model
    best = load_checkpoint(straight / "best.pt")
    assert best["optimizer"] is None and "masks" not in best
    model = model_from_checkpoint(best)
    batch = data.collate(data.encode_pairs([("the man sees a dog", "der mann einen hund sieht")],
                                           src_vocab, tgt_vocab), [0])
    logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)
    assert logits.shape == (1, 6, len(tgt_vocab))  # 5 words + EOS


def test_setup_train_loop_and_finish_are_train_in_three_calls(corpus, straight, tmp_path):
    """train(args) is setup, train_loop and finish: called one by one they give the same run."""
    parser = build_parser()
    args = parser.parse_args(flags(corpus, tmp_path, *RESUME_FLAGS, "--max-steps", 8))
    resolve_defaults(args)
    run = train.setup(args)
    assert (run.progress.step, run.progress.epoch, len(run.train_examples)) == (0, 1, 80)
    stop = train.train_loop(run)
    assert stop == "--max-steps 8" and run.progress.step == 8 and run.last_eval_step == 5
    metrics = train.finish(run, stop)
    assert metrics["step"] == 8 and run.last_eval_step == 8
    assert_same_weights(straight / "last.pt", tmp_path / "last.pt")
    assert [r["valid_ppl"] for r in log(tmp_path)] == [r["valid_ppl"] for r in log(straight)]


@pytest.mark.parametrize("normalize", ["tokens", "sents"])
def test_accum_2_batches_of_40_make_the_step_of_one_batch_of_80(corpus, tmp_path, normalize):
    # --batch-size 80 is one batch an epoch, 40 two of the same 80 pairs: with --accum 2 one step an epoch too
    common = ("--optim", "sgd", "--clip", 0, "--normalize", normalize, "--max-steps", 2)  # no clip: the size counts
    train.main(flags(corpus, tmp_path / "one", *common, "--batch-size", 80))
    train.main(flags(corpus, tmp_path / "accum", *common, "--batch-size", 40, "--accum", 2))
    one, accum = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "accum" / "last.pt")
    assert (accum["step"], accum["epoch"]) == (2, 3)
    for name, weight in one["model"].items():
        torch.testing.assert_close(accum["model"][name], weight, rtol=0, atol=1e-6)


def test_accum_counts_optimizer_steps_and_resumes_exactly(corpus, tmp_path):
    # 5 batches an epoch, in steps of 2, 2 and 1 batches; stopped after step 2 (mid-epoch) and resumed
    train.main(flags(corpus, tmp_path / "a", *RESUME_FLAGS, "--accum", 2, "--max-steps", 4))
    assert [(r["step"], r["epoch"]) for r in log(tmp_path / "a")] == [(3, 1), (4, 2)]
    train.main(flags(corpus, tmp_path / "b", *RESUME_FLAGS, "--accum", 2, "--max-steps", 2))
    train.main(["--save-dir", str(tmp_path / "b"), "--resume", "--max-steps", "4"])
    assert_same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    record = json.loads((tmp_path / "b" / "run.json").read_text())       # the start, and the resumption
    assert record["settings"]["max_steps"] == 2 and [r["step"] for r in record["resumptions"]] == [2]


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


def test_save_every_writes_last_pt_on_its_own_clock(corpus, tmp_path, monkeypatch):
    # a clock of 4 minutes a step: the default --save-every 10 saves after step 3 (12 min), the epoch-end
    # evaluation at step 5 (20 min), then step 8 (32 min), the end at step 9; --save-every 0: 5 and 9
    monkeypatch.setattr(train.Run, "elapsed", lambda run: 240.0 * run.progress.step)
    real, saved = train.save_checkpoint, []

    def save_checkpoint(ckpt, path):
        if Path(path).name == "last.pt":
            saved.append(ckpt["step"])
        real(ckpt, path)

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    train.main(flags(corpus, tmp_path / "default", "--max-steps", 9))
    assert saved == [3, 5, 8, 9]
    saved.clear()
    train.main(flags(corpus, tmp_path / "0", "--max-steps", 9, "--save-every", 0))
    assert saved == [5, 9]


# A run that hangs in step 4, after --save-every 1e-9 (every step) wrote last.pt of step 3: kill -9 it there.
HANG_IN_STEP_4 = """
import sys, time
import train
real = train.train_step
def train_step(run, idxs):
    if run.progress.step == 3:
        time.sleep(300)
    return real(run, idxs)
train.train_step = train_step
train.main(sys.argv[1:])
"""


def test_resume_after_kill_9_mid_epoch_continues_identically(corpus, straight, tmp_path, capsys):
    save_dir, output = tmp_path / "run", tmp_path / "output.txt"
    argv = flags(corpus, save_dir, *RESUME_FLAGS, "--max-steps", 8, "--save-every", 1e-9)
    with open(output, "w") as out:
        killed = subprocess.Popen([sys.executable, "-c", HANG_IN_STEP_4, *argv], stdout=out, stderr=out,
                                  cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not ((save_dir / "last.pt").exists() and load_checkpoint(save_dir / "last.pt")["step"] == 3):
            assert killed.poll() is None and time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    stopped = load_checkpoint(save_dir / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (1, 3, 3)
    assert stopped["running"]["tokens"] > 0 and set(stopped["running"]["part_sums"]) == {"loss"}
    assert log(save_dir) == [] and (save_dir / ".lock").read_text() == f"{killed.pid}\n"  # a stale lock
    capsys.readouterr()
    train.main(["--save-dir", str(save_dir), "--resume"])
    assert "taking over the stale lock" in capsys.readouterr().err
    assert_same_weights(straight / "last.pt", save_dir / "last.pt")
    resumed, reference = load_checkpoint(save_dir / "last.pt"), load_checkpoint(straight / "last.pt")
    for name, state in reference["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["optimizer"]["state"][name]["exp_avg"])
    # the training loss at step 5 counts steps 1-3 (from last.pt) and 4-5: the log repeats bit for bit
    assert without_times(log(save_dir)) == without_times(log(straight))
    assert not (save_dir / ".lock").exists()


@pytest.mark.parametrize("crash", ["writing last.pt", "appending the log row"])
def test_a_crash_between_checkpoint_and_log_row_loses_and_repeats_no_row(corpus, straight, tmp_path, monkeypatch,
                                                                          crash):
    # the machine goes down at the evaluation of step 8: in last.pt, or after it, before the log row
    real_save, real_append = train.save_checkpoint, train.append_line

    def save_checkpoint(ckpt, path):
        if crash == "writing last.pt" and ckpt["step"] == 8 and Path(path).name == "last.pt":
            raise OSError("the machine went down")
        real_save(ckpt, path)

    def append_line(path, line):
        if crash == "appending the log row" and json.loads(line)["step"] == 8:
            raise OSError("the machine went down")
        real_append(path, line)

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(train, "append_line", append_line)
    with pytest.raises(OSError, match="went down"):
        train.main(flags(corpus, tmp_path, *RESUME_FLAGS, "--max-steps", 8))
    monkeypatch.undo()
    assert [r["step"] for r in log(tmp_path)] == [5] and not (tmp_path / ".lock").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == (5 if crash == "writing last.pt" else 8)
    train.main(["--save-dir", str(tmp_path), "--resume"])
    assert without_times(log(tmp_path)) == without_times(log(straight))
    assert_same_weights(straight / "last.pt", tmp_path / "last.pt")


def test_a_second_run_on_a_folder_is_refused_and_the_lock_always_released(corpus, tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live run
    try:
        (tmp_path / ".lock").write_text(f"{other.pid}\n")
        with pytest.raises(SystemExit) as e:
            train.main(flags(corpus, tmp_path, "--max-steps", 1))
        assert str(e.value) == (f"error: the run folder {tmp_path} is in use by process {other.pid} (lock file "
                                f"{tmp_path / '.lock'}): wait for it to end, or stop it")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]     # nothing written
    finally:
        other.kill()
        other.wait()
    train.main(flags(corpus, tmp_path, "--max-steps", 1))       # its lock is stale now: taken over
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / ".lock").exists() and (tmp_path / "last.pt").exists()
    with pytest.raises(SystemExit, match="--optim adam: the run in"):      # a UserError during setup
        train.main(["--save-dir", str(tmp_path), "--resume", "--optim", "adam"])
    assert not (tmp_path / ".lock").exists()


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


def test_patience_stops_when_the_metric_stops_improving_and_survives_resume(corpus, tmp_path):
    """lr 1e-9: the greedy output, so the BLEU, never changes. Evaluation 1 sets the best, 2 and 3
    are not better, so --patience 2 stops after epoch 3 (5 steps an epoch), not after 10 epochs;
    a run resumed after evaluation 2 stops at the same place (the count is in last.pt)."""
    slow = ("--optim", "adam", "--lr", 1e-9, "--best-metric", "bleu", "--patience", 2, "--epochs", 10)
    result = train.main(flags(corpus, tmp_path / "a", *slow))
    assert [r["step"] for r in log(tmp_path / "a")] == [5, 10, 15] and result["step"] == 15
    train.main(flags(corpus, tmp_path / "b", *slow[:-1], 2))
    assert train.main(flags(corpus, tmp_path / "b", *slow, "--resume"))["step"] == 15
    train.main(flags(corpus, tmp_path / "c", *slow[:-4], "--epochs", 4))     # no --patience: all epochs
    assert [r["step"] for r in log(tmp_path / "c")] == [5, 10, 15, 20]


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


def test_word_kd_at_alpha_0_with_dropout_trains_exactly_the_baseline(corpus, teacher, tmp_path):
    """Building the teacher draws no random number from the student's stream: at the same --seed both runs
    get the same dropout masks, and with alpha 0 the same weights, bit for bit."""
    for name, extra in [("nll", ["--vocab-from", teacher]), ("kd0", ["--teacher", teacher, "--kd-alpha", 0])]:
        train.main(flags(corpus, tmp_path / name, "--dropout", 0.3, "--max-steps", 3, *extra))
    assert_same_weights(tmp_path / "nll" / "last.pt", tmp_path / "kd0" / "last.pt")


def test_a_vocabulary_of_other_text_is_warned_of_with_its_unknown_rate(corpus, straight, teacher, tmp_path, capsys):
    train.main(flags(corpus, tmp_path / "own", "--vocab-from", straight / "last.pt", "--max-steps", 1))
    assert "warning" not in capsys.readouterr().out          # built on this text: every word known
    train.main(flags(corpus, tmp_path / "other", "--vocab-from", teacher, "--max-steps", 1))
    _, tgt_vocab = data.vocabs_from_checkpoint(load_checkpoint(teacher))   # 26 of the 82 target words
    targets = tgt_vocab.encode_batch(data.read_lines(corpus["--train-tgt"]))
    rate = sum(ids.count(data.UNK) for ids in targets) / sum(map(len, targets))
    assert rate > 0.05 and (f"warning: 0.0% of the training source tokens and {rate:.1%} of the target tokens are "
                            f"<unk> in the vocabularies of --vocab-from {teacher}") in capsys.readouterr().out


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


def test_clipping_counts_only_the_kept_weights_of_a_pruned_model(corpus, straight, tmp_path, monkeypatch):
    ckpt = load_checkpoint(straight / "best.pt")
    model = model_from_checkpoint(ckpt)
    masks = prune.prune(model, 0.8)
    prune.apply_masks(model, masks)
    torch.save(dict(ckpt, model=model.state_dict(), masks=masks), tmp_path / "pruned.pt")
    names, clip, seen = [name for name, _ in model.named_parameters()], torch.nn.utils.clip_grad_norm_, []

    def recording_clip(parameters, max_norm, **kwargs):
        params = list(parameters)
        grads = {name: p.grad for name, p in zip(names, params)}
        kept = torch.cat([g[masks[n]] if n in masks else g.flatten() for n, g in grads.items()]).norm()
        pruned = torch.cat([g[~masks[n]] for n, g in grads.items() if n in masks])
        norm = clip(params, max_norm, **kwargs)
        seen.append((norm, kept, pruned, torch.cat([g.flatten() for g in grads.values()]).norm()))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train.main(flags(corpus, tmp_path / "run", "--init", tmp_path / "pruned.pt", "--clip", 0.01, "--max-steps", 2))
    assert len(seen) == 2
    for norm, kept, pruned, clipped in seen:
        assert (pruned == 0).all()                               # a pruned weight has no gradient
        assert norm.item() == pytest.approx(kept.item(), rel=1e-6) and kept > 0.01
        assert clipped.item() == pytest.approx(0.01, rel=1e-4)   # the kept weights' gradient, clipped


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
