"""Tests for average.py: the mean of two checkpoints' weights (hand-checkable values), pruning
masks and integer buffers, the average decoding with translate.py, and the one-line refusals."""
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import average  # noqa: E402
import beam  # noqa: E402
import data  # noqa: E402
import model as seqmodel  # noqa: E402
import translate  # noqa: E402
from test_beam import SRC, tiny_lstm  # noqa: E402


def lstm_checkpoint(seed, step, **config):
    """A tiny LSTM checkpoint (seeded) as train.py writes one, optimizer state included; config
    overrides give another model."""
    m, sv, tv, cfg = tiny_lstm(seed)
    if config:
        cfg = seqmodel.make_config("lstm", "tiny", src_vocab=len(sv), tgt_vocab=len(tv), **config)
        m = seqmodel.build_model("lstm", asdict(cfg))
    with torch.no_grad():
        m.generator.bias[data.EOS] -= 1.5               # outputs that are not all empty
    return {"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
            "vocab": {"src": sv.to_dict(), "tgt": tv.to_dict()},
            "model": {k: v.clone() for k, v in m.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []}, "step": step, "args": {"seed": seed}}


def save(tmp_path, name, ckpt):
    path = str(tmp_path / name)
    seqmodel.save_checkpoint(ckpt, path)
    return path


def test_the_average_is_the_mean_and_keeps_the_last_metadata(tmp_path):
    a, b = lstm_checkpoint(0, step=10), lstm_checkpoint(1, step=20)
    a["model"]["generator.bias"][:3] = torch.tensor([1.0, -2.0, 0.5])
    b["model"]["generator.bias"][:3] = torch.tensor([3.0, 4.0, 0.25])
    paths = [save(tmp_path, "a.pt", a), save(tmp_path, "b.pt", b)]
    out = str(tmp_path / "avg.pt")
    average.main(paths + ["--out", out])
    avg = seqmodel.load_checkpoint(out)
    assert avg["model"]["generator.bias"][:3].tolist() == [2.0, 1.0, 0.375]      # by hand
    assert list(avg["model"]) == list(a["model"])
    for name, t in avg["model"].items():
        assert t.dtype == torch.float32
        assert torch.equal(t, ((a["model"][name].double() + b["model"][name].double()) / 2).float()), name
    assert avg["step"] == 20 and avg["args"] == {"seed": 1} and avg["averaged"] == paths   # the last's
    assert "optimizer" not in avg and avg["vocab"] == b["vocab"] and "masks" not in avg
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]                    # written atomically

    src = tmp_path / "src.txt"                            # and it translates like any checkpoint
    src.write_text("\n".join(SRC) + "\n", encoding="utf-8")
    hyp = str(tmp_path / "hyp.txt")
    translate.main(["--ckpt", out, "--src", str(src), "--out", hyp, "--beam", "2", "--no-progress"])
    m = seqmodel.model_from_checkpoint(avg)
    sv, tv = data.vocabs_from_checkpoint(avg)
    with open(hyp, encoding="utf-8") as f:
        hyps = f.read().splitlines()
    assert hyps == beam.translate(m, sv, tv, SRC, beam=2) and hyps[0] != ""


