"""Speed benchmarks: training target tokens/s and decoding source words/s.

    python bench.py                          # the BENCHMARKS.md table (2x500 and 4x1000 LSTMs)
    python bench.py --sizes 2x500 --json out.json
    python bench.py --skip-train --int8 --threads 1   # decoding with float32 and with int8 weights
    python bench.py --memory kim-rush-teacher --memory-batches 64,128     # peak memory of a step
    python bench.py --sparse pruned.pt --threads 2     # a pruned model's products: dense vs sparse
    python bench.py --bound --sizes 2x500 --threads 1  # the share of time in matrix products: the limit

Training: random sentences of 5-20 tokens over a 500-word vocabulary, 64 sentences a batch
(bucketed by length, as train.py batches), general attention, input feeding, dropout 0.2, Adam,
clipping at 5; full steps (forward + backward + update) timed after warm-up, in non-padding
target tokens (EOS included) per second. GFLOP/s counts the model's multiply-adds (`forward_macs`)
x 2 (FLOPs) x 3 (forward + backward), beside a plain large matmul's and beside the rate of the
decoder's own products at their own shapes (decoder_product_shapes): how much of the hardware is used.

Decoding: random weights never emit EOS reliably, so every output is exactly as long as its
source (max_len_a=1, max_len_b=0), which is how long a real translation roughly is. Speed is
source words per second over the whole set, batches of 32 sentences.
"""
import argparse
import math
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import beam
import data
import model as M
import runs


def matmul_gflops(n=2048):
    """GFLOP/s of a plain n x n float32 matrix product: the machine's practical peak."""
    return shapes_gflops([(n, n, n, 1)])


def shapes_gflops(shapes, repeats=10):
    """GFLOP/s of float32 matrix products of the given shapes [(m, k, n, count)], each timed alone
    and weighted by its count: the machine's rate for the products a model really does (a product
    with m = 64 rows runs slower than 2048 x 2048)."""
    flops = seconds = 0.0
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds += (time.perf_counter() - t0) / repeats * count
        flops += 2 * m * k * n * count
    return flops / seconds / 1e9


def decoder_product_shapes(cfg, batch, tgt_len):
    """The matrix products of one training step of the LSTM's decoder and output layer, (m, k, n,
    count): per step each layer's W [x; h] and W_c [c; h], once for all positions the word gates
    and the output layer; for each, backward's input-gradient and weight-gradient products.
    (The encoder is left out: its mkldnn LSTM does its own products.)"""
    E, H, V, B, T = cfg.emb_dim, cfg.hidden, cfg.tgt_vocab, batch, tgt_len
    forward = [(B, (H if cfg.input_feed else 0) + H, 4 * H, T)] + [(B, 2 * H, 4 * H, T)] * (cfg.layers - 1)
    forward += [(B, 2 * H, H, T), (B * T, E, 4 * H, 1), (B * T, H, V, 1)]
    return [shape for m, k, n, c in forward for shape in ((m, k, n, c), (m, n, k, c), (k, m, n, c))]


PRODUCTS = {"aten::addmm": 3, "aten::mm": 2, "aten::bmm": 2}      # op: how many of its inputs are tensors
FUSED_LSTM = ("aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward")   # the encoder's nn.LSTM


def product_macs(shapes):
    """Multiply-adds of a matrix product from its input shapes: addmm (bias, (m, k), (k, n)),
    mm ((m, k), (k, n)) or bmm ((b, m, k), (b, k, n))."""
    a, b = shapes[-2:]
    return math.prod(a) * b[-1]


