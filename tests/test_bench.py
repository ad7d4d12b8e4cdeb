"""Tests of bench.py: the multiply-add count is the hand count, and the measurements run."""
import torch

import bench
import data
import model as M


def tiny_cfg(tgt_vocab=5, **kw):
    return M.LSTMConfig(src_vocab=9, tgt_vocab=tgt_vocab, emb_dim=2, hidden=4, layers=1, dropout=0.0, **kw)


def test_forward_macs_by_hand():
    # E=2, H=4, V=5, one layer, general attention with input feeding; 3 source and 2 target tokens.
    #   encoder per source token: 4H(E+H) = 4*4*6 = 96; general keys: H*H = 16  -> 3 * 112 = 336
    #   decoder per target token: 4H((E+H)+H) = 4*4*10 = 160, attention 2*S*H = 24,
    #   W_c 2*H*H = 32, output H*V = 20                                         -> 2 * 236 = 472
    assert bench.forward_macs(tiny_cfg(), src_len=3, tgt_len=2) == 336 + 472
    # dot attention has no keys to precompute: 16 fewer per source token
    assert bench.forward_macs(tiny_cfg(attention="dot"), 3, 2) == 336 + 472 - 3 * 16


def test_random_examples_lengths_and_ids():
    examples = bench.random_examples(50, vocab=20, min_len=5, max_len=7, seed=0)
    assert len(examples) == 50
    for src, tgt in examples:
        assert 5 <= len(src) <= 7 and 5 <= len(tgt) <= 7
        assert min(src + tgt) >= 4 and max(src + tgt) < 20      # no special ids
    assert examples == bench.random_examples(50, vocab=20, min_len=5, max_len=7, seed=0)


def test_measurements_run_on_a_tiny_model():
    examples = bench.random_examples(16, vocab=9, seed=1)
    cfg = tiny_cfg(tgt_vocab=9)
    train = bench.bench_train(cfg, examples, batch_size=4, steps=2, warmup=1)
    assert train["train_tok_s"] > 0 and train["train_gflops"] > 0
    assert bench.bench_decode(cfg, examples, beam_size=1) > 0
    assert bench.bench_decode(cfg, examples, beam_size=3) > 0
    bound = bench.main(["--bound", "--sizes", "1x4", "--vocab", "9", "--steps", "1", "--batch-size", "4",
                        "--decode-sentences", "4", "--beam", "3"])
    assert sorted(bound) == ["beam3", "greedy", "train"] and all(r["product_macs"] > 0 for r in bound.values())
    rows = bench.main(["--skip-train", "--int8", "--sizes", "1x4", "--vocab", "9", "--decode-sentences", "4",
                       "--beam", "3"])
    assert sorted(k for k in rows[0] if k.endswith("words_s")) == [
        "beam3_int8_words_s", "beam3_words_s", "greedy_int8_words_s", "greedy_words_s"]
    assert all(v > 0 for k, v in rows[0].items() if k.endswith("words_s"))


def test_decoder_product_shapes_count_the_decoders_multiply_adds_three_times():
    # E=2, H=4, V=5, one layer, 1 sentence of 2 target tokens. Forward: W [h~; h] (1x8)(8x16) = 128
    # and W_c (1x8)(8x4) = 32 per token -> 2 * 160 = 320; word gates (2x2)(2x16) = 64; output
    # (2x4)(4x5) = 40 -> 424, forward_macs' decoder without attention (2 * (160 + 32 + 20)).
    # Backward does two products of the same size for each: 3 * 424.
    shapes = bench.decoder_product_shapes(tiny_cfg(), batch=1, tgt_len=2)
    assert sum(m * k * n * c for m, k, n, c in shapes) == 3 * 424
    assert bench.shapes_gflops([(8, 8, 8, 1)], repeats=1) > 0


def test_sparse_vs_dense_times_the_decoder_products_of_a_pruned_model(tmp_path):
    import prune
    from dataclasses import asdict
    from test_beam import tiny_lstm
    m, sv, tv, cfg = tiny_lstm()
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
            "vocab": {"src": sv.to_dict(), "tgt": tv.to_dict()}, "model": m.state_dict(), "args": {}}
    M.save_checkpoint(ckpt, tmp_path / "model.pt")
    prune.main(["--ckpt", str(tmp_path / "model.pt"), "--amount", "0.5", "--out", str(tmp_path / "pruned.pt")])
    pruned = M.model_from_checkpoint(M.load_checkpoint(str(tmp_path / "pruned.pt")))
    step = [w for n, w in pruned.named_parameters() if w.dim() == 2 and not n.startswith("encoder")
            and "embed" not in n]
    zeros = sum(int((w == 0).sum()) for w in step) / sum(w.numel() for w in step)
    rows = bench.sparse_vs_dense(str(tmp_path / "pruned.pt"), rows=(3, 5), repeats=2)
    assert [r["rows"] for r in rows] == [3, 5]
    # W_e, W.0, W.1 (or as many as the layers), the attention, W_c and the output layer
    assert all(r["matrices"] == len(step) >= 4 and r["zero_fraction"] == zeros for r in rows)
    assert 0.2 < zeros < 0.8 and all(r["dense_s"] > 0 and r["sparse_s"] > 0 for r in rows)


def test_product_bound_counts_the_products_of_greedy_search_by_hand():
    # Greedy search of 2 sentences of 3 tokens, every output forced to 3 tokens (</s> made
    # impossible before the last step): the decoder's products per token are forward_macs' minus
    # the encoder (the fused nn.LSTM, not an aten product): 472 / 2 = 236 per token, and the
    # general keys once per source token, 16 -> 2 * (3 * 236 + 3 * 16) = 1,512 multiply-adds.
    model = M.Seq2Seq(tiny_cfg()).eval()
    with torch.no_grad():
        model.generator.bias[data.EOS] = -1e9
    result = bench.product_bound(lambda: bench.decode_all(model, [[4, 5, 6], [7, 8, 4]], beam_size=1), repeats=1)
    assert result["product_macs"] == 2 * (3 * 236 + 3 * 16)
    assert result["bound"] >= 1.0 and result["product_seconds"] > 0
