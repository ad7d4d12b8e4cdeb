"""Tests for running under torchrun on CPU (gloo backend, 2 processes): sharded distillation-data
generation in translate.py, and training in train.py. Each torchrun launch starts 3 Python processes,
so the file keeps to few launches with tiny models."""
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as seqmodel  # noqa: E402
import synthetic  # noqa: E402
import translate  # noqa: E402
from data import EOS  # noqa: E402


def torchrun(*args, timeout=120):
    """python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS, in the repository
    root, on CPU with one thread per process. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# translate.py under torchrun: one shard per process, joined in order by process 0
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_teacher(tmp_path):
    """A tiny random LSTM checkpoint, 11 source lines (one empty) and their references."""
    pairs = synthetic.synthetic_corpus(10, seed=4)
    src = [s for s, _ in pairs[:5]] + [""] + [s for s, _ in pairs[5:]]
    ref = [t for _, t in pairs[:5]] + [""] + [t for _, t in pairs[5:]]
    torch.manual_seed(0)
    src_vocab, tgt_vocab = data.WordVocab.build(src, 40), data.WordVocab.build(ref, 40)
    cfg = seqmodel.make_config("lstm", "tiny", src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab))
    m = seqmodel.build_model("lstm", asdict(cfg))
    with torch.no_grad():
        m.generator.bias[EOS] += 1.0          # most hypotheses end before the maximum length
    seqmodel.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
                              "vocab": {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()},
                              "model": m.state_dict(), "args": {"bleu_tokenize": "none"}},
                             tmp_path / "teacher.pt")
    (tmp_path / "src.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(ref) + "\n")
    return {name: str(tmp_path / f) for name, f in
            [("ckpt", "teacher.pt"), ("src", "src.txt"), ("ref", "ref.txt")]}


def test_translate_under_torchrun_equals_one_process(tiny_teacher, tmp_path, capsys):
    flags = ["--ckpt", tiny_teacher["ckpt"], "--src", tiny_teacher["src"], "--ref", tiny_teacher["ref"],
             "--beam", "3", "--nbest", "2", "--batch-size", "2", "--chunk-size", "2",
             "--device", "cpu", "--no-progress"]
    one = tmp_path / "one.nbest"
    translate.main(flags + ["--out", str(one)])
    bleu_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BLEU")]

    two = tmp_path / "two.nbest"
    run = torchrun(ROOT / "translate.py", *flags, "--out", two)
    assert run.returncode == 0, run.stderr[-3000:]
    # n-best lines carry the global line number: the joined file equals the one-process file
    assert two.read_text() == one.read_text()
    assert {int(line.split(" ||| ")[0]) for line in two.read_text().splitlines()} == set(range(11))
    assert sorted(os.listdir(tmp_path)) == sorted(["one.nbest", "two.nbest", "teacher.pt",
                                                   "src.txt", "ref.txt"])      # parts removed
    assert "shard 1/2" in run.stdout and "shard 2/2" in run.stdout
    assert [line for line in run.stdout.splitlines() if line.startswith("BLEU")] == bleu_line  # once


@pytest.mark.parametrize("flags, message", [
    ([], "under torchrun translate.py only makes files: give --out FILE"),
    (["--out", "x.txt", "--shard", "1/2"], "--shard 1/2: under torchrun each process takes one shard"),
])
def test_torchrun_refuses_what_needs_one_process(tiny_teacher, monkeypatch, flags, message):
    monkeypatch.setenv("WORLD_SIZE", "2")      # as torchrun sets it; refused before any rendezvous
    with pytest.raises(SystemExit) as e:
        translate.main(["--ckpt", tiny_teacher["ckpt"], "--src", tiny_teacher["src"], *flags])
    assert str(e.value).startswith("error: " + message)


# ---------------------------------------------------------------------------------------------
# train.py under torchrun: DistributedDataParallel gives the steps of one process
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402

import runs  # noqa: E402
import train  # noqa: E402


def read_log(save_dir):
    return [json.loads(line) for line in (Path(save_dir) / "log.jsonl").read_text().splitlines()]


def corpus_flags(tmp_path):
    """train.py's data flags for 100 training and 20 validation pairs written under tmp_path, batches of 7."""
    pairs = synthetic.synthetic_corpus(120, seed=3)
    for name, part in [("train", pairs[:100]), ("valid", pairs[100:])]:
        (tmp_path / f"{name}.en").write_text("\n".join(s for s, _ in part) + "\n")
        (tmp_path / f"{name}.de").write_text("\n".join(t for _, t in part) + "\n")
    return [str(f) for f in ["--train-src", tmp_path / "train.en", "--train-tgt", tmp_path / "train.de",
                             "--valid-src", tmp_path / "valid.en", "--valid-tgt", tmp_path / "valid.de",
                             "--batch-size", "7", "--eval-every", "1", "--seed", "3", "--device", "cpu"]]