def product_bound(work, repeats=11):
    """How much faster could `work` (a function) run if everything but its matrix products took no
    time? It is run once to warm up, timed, then run under torch.profiler to record every product's
    shapes, and each product is timed alone on fresh tensors of those shapes (the median of
    `repeats`; the encoder's fused LSTM, which does its own products, counts at its profiled time).
    Returns the seconds of `work`, of its products alone, their multiply-adds, and `bound` = work /
    products: the highest speed-up that any implementation doing the same products can reach on
    this machine and thread count. (An upper bound: a product timed alone finds its inputs in the
    cache and its output's memory ready.)"""
    work()
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    with torch.profiler.profile(record_shapes=True) as prof:
        work()
    products = macs = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in FUSED_LSTM:
            products += event.self_cpu_time_total / 1e6
        if event.key not in PRODUCTS:
            continue
        op = getattr(torch, event.key.split("::")[1])
        inputs = [torch.randn(shape) for shape in event.input_shapes[:PRODUCTS[event.key]]]
        op(*inputs)                                                     # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op(*inputs)
            times.append(time.perf_counter() - t0)
        products += statistics.median(times) * event.count
        macs += product_macs(event.input_shapes[:PRODUCTS[event.key]]) * event.count
    return {"seconds": seconds, "product_seconds": products, "product_macs": macs, "bound": seconds / products}


def random_examples(n, vocab, min_len=5, max_len=20, seed=0):
    """n (src_ids, tgt_ids) pairs of random lengths in [min_len, max_len], ids from the vocabulary."""
    g = torch.Generator().manual_seed(seed)

    def sentence():
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        return torch.randint(4, vocab, (length,), generator=g).tolist()
    return [(sentence(), sentence()) for _ in range(n)]


def forward_macs(cfg, src_len, tgt_len):
    """Multiply-adds of one sentence's forward pass through the LSTM (teacher forcing).
    An LSTM layer with input size I and H units costs 4H(I + H) per token (four gates);
    the attention costs, per target token, the score and context over S source positions (2SH),
    plus H*H per source position once for `general` keys; h~ = tanh(W_c[c; h]) costs 2H*H;
    the output layer H*V. Not counted: embedding look-ups, softmaxes, element-wise ops."""
    E, H, L, V = cfg.emb_dim, cfg.hidden, cfg.layers, cfg.tgt_vocab
    enc = 4 * H * (E + H) + (L - 1) * 4 * H * (H + H)          # per source token (unidirectional)
    if cfg.bidirectional:
        h = H // 2
        enc = 2 * (4 * h * (E + h) + (L - 1) * 4 * h * (H + h))
    first = E + (H if cfg.input_feed else 0)
    dec = 4 * H * (first + H) + (L - 1) * 4 * H * (H + H)      # per target token
    dec += 2 * src_len * H + 2 * H * H + H * V                  # attention, W_c, generator
    keys = H * H if cfg.attention in ("general", "concat") else 0
    return src_len * (enc + keys) + tgt_len * dec


