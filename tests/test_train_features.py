"""Tests of train.py's run folders and evaluation output: the free folder an occupied --save-dir's error names,
--keep-epochs with average.py --last, counts in messages, the progress of the evaluation decoding, the plateau
rule, two one-thread runs side by side. Tiny models on the corpus of test_train.py (5 batches an epoch)."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import average  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from model import load_checkpoint, model_from_checkpoint  # noqa: E402
from test_train import assert_same_weights, corpus, flags  # noqa: E402,F401  (corpus: a fixture)


def test_an_occupied_save_dir_names_the_first_free_folder(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "builtin").mkdir(parents=True)
    (tmp_path / "runs" / "builtin" / "last.pt").write_text("a run")     # refused before it is read
    for free in ["runs/builtin-2", "runs/builtin-3"]:
        with pytest.raises(SystemExit) as e:
            train.main(["--threads", "1"])                               # the default folder, runs/builtin
        assert str(e.value) == ("error: runs/builtin already holds a run: add --resume to continue it, --overwrite "
                                f"to replace it, or --save-dir {free} (free)")
        assert not os.path.exists(free)
        os.makedirs(free)                                                 # taken now: the next one is named
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "last.pt").write_text("a run")
    with pytest.raises(SystemExit, match=f"--save-dir {tmp_path / 'mine-2'} \\(free\\)$"):
        train.main(flags(corpus, tmp_path / "mine"))                      # a --save-dir given


@pytest.fixture(scope="module")
def three_epochs(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("three_epochs")
    train.main(flags(corpus, save_dir, "--epochs", 3, "--keep-epochs", 2))
    return save_dir


def test_keep_epochs_keeps_the_last_n_and_average_last_n_is_their_mean(three_epochs, tmp_path):
    assert sorted(p.name for p in three_epochs.glob("epoch*.pt")) == ["epoch2.pt", "epoch3.pt"]
    e2, e3 = (load_checkpoint(three_epochs / name) for name in ["epoch2.pt", "epoch3.pt"])
    assert e2["optimizer"] is None and (e2["epoch"], e3["epoch"]) == (3, 4)        # the model after epoch 2, 3
    assert_same_weights(three_epochs / "epoch3.pt", three_epochs / "last.pt")      # the run ended with epoch 3
    assert not all(torch.equal(e2["model"][k], e3["model"][k]) for k in e2["model"])
    out = tmp_path / "avg.pt"
    average.main(["--last", "2", str(three_epochs), "--out", str(out)])
    avg = load_checkpoint(out)
    assert avg["averaged"] == [str(three_epochs / "epoch2.pt"), str(three_epochs / "epoch3.pt")]
    for name, weight in avg["model"].items():
        assert torch.equal(weight, ((e2["model"][name].double() + e3["model"][name].double()) / 2).float()), name
    with pytest.raises(SystemExit, match=f"^error: --last 3: {three_epochs} holds 2 epoch checkpoints "
                       r"\(epoch2.pt, epoch3.pt\); train with --keep-epochs 3, or give --last 2$"):
        average.main(["--last", "3", str(three_epochs), "--out", str(out)])


def test_keep_epochs_survives_resume_and_overwrite_removes_the_old_runs(corpus, three_epochs, tmp_path):
    train.main(flags(corpus, tmp_path, "--epochs", 3, "--keep-epochs", 2, "--max-steps", 7))  # mid-epoch 2
    assert sorted(p.name for p in tmp_path.glob("epoch*.pt")) == ["epoch1.pt"]
    train.main(["--save-dir", str(tmp_path), "--resume", "--max-steps", "15"])
    assert sorted(p.name for p in tmp_path.glob("epoch*.pt")) == ["epoch2.pt", "epoch3.pt"]
    for name in ["epoch2.pt", "epoch3.pt"]:
        assert_same_weights(three_epochs / name, tmp_path / name)
    train.main(flags(corpus, tmp_path, "--overwrite", "--max-steps", 1))     # a new run: no old epoch files
    assert not list(tmp_path.glob("epoch*.pt"))


def test_a_count_of_one_is_singular(corpus, tmp_path, capsys):
    train.main(flags(corpus, tmp_path, "--epochs", 1, "--batch-size", 80))    # one batch: one step
    assert "done after 1 step (1 epoch): best valid ppl" in capsys.readouterr().out


def test_the_evaluation_decoding_reports_its_progress_to_a_log(corpus, three_epochs, monkeypatch, capsys):
    ckpt = load_checkpoint(three_epochs / "best.pt")
    model, (src_vocab, tgt_vocab) = model_from_checkpoint(ckpt), data.vocabs_from_checkpoint(ckpt)
    pairs = [("the red bird sees the bus", "x")] * 3
    args = train.parse_args(flags(corpus, three_epochs / "x"))
    train.greedy_scores(model, pairs, src_vocab, tgt_vocab, args)
    assert capsys.readouterr().err == ""                                  # a short decoding: silent
    monkeypatch.setattr(train, "progress_meter", lambda total, initial, every, desc, delay:
                        runs.ProgressLines(total, initial, every=0.0, desc=desc))
    train.greedy_scores(model, pairs, src_vocab, tgt_vocab, args)
    assert "greedy decoding: 3/3 sentences (100%)" in capsys.readouterr().err


@pytest.mark.parametrize("metric, evaluations, halved_after", [
    ("ppl", [(20.0, 10.0), (18.0, 9.0), (19.0, 12.0), (17.0, 11.0)], [3]),      # the perplexity rose at the 3rd
    ("bleu", [(20.0, 10.0), (18.0, 9.0), (19.0, 12.0), (17.0, 11.0)], [2, 4]),  # BLEU fell at the 2nd and 4th
])
def test_decay_on_plateau_watches_the_best_metric(metric, evaluations, halved_after):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = SimpleNamespace(decay_after=None, decay_on_plateau=True, decay_patience=None, best_metric=metric,
                           lr_decay=0.5)
    run = SimpleNamespace(args=args, progress=runs.Progress(lr=1.0), optimizer=optimizer)
    halved = []
    for i, (ppl, bleu) in enumerate(evaluations, 1):
        lr = run.progress.lr
        train.schedule_lr(run, {"valid_ppl": ppl, "valid_bleu": bleu}, epoch_ended=True)
        if run.progress.lr < lr:
            halved.append(i)
    assert halved == halved_after
    assert optimizer.param_groups[0]["lr"] == 0.5 ** len(halved_after)


def test_decay_patience_halves_after_k_evaluations_without_a_new_best():
    """--decay-patience 2 on a noisy rising BLEU curve: the dips at evaluations 2, 4 and 7 (each of which halves
    the rate without it) are followed by a new best or one miss only; it halves at 5 (best 12 at 3, then 11, 11.5),
    at 8 (best 13 at 6, then 12, 12.5) and again at 10, two misses later."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = SimpleNamespace(decay_after=None, decay_on_plateau=True, decay_patience=2, best_metric="bleu",
                           lr_decay=0.5)
    progress = runs.Progress(lr=1.0)
    run = SimpleNamespace(args=args, progress=progress, optimizer=optimizer)
    halved = []
    for i, bleu in enumerate([10, 9, 12, 11, 11.5, 13, 12, 12.5, 12.8, 12.9], 1):
        lr, record = progress.lr, {"valid_ppl": 5.0, "valid_bleu": bleu}
        train.schedule_lr(run, record, epoch_ended=True)
        progress.add_evaluation(record, "bleu")           # what save_checkpoints then counts
        if progress.lr < lr:
            halved.append(i)
    assert halved == [5, 8, 10]
    assert optimizer.param_groups[0]["lr"] == 0.125


def test_decay_patience_needs_decay_on_plateau():
    with pytest.raises(SystemExit, match="--decay-patience counts evaluations for --decay-on-plateau"):
        train.main(["--decay-patience", "2", "--no-decay-on-plateau"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPU cores")
def test_two_one_thread_runs_side_by_side_take_about_the_time_of_one(corpus, tmp_path):
    """With --threads 1 (the CPU default) two trainings share two cores without slowing each other
    much; torch's default of one thread per core oversubscribed them 10-100x. The bound is loose:
    start-up, the disk and other jobs of the machine count too."""
    def started(name):
        argv = flags(corpus, tmp_path / name, "--epochs", 8, "--hidden", 128, "--max-steps", 10 ** 6)
        return subprocess.Popen([sys.executable, "train.py", *argv], stdout=subprocess.DEVNULL,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def wall(*names):
        t0 = time.monotonic()
        for p in [started(name) for name in names]:
            assert p.wait() == 0
        return time.monotonic() - t0

    alone = wall("alone")
    together = wall("left", "right")
    assert together < 1.5 * alone, f"one run {alone:.1f} s, two side by side {together:.1f} s"