def test_train_two_processes_take_the_steps_of_one_and_resume(tmp_path):
    # 2 processes x (4 or 3 sentences) against 1 process x 7 sentences: the same whole batches, so
    # the same steps. Shares of unequal size and unequal token counts test the loss weighting.
    flags = corpus_flags(tmp_path) + ["--preset", "tiny", "--optim", "sgd", "--lr", "0.5"]
    one = train.main(flags + ["--max-steps", "6", "--save-dir", str(tmp_path / "one")])

    two = tmp_path / "two"            # 3 steps, stopped, then --resume to step 6, all under torchrun
    for more in (["--max-steps", "3"], ["--max-steps", "6", "--resume"]):
        run = torchrun(ROOT / "train.py", *flags, "--save-dir", two, *more)
        assert run.returncode == 0, run.stderr[-3000:]
    printed = [line.split(" |")[0] for line in run.stdout.splitlines() if line.startswith("step ")]
    assert printed == ["step 4", "step 5", "step 6"]     # process 0 alone prints
    assert not (two / ".lock").exists()                  # process 0's lock, released

    log_one, log_two = read_log(tmp_path / "one"), read_log(two)
    assert [r["step"] for r in log_two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(log_one, log_two):   # the loss of the whole batch, and the model after each step
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-5)
    assert log_two[-1]["train_loss"] != pytest.approx(log_two[0]["train_loss"], abs=1e-3)  # it trains
    final_one = seqmodel.load_checkpoint(one["last_path"])["model"]
    final_two = seqmodel.load_checkpoint(two / "last.pt")["model"]
    for name, weight in final_one.items():
        assert torch.allclose(final_two[name], weight, atol=1e-5), name


def test_minilm_under_torchrun_trains_as_one_process(tmp_path):
    # MiniLM's loss reads the encoder alone, so the decoder's parameters get no gradient: unless
    # DistributedDataParallel is told to look for such parameters, its second step fails.
    flags = corpus_flags(tmp_path) + ["--arch", "t5", "--preset", "t5-tiny", "--optim", "adam", "--lr", "0.01"]
    train.main(flags + ["--max-steps", "2", "--save-dir", str(tmp_path / "teacher")])
    flags += ["--teacher", str(tmp_path / "teacher" / "last.pt"), "--kd", "relation", "--relation-terms", "minilm",
              "--relation-heads", "2", "--max-steps", "3"]
    one = train.main(flags + ["--save-dir", str(tmp_path / "one")])
    run = torchrun(ROOT / "train.py", *flags, "--save-dir", tmp_path / "two")
    assert run.returncode == 0, run.stderr[-3000:]
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in log_two] == [1, 2, 3]
    # each process averages a relation term over its own rows (source tokens, here) and weighs it by its
    # share of the target tokens: close to the one-process step, not equal to it (see flags.py)
    for a, b in zip(log_one, log_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    final_one = seqmodel.load_checkpoint(one["last_path"])["model"]
    final_two = seqmodel.load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    for name, weight in final_one.items():
        assert torch.allclose(final_two[name], weight, atol=1e-3), name
        if name.startswith("decoder."):         # untouched in both: the same initialisation, no update
            assert torch.equal(final_two[name], weight), name


def test_share_of_batch_counts_what_normalize_divides_by():
    examples = [([5], [6, 7]), ([5, 5], [6]), ([5], [6, 6, 6])]
    whole, mine = [0, 1, 2], [0, 2]                       # targets of 2, 1, 3 tokens, + EOS each
    assert runs.share_of_batch(examples, mine, whole, "tokens") == (3 + 4) / (3 + 2 + 4)
    assert runs.share_of_batch(examples, mine, whole, "sents") == 2 / 3
