"""Tests of model.py: configs from presets, checkpoints round-trip and fail with clear errors,
the re-exports. Tiny models, seeded."""
from dataclasses import asdict

import pytest
import torch

import lstm
import model as M
import t5
from data import BOS, UserError


def tiny():
    torch.manual_seed(0)
    cfg = M.make_config("lstm", "tiny", src_vocab=13, tgt_vocab=11, layers=2)
    return M.Seq2Seq(cfg).eval()


def test_checkpoint_round_trip(tmp_path):
    m = tiny()
    path = tmp_path / "m.pt"
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(m.cfg), "model": m.state_dict(),
            "vocab": {"src": {"kind": "word", "itos": ["a"]}}, "blob": b"\x00\x01"}
    M.save_checkpoint(ckpt, path)
    assert not (tmp_path / "m.pt.tmp").exists()
    loaded = M.model_from_checkpoint(M.load_checkpoint(str(path)))
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a seqkd checkpoint"):
        M.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        M.load_checkpoint(str(tmp_path / "garbage.pt"))
    with pytest.raises(UserError, match="unknown architecture"):
        M.build_model("gru", {})


def test_config_errors():
    with pytest.raises(UserError, match="--preset"):
        M.make_config("lstm", "huge")
    with pytest.raises(UserError, match="--attention"):
        M.make_config("lstm", "tiny", attention="bahdanau")
    with pytest.raises(UserError, match="even"):
        M.make_config("lstm", "tiny", hidden=15, bidirectional=True)


def test_save_checkpoint_leaves_only_the_file(tmp_path):
    M.save_checkpoint({"format": "seqkd", "model": {}}, tmp_path / "sub" / "a.pt")
    M.save_checkpoint({"format": "seqkd", "model": {"w": torch.ones(2)}}, tmp_path / "sub" / "a.pt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.pt"]
    assert torch.equal(M.load_checkpoint(str(tmp_path / "sub" / "a.pt"))["model"]["w"], torch.ones(2))


def test_masks_are_stored_as_names_and_read_as_the_zeros(tmp_path):
    w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    keep = w != 0
    M.save_checkpoint({"format": "seqkd", "model": {"w": w, "b": torch.zeros(2)}, "masks": {"w": keep}},
                      tmp_path / "p.pt")
    assert torch.load(tmp_path / "p.pt", weights_only=True)["masks"] == ["w"]
    loaded = M.load_checkpoint(str(tmp_path / "p.pt"))
    assert list(loaded["masks"]) == ["w"] and torch.equal(loaded["masks"]["w"], keep)
    assert M.pruning_masks({"model": {"w": w}}) == {}
    torch.save({"format": "seqkd", "model": {"w": w}, "masks": {"w": keep}}, tmp_path / "old.pt")
    assert torch.equal(M.load_checkpoint(str(tmp_path / "old.pt"))["masks"]["w"], keep)
    with pytest.raises(ValueError, match="not 0.0"):         # a pruned weight that is not zero
        M.save_checkpoint({"format": "seqkd", "model": {"w": w}, "masks": {"w": ~keep}}, tmp_path / "x.pt")
    torch.save({"format": "seqkd", "model": {"w": w}, "masks": ["v"]}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="pruning mask v"):
        M.load_checkpoint(str(tmp_path / "bad.pt"))


def test_load_checkpoint_densifies_a_sparse_file(tmp_path):
    sparse = {"format": "seqkd-sparse", "arch": "lstm", "config": {"hidden": 2}, "vocab": {"src": 1},
              "tensors": {"w": {"shape": [2, 2], "index": torch.tensor([1, 2], dtype=torch.int32),
                                "value": torch.tensor([5.0, 6.0])}, "b": torch.ones(2)}}
    M.save_checkpoint(sparse, tmp_path / "s.pt")
    ckpt = M.load_checkpoint(str(tmp_path / "s.pt"))
    assert ckpt["format"] == "seqkd" and ckpt["arch"] == "lstm" and ckpt["config"] == {"hidden": 2}
    assert ckpt["vocab"] == {"src": 1} and list(ckpt["model"]) == ["w", "b"]
    assert torch.equal(ckpt["model"]["w"], torch.tensor([[0.0, 5.0], [6.0, 0.0]]))
    assert torch.equal(ckpt["model"]["b"], torch.ones(2))
    assert ckpt["masks"]["w"].tolist() == [[False, True], [True, False]] and list(ckpt["masks"]) == ["w"]


def test_model_reexports_the_models_and_presets():
    assert (M.LSTMConfig, M.PRESETS, M.Seq2Seq) == (lstm.LSTMConfig, lstm.PRESETS, lstm.Seq2Seq)
    assert (M.T5Config, M.T5_PRESETS, M.T5Model) == (t5.T5Config, t5.T5_PRESETS, t5.T5Model)
    assert M.ARCHS == {"lstm": (lstm.LSTMConfig, lstm.Seq2Seq), "t5": (t5.T5Config, t5.T5Model)}
    assert not hasattr(lstm, "save_checkpoint") and not hasattr(t5, "save_checkpoint")


