"""Tests for prune.py: the three schemes of See et al. (2016) on hand-made models with known
weights, masks that survive training steps and checkpoints, the sparse export, and the CLI."""
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

import model
import prune
import translate
from data import SPECIALS, UserError, WordVocab

SCHEMES = ["class-blind", "class-uniform", "class-distribution"]


def two_classes():
    """Two weight classes with hand-picked values, and their biases.

        a.weight = [[1, -1], [7, -7]]      |w| 1 1 7 7      mean 0, σ_a = sqrt((1+1+49+49)/4) = 5
        b.weight = [[30, -30, 40, -40]]    |w| 30 30 40 40  mean 0, σ_b = sqrt(1250) ≈ 35.36
    so |w|/σ: a -> 0.2 0.2 1.4 1.4 ; b -> 0.85 0.85 1.13 1.13
    """
    m = nn.Module()
    m.a = nn.Linear(2, 2)
    m.b = nn.Linear(4, 1)
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0, -1.0], [7.0, -7.0]]))
        m.b.weight.copy_(torch.tensor([[30.0, -30.0, 40.0, -40.0]]))
        m.a.bias.copy_(torch.tensor([0.5, -0.5]))
        m.b.bias.copy_(torch.tensor([0.25]))
    return m


def random_model(seed=0):
    """Every kind of parameter a seq2seq model has: embedding, LSTM, norm, output layer."""
    torch.manual_seed(seed)
    m = nn.Module()
    m.embed = nn.Embedding(11, 5)       # 55
    m.rnn = nn.LSTM(5, 7)               # weight_ih_l0 28x5 = 140, weight_hh_l0 28x7 = 196, biases
    m.norm = nn.LayerNorm(7)            # dim 1: never pruned
    m.out = nn.Linear(7, 13)            # 91
    return m


def n_pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


def tiny_lstm(vocab=100, hidden=16, seed=0):
    torch.manual_seed(seed)
    cfg = model.make_config("lstm", "tiny", src_vocab=vocab, tgt_vocab=vocab, hidden=hidden)
    return model.build_model("lstm", asdict(cfg)), asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Prunable weights and the three schemes
# ---------------------------------------------------------------------------------------------


def test_prunable_weights_are_the_matrices_only():
    names = list(prune.prunable_weights(random_model()))
    assert names == ["embed.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "out.weight"]


def test_class_blind_keeps_the_largest_magnitudes_globally():
    m = two_classes()
    masks = prune.prune(m, 0.5, "class-blind")          # prune 4 of 8: |w| = 1 1 7 7
    assert masks["a.weight"].tolist() == [[False, False], [False, False]]
    assert masks["b.weight"].tolist() == [[True, True, True, True]]
    masks = prune.prune(m, 0.75, "class-blind")         # prune 6 of 8: also 30 and -30
    assert masks["a.weight"].tolist() == [[False, False], [False, False]]
    assert masks["b.weight"].tolist() == [[False, False, True, True]]


def test_class_uniform_prunes_the_same_fraction_of_each_class():
    masks = prune.prune(two_classes(), 0.75, "class-uniform")  # 3 of 4 in each class
    # |7| == |-7|: the tie goes to the earlier position, so 7 is pruned and -7 kept.
    assert masks["a.weight"].tolist() == [[False, False], [False, True]]
    assert masks["b.weight"].tolist() == [[False, False, False, True]]


def test_class_distribution_prunes_below_lambda_sigma_of_each_class():
    m = two_classes()
    # 0.5: the four smallest |w|/σ are a's ±1 (0.2) and b's ±30 (0.85)
    masks = prune.prune(m, 0.5, "class-distribution")
    assert masks["a.weight"].tolist() == [[False, False], [True, True]]
    assert masks["b.weight"].tolist() == [[False, False, True, True]]
    # 0.75: λ in (40/35.36, 7/5] = (1.13, 1.4]: all of b goes, a keeps ±7 -- unlike class-blind,
    # which keeps b's ±40 and drops all of a.
    masks = prune.prune(m, 0.75, "class-distribution")
    assert masks["a.weight"].tolist() == [[False, False], [True, True]]
    assert masks["b.weight"].tolist() == [[False, False, False, False]]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("amount", [0.0, 0.1, 0.333, 0.5, 0.8, 0.9, 0.99])
def test_each_scheme_prunes_exactly_the_requested_fraction(scheme, amount):
    m = random_model()
    N = sum(p.numel() for p in prune.prunable_weights(m).values())   # 482
    masks = prune.prune(m, amount, scheme)
    assert list(masks) == list(prune.prunable_weights(m))
    assert abs(n_pruned(masks) - amount * N) <= 1
    for name, p in prune.prunable_weights(m).items():
        assert masks[name].shape == p.shape and masks[name].dtype == torch.bool
        if scheme == "class-uniform":
            assert abs(int((~masks[name]).sum()) - amount * p.numel()) <= 1, name


def test_class_distribution_uses_one_lambda_for_every_class():
    m = random_model()
    with torch.no_grad():
        m.out.weight.mul_(10)  # a class on another scale: class-blind would prune it last
    masks = prune.prune(m, 0.6, "class-distribution")
    pruned_ratio, kept_ratio = [], []
    for name, w in prune.prunable_weights(m).items():
        ratio = w.detach().abs() / w.detach().std(correction=0)        # |w| / σ_c
        pruned_ratio.append(ratio[~masks[name]].max())
        kept_ratio.append(ratio[masks[name]].min())
        assert 0.3 < (~masks[name]).float().mean() < 0.9  # every class loses a share
    assert max(pruned_ratio) <= min(kept_ratio)          # one λ separates pruned from kept


def test_ties_are_broken_by_position():
    m = nn.Module()
    m.a = nn.Linear(3, 2, bias=False)
    m.b = nn.Linear(2, 1, bias=False)
    nn.init.ones_(m.a.weight)
    nn.init.ones_(m.b.weight)
    masks = prune.prune(m, 0.5, "class-blind")           # 4 of 8 equal weights: the first 4
    assert masks["a.weight"].tolist() == [[False, False, False], [False, True, True]]
    assert masks["b.weight"].tolist() == [[True, True]]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_masks_zeroes_pruned_weights_and_leaves_the_rest(scheme):
    m = random_model()
    before = {name: p.detach().clone() for name, p in m.named_parameters()}
    masks = prune.prune(m, 0.7, scheme)
    prune.apply_masks(m, masks)
    for name, p in m.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0.0).all()
            assert torch.equal(p[masks[name]], before[name][masks[name]])
        else:                                            # biases and the norm: untouched
            assert p.dim() == 1 and torch.equal(p, before[name])