def training_batches(examples, batch_size, count, seed=0):
    """`count` batches of `examples`, bucketed by length as train.py batches them, repeated as needed."""
    batches = data.batches(examples, batch_size=batch_size, shuffle=True, seed=seed)
    return (batches * (1 + count // len(batches)))[:count]


def train_step(model, optimizer, b):
    """One full training step: forward, the NLL averaged over target tokens, backward, clipping at 5, update."""
    logits, _ = model(b.src, b.src_mask, b.tgt_in)
    loss = F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=data.PAD)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()


def bench_train(cfg, examples, batch_size=64, steps=20, warmup=3, seed=0):
    """Time full training steps. Returns target tokens/s and achieved GFLOP/s."""
    torch.manual_seed(seed)
    model = M.Seq2Seq(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = flops = 0
    for i, b in enumerate(training_batches(examples, batch_size, steps + warmup, seed)):
        if i == warmup:
            t0, tokens, flops = time.perf_counter(), 0, 0
        train_step(model, optimizer, b)
        tokens += b.ntokens
        # padded shapes are what the hardware computes
        flops += 3 * 2 * b.src.size(0) * forward_macs(cfg, b.src.size(1), b.tgt_in.size(1))
    seconds = time.perf_counter() - t0
    return {"train_tok_s": tokens / seconds, "train_gflops": flops / seconds / 1e9}


def bounds(cfg, train_set, decode_set, batch_size=64, steps=20, beam_size=5, seed=0):
    """product_bound of `steps` training steps and of greedy and beam-search decoding of the
    sources of `decode_set` (models of `cfg` with random weights; decoding with a fresh one)."""
    torch.manual_seed(seed)
    model = M.Seq2Seq(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = training_batches(train_set, batch_size, steps, seed)
    out = {"train": product_bound(lambda: [train_step(model, optimizer, b) for b in batches])}
    torch.manual_seed(seed)
    model = M.Seq2Seq(cfg).eval()
    srcs = sorted((s for s, _ in decode_set), key=len)
    for name, k in (("greedy", 1), (f"beam{beam_size}", beam_size)):
        out[name] = product_bound(lambda: decode_all(model, srcs, k))
    return out


@torch.no_grad()
def decode_all(model, srcs, beam_size, batch_size=32):
    """Greedy (beam_size 1) or beam search over source token lists, in batches of `batch_size`; every
    output at most as long as its source (max_len_a=1, max_len_b=0)."""
    for i in range(0, len(srcs), batch_size):
        src = data.pad(srcs[i:i + batch_size])                                 # (B, S)
        if beam_size == 1:
            beam.greedy(model, src, src != data.PAD, max_len_a=1.0, max_len_b=0)
        else:
            beam.beam_search(model, src, src != data.PAD, beam=beam_size, max_len_a=1.0, max_len_b=0)


def bench_decode(cfg, examples, beam_size, batch_size=32, seed=0, int8=False):
    """Source words/s of greedy (beam_size 1) or beam search over the source sides of `examples`;
    int8: with the weights of every product in int8 (model.int8_model, as translate.py --int8)."""
    torch.manual_seed(seed)
    model = M.Seq2Seq(cfg).eval()
    model = M.int8_model(model) if int8 else model
    srcs = sorted((s for s, _ in examples), key=len)
    t0 = time.perf_counter()
    decode_all(model, srcs, beam_size, batch_size)
    return sum(len(s) for s in srcs) / (time.perf_counter() - t0)


def step_memory(preset, batch_sizes, length=50, vocab=50000, device="cpu"):
    """Peak memory of one training step (forward, backward, clipping, SGD update) of an LSTM preset,
    for the longest sentences train.py keeps (--max-len 50: 50 source words, 51 target tokens with
    EOS), loss summed and divided by the sentences as the paper's presets do. CUDA:
    torch.cuda.max_memory_allocated, reset before each step. CPU: the process's peak resident set
    size (ru_maxrss, Python and PyTorch included), which only grows, so the batches are measured in
    increasing order: each figure is the peak of its own step, the largest so far."""
    cfg = M.make_config("lstm", preset, src_vocab=vocab, tgt_vocab=vocab)
    model = M.Seq2Seq(cfg).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    rows = []
    for B in sorted(batch_sizes):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        src = torch.randint(4, vocab, (B, length), device=device)
        tgt = torch.randint(4, vocab, (B, length + 1), device=device)
        t0 = time.perf_counter()
        logits, _ = model(src, src != data.PAD, tgt)                       # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum") / B
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)   # Linux: KiB
        rows.append({"preset": preset, "batch": B, "params": M.count_params(model), "vocab": vocab,
                     "peak_gib": peak / 2 ** 30, "step_s": time.perf_counter() - t0, "device": str(device)})
        print(f"{preset} batch {B}: peak {peak / 2 ** 30:.2f} GiB, step {rows[-1]['step_s']:.1f} s ({device})",
              flush=True)
    return rows


def sparse_vs_dense(ckpt_path, rows=(64, 320), repeats=200):
    """Does a pruned model's sparsity make its decoder step faster on this CPU? For every weight
    matrix W of the decoder step (the LSTM's `rnn.*`, the attention, W_c, the output layer; the
    embeddings are looked up, not multiplied), the product of one step with R hypotheses,
    x W^T for x (R, in), timed dense and with torch's CSR kernel (torch.sparse.mm(W_csr, x^T)),
    float32. rows: R of greedy search (64 sentences) and of beam 5 (320). Returns one dict per
    R: the summed seconds of every matrix's product, dense and sparse, and the weights' zero fraction."""
    model = M.model_from_checkpoint(M.load_checkpoint(ckpt_path), torch.device("cpu"))
    step = {n: w.detach() for n, w in model.named_parameters()
            if w.dim() == 2 and not n.startswith("encoder") and "embed" not in n}
    zeros = sum(int((w == 0).sum()) for w in step.values()) / sum(w.numel() for w in step.values())
    out = []
    for R in rows:
        seconds = {"dense": 0.0, "sparse": 0.0}
        for w in step.values():
            with warnings.catch_warnings():      # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore")
                x, w_csr = torch.randn(R, w.size(1)), w.to_sparse_csr()
            torch.testing.assert_close(torch.sparse.mm(w_csr, x.t()).t(), x @ w.t())   # the same product
            products = {"dense": lambda: x @ w.t(), "sparse": lambda: torch.sparse.mm(w_csr, x.t())}
            for kind, product in products.items():
                product()                                               # warm-up
                t0 = time.perf_counter()
                for _ in range(repeats):
                    product()
                seconds[kind] += (time.perf_counter() - t0) / repeats
        dense, sparse = seconds["dense"], seconds["sparse"]
        out.append({"rows": R, "matrices": len(step), "zero_fraction": zeros, "dense_s": dense, "sparse_s": sparse})
        print(f"{R} rows: the decoder step's {len(step)} products, {100 * zeros:.0f}% zeros: dense "
              f"{1e6 * dense:,.0f} us, CSR sparse {1e6 * sparse:,.0f} us (sparse at {dense / sparse:.2f}x "
              "the dense speed)", flush=True)
    return out


def parse_size(text, vocab):
    """'2x500' -> the benchmark config: layers x hidden, embeddings of the hidden size."""
    layers, hidden = (int(x) for x in text.lower().split("x"))
    return M.LSTMConfig(src_vocab=vocab, tgt_vocab=vocab, emb_dim=hidden, hidden=hidden,
                        layers=layers, attention="general", input_feed=True, dropout=0.2)


def print_bounds(args):
    """--bound: `bounds` for the first of --sizes, printed (and written to --json)."""
    cfg = parse_size(args.sizes.split(",")[0], args.vocab)
    result = bounds(cfg, random_examples(args.batch_size * 8, args.vocab, seed=1),
                    random_examples(args.decode_sentences, args.vocab, seed=2), args.batch_size,
                    args.steps, args.beam)
    for name, r in result.items():
        print(f"{name}: {r['seconds']:.2f} s, of which its matrix products alone "
              f"{r['product_seconds']:.2f} s ({100 / r['bound']:.0f}%, {2 * r['product_macs'] / 1e9:.1f} GFLOP): "
              f"nothing doing these products runs more than {r['bound']:.2f}x faster", flush=True)
    if args.json:
        runs.write_json(result, args.json)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2x500,4x1000", help="comma-separated LAYERSxHIDDEN LSTM sizes")
    p.add_argument("--vocab", type=int, default=500, help="source and target vocabulary size")
    p.add_argument("--batch-size", type=int, default=64, help="training sentences per batch")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (after 3 warm-up steps)")
    p.add_argument("--decode-sentences", type=int, default=200, help="sentences decoded per measurement")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam-search measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-train", action="store_true", help="measure decoding only")
    p.add_argument("--int8", action="store_true", help="also decode with int8 weights (translate.py --int8)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--memory", metavar="PRESET", default=None,
                   help="instead: peak memory of one training step of this LSTM preset (lstm.py)")
    p.add_argument("--memory-batches", default="64,128", help="with --memory: comma-separated batch sizes")
    p.add_argument("--memory-vocab", type=int, default=50000, help="with --memory: vocabulary size")
    p.add_argument("--device", default="auto", help="with --memory: auto, cpu or cuda")
    p.add_argument("--sparse", metavar="CKPT", default=None,
                   help="instead: a pruned checkpoint's decoder products, dense against sparse (CSR)")
    p.add_argument("--bound", action="store_true", help="instead: for the first of --sizes, the share of "
                   "training and decoding time spent in matrix products, and so the highest possible speed-up")
    args = p.parse_args(argv)
    runs.set_cpu(args.threads)
    if args.sparse:
        rows = sparse_vs_dense(args.sparse)
        if args.json:
            runs.write_json(rows, args.json)
        return rows
    if args.bound:
        return print_bounds(args)
    if args.memory:
        rows = step_memory(args.memory, [int(b) for b in args.memory_batches.split(",")],
                           vocab=args.memory_vocab, device=M.pick_device(args.device))
        if args.json:
            runs.write_json(rows, args.json)
        return rows

    peak = matmul_gflops()
    train_set = random_examples(args.batch_size * 8, args.vocab, seed=1)
    decode_set = random_examples(args.decode_sentences, args.vocab, seed=2)
    rows = []
    for size in args.sizes.split(","):
        cfg = parse_size(size, args.vocab)
        row = {"size": size, "params": M.count_params(M.Seq2Seq(cfg))}
        if not args.skip_train:
            row.update(bench_train(cfg, train_set, args.batch_size, args.steps))
            mean_tgt = round(sum(len(t) + 1 for _, t in train_set) / len(train_set))    # + EOS
            row["shapes_gflops"] = shapes_gflops(decoder_product_shapes(cfg, args.batch_size, mean_tgt))
        for int8 in [False, True] if args.int8 else [False]:
            tag = "_int8" if int8 else ""
            row[f"greedy{tag}_words_s"] = bench_decode(cfg, decode_set, 1, int8=int8)
            row[f"beam{args.beam}{tag}_words_s"] = bench_decode(cfg, decode_set, args.beam, int8=int8)
        rows.append(row)
        print(f"{size}: " + ", ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v:,}"
                                      for k, v in row.items() if k != "size"), flush=True)
    print_table(rows, args, peak)
    if args.json:
        runs.write_json({"matmul_gflops": peak, "threads": torch.get_num_threads(), "rows": rows}, args.json)
    return rows


def print_table(rows, args, peak):
    """The Markdown table of main's rows, and the ratios between its columns."""
    print(f"\nmachine: {runs.cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; plain {2048}x{2048} matmul: {peak:.0f} GFLOP/s\n")
    beam_key = f"beam{args.beam}_words_s"
    print(f"| LSTM | params | train tgt tok/s | train GFLOP/s | greedy src words/s | beam {args.beam} src words/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        train = (f"{r['train_tok_s']:,.0f} | {r['train_gflops']:.0f} ({100 * r['train_gflops'] / peak:.0f}% of "
                 f"matmul, {100 * r['train_gflops'] / r['shapes_gflops']:.0f}% of its shapes' products)"
                 if "train_tok_s" in r else "- | -")
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}m | {train} | {r['greedy_words_s']:,.0f} | {r[beam_key]:,.0f} |")
    by_size = {r["size"]: r for r in rows}
    if "2x500" in by_size and "4x1000" in by_size:
        ratio = by_size["2x500"]["greedy_words_s"] / by_size["4x1000"][beam_key]
        print(f"\ngreedy 2x500 vs beam-{args.beam} 4x1000: {ratio:.1f}x faster (Kim & Rush 2016, Table 2: 8.1x on CPU)")
        if args.int8:
            ratio = by_size["2x500"]["greedy_int8_words_s"] / by_size["4x1000"][beam_key]
            print(f"greedy 2x500 int8 vs beam-{args.beam} 4x1000 float32: {ratio:.1f}x faster")
    for r in rows:
        print(f"{r['size']}: beam {args.beam} is {r['greedy_words_s'] / r[beam_key]:.1f}x slower than greedy")
        if args.int8:
            print(f"{r['size']}: int8 is {r['greedy_int8_words_s'] / r['greedy_words_s']:.1f}x float32 greedy, "
                  f"{r[f'beam{args.beam}_int8_words_s'] / r[beam_key]:.1f}x beam {args.beam}")


if __name__ == "__main__":
    main()