def test_masks_stay_masks_and_integer_buffers_are_the_last_ones(tmp_path):
    def ckpt(w, count, flag):
        return {"format": "seqkd", "arch": "lstm", "config": {"hidden": 2}, "vocab": {"src": [], "tgt": []},
                "model": {"w": torch.tensor(w), "count": torch.tensor(count), "flag": torch.tensor(flag)},
                "masks": {"w": torch.tensor(w) != 0}}
    paths = [save(tmp_path, "a.pt", ckpt([[1.0, 0.0], [2.0, 4.0]], 3, True)),     # pruned: w[0][1]
             save(tmp_path, "b.pt", ckpt([[3.0, 5.0], [0.0, 8.0]], 7, False))]    # pruned: w[1][0]
    avg = average.average(paths)
    assert avg["model"]["w"].tolist() == [[2.0, 0.0], [0.0, 6.0]]     # pruned in either: 0, not 2.5 or 1.0
    assert avg["masks"]["w"].tolist() == [[True, False], [False, True]]
    assert avg["model"]["count"].item() == 7 and avg["model"]["count"].dtype == torch.int64
    assert avg["model"]["flag"].item() is False
    out = save(tmp_path, "avg.pt", avg)
    assert seqmodel.load_checkpoint(out)["masks"]["w"].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("change, message", [
    (dict(config={"hidden": 12}), "b.pt has other config than {a} (hidden: 16 there, 12 here): "
                                  "average checkpoints of one model"),
    (dict(vocab=True), "b.pt has other vocabularies than {a}: average checkpoints trained with one vocabulary"),
    (dict(masks=True), "b.pt has other pruned weight classes than {a}: average checkpoints pruned alike"),
])
def test_checkpoints_of_other_models_are_refused_naming_the_file(tmp_path, change, message):
    a = lstm_checkpoint(0, step=1)
    b = lstm_checkpoint(1, step=2, **change.get("config", {}))
    if "vocab" in change:
        b["vocab"]["tgt"]["itos"] = b["vocab"]["tgt"]["itos"][:-1] + ["anders"]
    if "masks" in change:
        b["model"]["generator.weight"][0, 0] = 0.0
        b["masks"] = {"generator.weight": b["model"]["generator.weight"] != 0}
    paths = [save(tmp_path, "a.pt", a), save(tmp_path, "b.pt", b)]
    with pytest.raises(SystemExit) as e:
        average.main(paths + ["--out", str(tmp_path / "avg.pt")])
    expected = message.format(a=paths[0]).replace("b.pt", paths[1])
    assert str(e.value).startswith(f"error: {expected}") and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "avg.pt")


def test_bad_command_lines_are_refused_before_loading(tmp_path):
    a = save(tmp_path, "a.pt", lstm_checkpoint(0, step=1))
    cases = [([a], f"error: average.py {a}: give two or more checkpoints to average"),
             ([a, str(tmp_path / "gone.pt")], f"error: checkpoint {tmp_path / 'gone.pt'} not found: give the "
                                              "paths of .pt files written by train.py"),
             ([a, os.path.join(str(tmp_path), ".", "a.pt")], f"error: checkpoint {tmp_path}/./a.pt is given "
                                                              f"twice (also as {a}): name each checkpoint once"),
             ([a, a], f"error: checkpoint {a} is given twice: name each checkpoint once")]
    for ckpts, message in cases:
        with pytest.raises(SystemExit) as e:
            average.main(ckpts + ["--out", str(tmp_path / "avg.pt")])
        assert str(e.value) == message
    with pytest.raises(SystemExit) as e:
        average.main([a, a, "--out", str(tmp_path)])
    assert "is given twice" in str(e.value)                 # the inputs first, then --out
    b = save(tmp_path, "b.pt", lstm_checkpoint(1, step=2))
    with pytest.raises(SystemExit) as e:
        average.main([a, b, "--out", str(tmp_path)])
    assert str(e.value) == f"error: --out {tmp_path} is a folder: give a file name, e.g. {tmp_path}/avg.pt"


def test_last_n_takes_the_highest_epochs_of_a_folder_and_refuses_too_few(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for seed, epoch in enumerate([2, 9, 10]):                  # by epoch number: epoch10.pt is the newest
        save(run, f"epoch{epoch}.pt", lstm_checkpoint(seed, step=epoch))
    out = str(tmp_path / "avg.pt")
    assert average.main(["--last", "2", str(run), "--out", out])["averaged"] == [str(run / "epoch9.pt"),
                                                                             str(run / "epoch10.pt")]
    cases = [(["--last", "4", str(run)], f"--last 4: {run} holds 3 epoch checkpoints (epoch2.pt, epoch9.pt, "
                                         "epoch10.pt); train with --keep-epochs 4, or give --last 3"),
             (["--last", "2", str(tmp_path / "avg.pt")], f"--last 2 {out}: not a folder; give one train.py "
                                                         "--save-dir, e.g. --last 2 runs/mine"),
             (["--last", "1", str(run)], f"--last 1 {run}: give --last 2 or more and one folder, e.g. average.py "
                                         "--last 5 runs/mine --out avg.pt")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            average.main(argv + ["--out", out])
        assert str(e.value) == f"error: {message}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"holds 0 epoch checkpoints \(none\); train with --keep-epochs 2$"):
        average.main(["--last", "2", str(tmp_path / "empty"), "--out", out])