def test_exclude_leaves_a_class_out():
    m = random_model()
    masks = prune.prune(m, 0.5, "class-blind", exclude=["embed", "out"])
    assert list(masks) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert n_pruned(masks) == round(0.5 * (140 + 196))
    with pytest.raises(UserError, match="--exclude 'decoder'"):
        prune.prune(m, 0.5, "class-blind", exclude=["decoder"])
    with pytest.raises(UserError, match="--exclude"):
        prune.prune(m, 0.5, "class-blind", exclude=["weight"])


def test_repruning_respects_the_old_masks():
    m = random_model()
    first = prune.prune(m, 0.5, "class-uniform")
    prune.apply_masks(m, first)
    more = prune.prune(m, 0.8, "class-blind")            # zeros go first: a superset is pruned
    assert n_pruned(more) == round(0.8 * 482)
    assert all((~first[n] <= ~more[n]).all() for n in first)
    fewer = prune.prune(m, 0.2, "class-blind")           # never un-prunes: zeros stay pruned
    assert all(torch.equal(first[n], fewer[n]) for n in first)


@pytest.mark.parametrize("amount", [1.0, 1.5, -0.1, 80.0, float("nan")])
def test_amount_out_of_range_names_the_flag(amount):
    with pytest.raises(UserError, match="--amount"):
        prune.prune(random_model(), amount, "class-blind")


def test_unknown_scheme():
    with pytest.raises(UserError, match="--scheme"):
        prune.prune(random_model(), 0.5, "class-random")


# ---------------------------------------------------------------------------------------------
# Retraining keeps pruned weights at exactly zero
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
], ids=["sgd", "adam", "adamw"])
def test_training_steps_then_apply_masks_keep_pruned_weights_zero(make_opt):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    masks = prune.prune(m, 0.6, "class-blind")
    prune.apply_masks(m, masks)
    opt = make_opt(m.parameters())
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        params = dict(m.named_parameters())
        # the step moved pruned weights away from zero (so this test can fail) ...
        assert any((params[n][~k] != 0).any() for n, k in masks.items())
        prune.apply_masks(m, masks)
        # ... and apply_masks puts every one back to exactly 0.0
        for name, keep in masks.items():
            assert (params[name][~keep] == 0.0).all()
            assert (params[name][keep] != 0.0).all()


