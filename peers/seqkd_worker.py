"""The seqkd timing worker: python peers/seqkd_worker.py JOB.json RESULT.json (run by side_by_side.py).

Builds seqkd's LSTM (lstm.Seq2Seq, as bench.parse_size configures it) from the job's config, times
full training steps on the job's batches, then greedy and beam search with beam.greedy /
beam.beam_search, each output exactly as long as its source (see ExactLength).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
import beam  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
from flags import OPTIMIZERS  # noqa: E402
import timing  # noqa: E402


def build(cfg, seed):
    """seqkd's model of the job's config, uniform init in [-init, init] (lstm.Seq2Seq does it)."""
    torch.manual_seed(seed)
    return M.Seq2Seq(M.LSTMConfig(
        src_vocab=cfg["vocab"], tgt_vocab=cfg["vocab"], emb_dim=cfg["emb_dim"], hidden=cfg["hidden"],
        layers=cfg["layers"], bidirectional=False, attention="general", input_feed=True,
        dropout=cfg["dropout"], init_range=cfg["init"]))


def train_step_fn(model, cfg):
    """One full step as bench.bench_train does it, with the loss summed over non-PAD targets."""
    model.train()
    optimizer = OPTIMIZERS["adam"](model.parameters(), lr=cfg["lr"])     # train.py's Adam

    def step(src, tgt_in, tgt_out):
        logits, _ = model(src, src != data.PAD, tgt_in)                       # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=data.PAD,
                               reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        optimizer.step()
    return step


class ExactLength:
    """seqkd's decoding interface (start / step / reorder) around a model, with </s> forbidden
    before the `length`-th generated token. With max_len_a=1, max_len_b=0 the searches force </s>
    at token `length` (beam.allowed_logp), so every output is exactly `length` tokens, </s> included."""

    def __init__(self, model, length):
        self.model, self.length, self.t = model, length, 0
        self.source_state = model.source_state

    def start(self, src, src_mask):
        self.t = 0
        return self.model.start(src, src_mask)

    def step(self, prev, state):
        self.t += 1
        logp, attn, state = self.model.step(prev, state)
        if self.t < self.length:
            logp[:, data.EOS] = float("-inf")
        return logp, attn, state

    def reorder(self, state, index):
        return self.model.reorder(state, index)


def decoder(cfg, seed):
    """beam size -> decode(src) for batches of equal-length sources -> generated tokens per sentence."""
    model = build(cfg, seed).eval()

    def make(beam_size):
        @torch.no_grad()
        def decode(src):
            forced = ExactLength(model, src.size(1))
            mask = src != data.PAD
            if beam_size == 1:
                hyps, _, _ = beam.greedy(forced, src, mask, max_len_a=1.0, max_len_b=0)
                return [len(h) + 1 for h in hyps]
            nbest = beam.beam_search(forced, src, mask, beam=beam_size, max_len_a=1.0, max_len_b=0)
            return [len(entries[0][0]) + 1 for entries in nbest]
        return decode
    return make


def main(argv):
    timing.worker_main(argv, build, train_step_fn, decoder, M.count_params, "seqkd", "working tree")


if __name__ == "__main__":
    main(sys.argv[1:])