def test_int8_decoding_agrees_with_float32_and_is_deterministic(tmp_path):
    """A small LSTM trained for 2 epochs on 3,000 built-in pairs: greedy decoding with int8
    weights gives the float32 translation for most of 200 test sentences (here 90% or more),
    the same output on a second run, and every product of the decoder runs quantised."""
    import beam
    import data
    import synthetic
    import train
    pairs = synthetic.synthetic_corpus(3200, seed=5)
    for name, part in (("train", pairs[:3000]), ("test", pairs[3000:])):
        for side, k in (("src", 0), ("tgt", 1)):
            (tmp_path / f"{name}.{side}").write_text("".join(p[k] + "\n" for p in part))
    train.main(["--train-src", str(tmp_path / "train.src"), "--train-tgt", str(tmp_path / "train.tgt"),
                "--valid-src", str(tmp_path / "test.src"), "--valid-tgt", str(tmp_path / "test.tgt"),
                "--preset", "builtin", "--optim", "adam", "--lr", "0.005", "--batch-size", "32", "--epochs", "2",
                "--threads", "1", "--save-dir", str(tmp_path / "run")])
    ckpt = M.load_checkpoint(str(tmp_path / "run" / "best.pt"))
    fp32 = M.model_from_checkpoint(ckpt)
    int8 = M.int8_model(M.model_from_checkpoint(ckpt))
    quantised = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(int8.rnn.W[0], quantised) and isinstance(int8.generator, quantised)
    sv, tv = data.vocabs_from_checkpoint(ckpt)
    src = [p[0] for p in pairs[3000:]]
    a, b = beam.translate(fp32, sv, tv, src, beam=1), beam.translate(int8, sv, tv, src, beam=1)
    assert sum(x == y for x, y in zip(a, b)) >= 0.9 * len(src)
    assert beam.translate(int8, sv, tv, src, beam=1) == b


def test_bf16_autocast_changes_the_products_not_the_output_type():
    """Under decoding_precision("bf16") the matrix products run in bfloat16: the log-probabilities
    move by about bf16's precision (8 bits of mantissa), and stay float32."""
    torch.manual_seed(0)
    cfg = M.make_config("lstm", "builtin", src_vocab=20, tgt_vocab=30, hidden=32, emb_dim=16)
    model = M.build_model("lstm", asdict(cfg)).eval()
    src = torch.randint(4, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    prev = torch.full((3,), BOS)
    if not M.cpu_runs_bf16():
        pytest.skip("this CPU cannot run an LSTM in bf16 (no AVX-512): the next test covers it")
    with torch.no_grad():
        fp32, _, _ = model.step(prev, model.start(src, mask))
        with M.decoding_precision("bf16", torch.device("cpu")):
            bf16, _, _ = model.step(prev, model.start(src, mask))
    assert bf16.dtype == torch.float32
    gap = (bf16 - fp32).abs().max().item()
    assert 1e-5 < gap < 0.05, gap
    assert M.decoding_precision(None, torch.device("cpu")).__class__.__name__ == "nullcontext"


def test_bf16_on_a_cpu_that_cannot_run_it_is_a_one_line_error(monkeypatch):
    """Where oneDNN refuses bf16 (CPUs without AVX-512) --autocast bf16 stops before decoding with a
    message naming the flag, instead of a traceback from inside torch's LSTM."""
    monkeypatch.setattr(M, "cpu_runs_bf16", lambda: False)
    with pytest.raises(UserError, match=r"--autocast bf16: this CPU .*\(drop --autocast\)"):
        M.decoding_precision("bf16", torch.device("cpu"))
    assert M.decoding_precision(None, torch.device("cpu")).__class__.__name__ == "nullcontext"


def test_count_params_counts_the_int8_models_weights_too():
    """int8_model moves the weights of nn.Linear and nn.LSTM out of parameters(); the count stays.
    By hand for a 1x2 LSTM with 3-word vocabularies, 2-dim embeddings, no input feeding, dot attention:
    embeddings 2 x (3 x 2) = 12; encoder LSTM 4·2·(2 + 2) + 2·4·2 = 48; decoder W_e 8·2 = 16 and
    W_0 8·2 + 8 = 24; W_c 2·4 = 8; generator 3·2 + 3 = 9: 117."""
    from lstm import LSTMConfig, Seq2Seq
    cfg = LSTMConfig(src_vocab=3, tgt_vocab=3, emb_dim=2, hidden=2, layers=1, attention="dot", input_feed=False)
    model = Seq2Seq(cfg).eval()
    assert M.count_params(model) == 117
    assert M.count_params(M.int8_model(model)) == 117