def test_apply_masks_rejects_masks_of_another_model():
    masks = prune.prune(random_model(), 0.5, "class-blind")
    with pytest.raises(UserError, match="embed.weight"):
        prune.apply_masks(two_classes(), masks)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the sparse export (on a tiny LSTM from model.py)
# ---------------------------------------------------------------------------------------------


def pruned_checkpoint(amount=0.8):
    net, cfg = tiny_lstm()
    masks = prune.prune(net, amount, "class-blind")
    prune.apply_masks(net, masks)
    return {"format": "seqkd", "arch": "lstm", "config": cfg, "model": net.state_dict(),
            "masks": masks}


def test_masks_survive_save_and_load(tmp_path):
    ckpt = pruned_checkpoint()
    model.save_checkpoint(ckpt, tmp_path / "p.pt")
    loaded = model.load_checkpoint(str(tmp_path / "p.pt"))           # weights_only=True
    assert loaded["masks"].keys() == ckpt["masks"].keys()
    assert all(torch.equal(loaded["masks"][n], ckpt["masks"][n]) for n in ckpt["masks"])
    net = model.model_from_checkpoint(loaded)
    # resume: a training step on the reloaded model, then the reloaded masks
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=0.01)
    src = torch.randint(4, 100, (3, 5))
    tgt = torch.randint(4, 100, (3, 6))
    logits, _ = net(src, src != 0, tgt)
    logits.logsumexp(-1).mean().backward()
    opt.step()
    prune.apply_masks(net, loaded["masks"])
    for name, p in net.named_parameters():
        if name in loaded["masks"]:
            assert (p[~loaded["masks"][name]] == 0.0).all()


def test_sparse_export_round_trips(tmp_path):
    ckpt = pruned_checkpoint()
    prune.export_sparse(ckpt, tmp_path / "p.sparse.pt")
    state = model.load_checkpoint(str(tmp_path / "p.sparse.pt"))["model"]
    assert list(state) == list(ckpt["model"])
    for name, t in ckpt["model"].items():
        assert torch.equal(state[name], t) and state[name].dtype == t.dtype, name
    raw = torch.load(tmp_path / "p.sparse.pt", weights_only=True)
    entry = raw["tensors"]["generator.weight"]
    assert entry["index"].dtype == torch.int32
    assert entry["value"].numel() == int(ckpt["masks"]["generator.weight"].sum())
    assert isinstance(raw["tensors"]["generator.bias"], torch.Tensor)   # dense: not prunable


def student_file(tmp_path):
    """A tiny LSTM checkpoint with a word vocabulary of its 100 ids, no optimizer (as best.pt)."""
    net, cfg = tiny_lstm()
    vocab = WordVocab(SPECIALS + [f"w{i}" for i in range(100 - len(SPECIALS))]).to_dict()
    model.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": cfg, "model": net.state_dict(),
                           "vocab": {"src": vocab, "tgt": vocab}, "optimizer": None},
                          tmp_path / "student.pt")
    return str(tmp_path / "student.pt")


def test_translate_reads_the_sparse_export(tmp_path):
    prune.main(["--ckpt", student_file(tmp_path), "--amount", "0.8", "--out", str(tmp_path / "p.pt"),
                "--export", str(tmp_path / "p.sparse.pt")])
    (tmp_path / "src.txt").write_text("w1 w2 w3\nw5 w8\n\nw13 w21 w34 w55 w89\n")
    hyps = []
    for name in ["p.pt", "p.sparse.pt"]:
        translate.main(["--ckpt", str(tmp_path / name), "--src", str(tmp_path / "src.txt"), "--beam", "3",
                        "--out", str(tmp_path / f"{name}.txt"), "--device", "cpu", "--no-progress"])
        hyps.append((tmp_path / f"{name}.txt").read_text())
    assert hyps[0] == hyps[1] and len(hyps[0].split()) > 4
    dense, sparse = (model.load_checkpoint(str(tmp_path / name)) for name in ["p.pt", "p.sparse.pt"])
    assert sparse["vocab"] == dense["vocab"] and sparse["config"] == dense["config"]
    assert sparse["masks"].keys() == dense["masks"].keys()
    assert all(torch.equal(sparse["masks"][n], m) for n, m in dense["masks"].items())


def test_a_pruned_checkpoint_is_not_larger_than_the_unpruned_one(tmp_path):
    student = student_file(tmp_path)
    prune.main(["--ckpt", student, "--amount", "0.8", "--out", str(tmp_path / "p.pt")])
    assert os.path.getsize(tmp_path / "p.pt") <= os.path.getsize(student)
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert raw["masks"] == list(prune.prunable_weights(tiny_lstm()[0]))   # the names only
    masks = model.load_checkpoint(str(tmp_path / "p.pt"))["masks"]         # derived: weight != 0
    assert all(torch.equal(keep, raw["model"][n] != 0) for n, keep in masks.items())
    N = sum(keep.numel() for keep in masks.values())
    assert abs(sum(int((~keep).sum()) for keep in masks.values()) - 0.8 * N) <= 1


def test_old_checkpoints_with_bool_masks_still_load_and_reprune(tmp_path):
    ckpt = pruned_checkpoint(0.5)                      # "masks": {name: bool tensor}, as files had
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = model.load_checkpoint(str(tmp_path / "old.pt"))
    assert all(torch.equal(loaded["masks"][n], m) for n, m in ckpt["masks"].items())
    prune.main(["--ckpt", str(tmp_path / "old.pt"), "--amount", "0.8", "--out", str(tmp_path / "new.pt")])
    new = model.load_checkpoint(str(tmp_path / "new.pt"))
    assert new["masks"].keys() == ckpt["masks"].keys()
    assert all((~ckpt["masks"][n] <= ~new["masks"][n]).all() for n in ckpt["masks"])  # only adds

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_prunes_reports_and_exports(tmp_path, capsys):
    net, cfg = tiny_lstm()
    opt = torch.optim.Adam(net.parameters())
    ckpt = {"format": "seqkd", "arch": "lstm", "config": cfg, "model": net.state_dict(),
            "optimizer": opt.state_dict(), "step": 7}
    model.save_checkpoint(ckpt, tmp_path / "student.pt")
    teacher, tcfg = tiny_lstm(hidden=64)
    model.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": tcfg,
                           "model": teacher.state_dict()}, tmp_path / "teacher.pt")

    summary = prune.main(["--ckpt", str(tmp_path / "student.pt"), "--amount", "0.8",
                          "--teacher", str(tmp_path / "teacher.pt"),
                          "--out", str(tmp_path / "pruned.pt"),
                          "--export", str(tmp_path / "pruned.sparse.pt")])
    printed = capsys.readouterr().out
    out = model.load_checkpoint(str(tmp_path / "pruned.pt"))
    assert "optimizer" not in out and out["step"] == 7
    N = sum(p.numel() for p in prune.prunable_weights(net).values())
    assert abs(sum(int((~m).sum()) for m in out["masks"].values()) - 0.8 * N) <= 1
    for name, keep in out["masks"].items():
        assert (out["model"][name][~keep] == 0.0).all()
    assert "encoder.rnn.weight_hh_l0" in printed and "generator.weight" in printed
    ratio = model.count_params(teacher) / summary["nonzero"]
    assert f"{ratio:.1f}x fewer than the teacher" in printed
    assert summary["nonzero"] == model.count_params(net) - round(0.8 * N)
    assert summary["sparse_mb"] < summary["dense_mb"]
    state = model.load_checkpoint(str(tmp_path / "pruned.sparse.pt"))["model"]
    assert all(torch.equal(state[n], out["model"][n]) for n in out["model"])


def test_cli_errors_are_one_line(tmp_path):
    net, cfg = tiny_lstm()
    model.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": cfg,
                           "model": net.state_dict()}, tmp_path / "s.pt")
    model.save_checkpoint({"format": "seqkd", "arch": "lstm", "config": cfg, "model": {}},
                          tmp_path / "empty.pt")
    out = str(tmp_path / "o.pt")
    cases = [(["--ckpt", str(tmp_path / "s.pt"), "--amount", "1"], "error: --amount 1.0"),
             (["--ckpt", str(tmp_path / "missing.pt"), "--amount", "0.5"], "error: checkpoint"),
             (["--ckpt", str(tmp_path / "empty.pt"), "--amount", "0.5"], "no model weights"),
             (["--ckpt", str(tmp_path / "s.pt"), "--amount", "0.5", "--exclude", "zzz"],
              "error: --exclude 'zzz'")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            prune.main(argv + ["--out", out])
        assert isinstance(e.value.code, str) and message in e.value.code
        assert "\n" not in e.value.code
    with pytest.raises(SystemExit):  # argparse: invalid choice
        prune.main(["--ckpt", str(tmp_path / "s.pt"), "--amount", "0.5", "--scheme", "random",
                    "--out", out])
