"""Decoding: greedy search, batched beam search, scoring log p(y|x), and BLEU over a corpus.

Scoring convention (every search and score here; translate.py and report.py use them)
-------------------------------------------------------------------------------------
* What is summed: the score of an output y = y_1 .. y_n </s> is the raw sum of the model's
  log-probabilities of every generated token, INCLUDING the final end-of-sentence token:

      score(y) = Σ_{t=1..n+1} log p(y_t | y_<t, x)          (float32 log_softmax)

  This is what the reference seq2seq-attn code of Kim & Rush (2016) ranks by (no length
  normalisation), and it is the default here. It equals the teacher-forced score of y
  (`score`), so a search score and a scored pair always agree.
* What may be generated: every word and </s>; never <pad> or <s> (they are not words: their
  log-probabilities are set to -inf before each choice, as seq2seq-attn and fairseq do).
* What the length counts: the generated tokens including </s>, so |y| = n + 1. With
  `length_norm=True` (`--length-norm`) hypotheses are ranked by score(y) / |y|, and that
  normalised value is the score returned (by greedy search too).
* Maximum length: max_len = floor(max_len_a * src_len + max_len_b) generated tokens, per
  sentence (src_len = real source tokens), </s> included. At step max_len only </s> may be
  generated, so every output ends with </s> and its log-probability is counted.
* Each beam step keeps the K best extensions of the live hypotheses; those that end in </s>
  are set aside (finished) and never extended again, and the next step refills the beam from
  the live ones. A sentence stops when no live hypothesis can still enter its n-best list:
    - raw scores: its nbest-th best finished score is >= the best live score. Log-probabilities
      are <= 0, so a live hypothesis can only lose score (with nbest = 1 this is seq2seq-attn's
      "stop when the top of the beam ends in </s>");
    - length_norm: its nbest-th best finished score is >= best live score / max_len: a live
      hypothesis of score s <= 0 ends with some length L <= max_len and a score <= s, so its
      normalised score is at most s / L <= s / max_len;
    - or no hypothesis is live (at the latest after max_len steps).
  So, apart from the K-best cut of each step, the search makes no error: a beam wide enough to
  hold every live prefix returns the exact n-best list.
* Greedy search is beam search with K = 1, written on its own because it is simpler and
  faster: it stops at </s> (or max_len) and gives the same tokens and scores as
  beam_search(beam=1), ties included (both choose with the same topk on the same sums).
  Log-probabilities are assumed finite: a model that gives </s> probability 0 at max_len has
  no finished hypothesis there.

Read top to bottom: 1. searches, 2. scoring by teacher forcing, 3. corpus helpers (batching by
length, translate, bleu). translate.py is the command line; report.py, the Table 1 report.

Tensors are batch-first; src (B, S) is PAD-padded and src_mask (B, S) is boolean with
True = real token. Token lists (hypotheses, n-best entries) never contain BOS or EOS.
"""
import shlex
import sys

import torch
from sacrebleu.metrics import BLEU

import data
from data import BOS, EOS, PAD
from model import eval_mode


# 1. Searches ---------------------------------------------------------------------------------

def max_lengths(src_mask, max_len_a, max_len_b):
    """(B,) maximum number of generated tokens per sentence: floor(a * src_len + b), at least 1.
    (Computed in float64 with a tiny epsilon so that e.g. 1.2 * 5 + 0 gives 6, not 5.)"""
    src_len = src_mask.sum(1).double()
    return (max_len_a * src_len + max_len_b + 1e-6).floor().long().clamp(min=1)


def allowed_logp(logp, last):
    """The log-probabilities a search chooses from: logp (R, V) with <pad> and <s> set to -inf
    in every row, and every token but </s> set to -inf in the rows of `last` (R,) bool, the
    hypotheses at their sentence's max_len (see the top of the file). Changes logp in place."""
    logp[:, PAD] = float("-inf")
    logp[:, BOS] = float("-inf")
    if last.any():      # on most steps no row is at its max_len, and the write is slow (7-18% of a search)
        logp[last, :EOS] = float("-inf")
        logp[last, EOS + 1:] = float("-inf")
    return logp


@torch.no_grad()
def greedy(model, src, src_mask, max_len_a=2.0, max_len_b=10, length_norm=False):
    """Greedy search: at each step take the most probable next token.

    src, src_mask: (B, S), mask True = real token (every sentence needs >= 1 real token).
    Returns
      hyps:   list of B token lists, without EOS
      scores: (B,) float32, the sum of log p of every generated token incl. EOS (see the top),
              divided by the number of generated tokens with length_norm
      attn:   list of B tensors (len, S_b): attention of each generated token (incl. EOS) over
              the sentence's S_b real source tokens"""
    B = src.size(0)
    max_len = max_lengths(src_mask, max_len_a, max_len_b)           # (B,)
    state = model.start(src, src_mask)
    prev = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    scores = torch.zeros(B, device=src.device)
    lengths = torch.zeros(B, dtype=torch.long, device=src.device)  # generated tokens incl. EOS
    ended = torch.zeros(B, dtype=torch.bool, device=src.device)
    words, attns = [], []
    for t in range(1, int(max_len.max()) + 1):
        logp, attn, state = model.step(prev, state)                 # (B, V), (B, S)
        logp = allowed_logp(logp, max_len == t)
        # score(y_1..t) = score(y_1..t-1) + log p(y_t | ..): the best sum, chosen as beam_search does
        best, word = (scores.unsqueeze(1) + logp).topk(1, dim=1)    # (B, 1), (B, 1)
        scores = torch.where(ended, scores, best.squeeze(1))
        word = word.squeeze(1).masked_fill(ended, PAD)
        lengths += (~ended).long()
        words.append(word)
        attns.append(attn)
        ended |= word == EOS
        if ended.all():
            break
        prev = word
    words = torch.stack(words, 1).tolist()                          # (B, T)
    attns = torch.stack(attns, 1)                                   # (B, T, S)
    src_len = src_mask.sum(1).tolist()
    hyps = [words[b][:n - 1] for b, n in enumerate(lengths.tolist())]   # without EOS
    attn_list = [attns[b, :n, :src_len[b]].cpu() for b, n in enumerate(lengths.tolist())]
    return hyps, scores / lengths if length_norm else scores, attn_list


def reorder_beams(model, state, rows):
    """model.reorder after a beam step, whose `rows` stay inside each sentence's block of K rows.
    The state entries that depend only on the source (model.source_state: the encoder's output,
    attention keys, the mask) are equal in the K rows of a sentence, so they stay as they are and
    only the hypotheses' own entries are copied."""
    fixed = {k: state[k] for k in model.source_state}
    return {**model.reorder({k: v for k, v in state.items() if k not in fixed}, rows), **fixed}


@torch.no_grad()
def beam_search(model, src, src_mask, beam=5, nbest=1, max_len_a=2.0, max_len_b=10,
                length_norm=False):
    """Batched beam search: all sentences and all their beams advance in ONE model.step per step.

    src, src_mask: (B, S), mask True = real token (every sentence needs >= 1 real token).
    Returns, per sentence, a list of at most `nbest` (tokens without EOS, score), best first.
    The score is score(y), or score(y) / |y| with length_norm (see the top of the file).

    Layout: the K beams of sentence b are rows b*K .. b*K+K-1 of the decoder state; `scores`
    (n, K) holds their running scores, -inf for a slot that holds no live hypothesis. Sentences
    that are done are dropped from the batch, so `n` (active sentences) shrinks over time."""
    if nbest > beam:
        raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({beam})")
    device, K = src.device, beam
    B = src.size(0)
    max_len = max_lengths(src_mask, max_len_a, max_len_b)           # (B,)
    state = model.start(src, src_mask)
    state = model.reorder(state, torch.arange(B, device=device).repeat_interleave(K))  # B*K rows

    # One live hypothesis (the empty one) per sentence at the start; the other K-1 slots are
    # empty, otherwise the first step would propose the same word K times.
    scores = torch.full((B, K), float("-inf"), device=device)       # (n, K)
    scores[:, 0] = 0.0
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=device)  # (n*K, t) history
    prev = torch.full((B * K,), BOS, dtype=torch.long, device=device)
    sent = torch.arange(B, device=device)        # active row block i -> original sentence sent[i]
    finished = [[] for _ in range(B)]            # per sentence: (rank score, tokens)
    nth_best = torch.full((B,), float("-inf"), device=device)   # nbest-th best finished score

    for t in range(1, int(max_len.max()) + 1):
        logp, _, state = model.step(prev, state)                    # (n*K, V)
        n, V = scores.size(0), logp.size(1)
        logp = allowed_logp(logp, (max_len[sent] == t).repeat_interleave(K))
        # score(y_1..t) = score(y_1..t-1) + log p(y_t | y_<t, x), for every (beam, word) pair
        candidates = (scores.view(n * K, 1) + logp).view(n, K * V)  # (n, K*V)
        top, index = candidates.topk(K, dim=1)                      # (n, K) best K per sentence
        origin, word = index // V, index % V                        # beam each extends, its word
        rows = (torch.arange(n, device=device).unsqueeze(1) * K + origin).view(-1)  # (n*K,)
        tokens = torch.cat([tokens[rows], word.view(-1, 1)], dim=1)  # (n*K, t)
        state = reorder_beams(model, state, rows)
        prev = word.view(-1)

        ends = (top > float("-inf")) & (word == EOS)                # (n, K) finished here
        if ends.any():
            where = ends.nonzero()                      # (m, 2): (active sentence, beam slot)
            sents = sent[where[:, 0]].tolist()
            seqs = tokens[where[:, 0] * K + where[:, 1]].tolist()
            for b, seq, s in zip(sents, seqs, top[ends].tolist()):   # store finished hyps
                finished[b].append((s / len(seq) if length_norm else s, seq[:-1]))
                finished[b].sort(key=lambda entry: -entry[0])
                if len(finished[b]) >= nbest:
                    nth_best[b] = finished[b][nbest - 1][0]
        scores = top.masked_fill(ends, float("-inf"))   # finished: held aside, not extended

        # Done: no live hypothesis can still enter the n-best list (see the top of the file).
        best_live = scores.max(dim=1).values                        # (n,), -inf when none is live
        bound = best_live / max_len[sent] if length_norm else best_live
        done = (best_live == float("-inf")) | (nth_best[sent] >= bound)
        if done.any():                                  # drop done sentences from the batch
            keep = (~done).nonzero().squeeze(1)         # (n',)
            if keep.numel() == 0:
                break
            keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            sent, scores = sent[keep], scores[keep]
            tokens, prev = tokens[keep_rows], prev[keep_rows]
            state = model.reorder(state, keep_rows)

    return [[(seq, rank) for rank, seq in hyps[:nbest]] for hyps in finished]


# 2. Scoring a given target: log p(y | x) by teacher forcing ----------------------------------

@torch.no_grad()
def score(model, batch):
    """(B,) float32: score(y) = Σ_t log p(y_t | y_<t, x) over [y1 .. yn EOS] (teacher forcing).

    batch: anything with .src, .src_mask (B, S) and .tgt_in, .tgt_out (B, T) (a data.Batch);
    positions where tgt_out == PAD contribute nothing. Put the model in eval mode first."""
    logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)          # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(2, batch.tgt_out.unsqueeze(2)).squeeze(2)  # (B, T)
    return token_logp.masked_fill(batch.tgt_out == PAD, 0.0).sum(dim=1)


def score_pairs(model, src_seqs, tgt_seqs, batch_size=64):
    """score(y) for lists of token-id lists (no BOS/EOS): list of floats, in the given order.
    Sources must be non-empty."""
    device = model_device(model)
    examples = list(zip(src_seqs, tgt_seqs))
    out = [0.0] * len(examples)
    with eval_mode(model):
        for idxs in length_sorted_batches([len(s) for s in src_seqs], batch_size):
            batch = data.collate(examples, idxs).to(device)
            for i, s in zip(idxs, score(model, batch).tolist()):
                out[i] = s
    return out


# 3. Corpus helpers: batching, translate, BLEU ------------------------------------------------

def model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def length_sorted_batches(lengths, batch_size):
    """Indices grouped into batches of similar length (longest first): less padding, so faster."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_sources(seqs, device):
    """list of B token lists -> src (B, S) long PAD-padded, src_mask (B, S) bool (True = real)."""
    src = data.pad(seqs).to(device)
    return src, src != PAD


def decode_ids(model, src_seqs, beam=1, nbest=1, batch_size=64, max_len_a=2.0, max_len_b=10,
               length_norm=False, progress=None):
    """Decode source token lists in batches of similar length. Returns, in input order, per sentence
    a list of (tokens, score), best first (one entry for greedy, beam == 1). An empty source gives
    [([], 0.0)] without running the model. `progress`: None, or anything with update(n) (a tqdm bar,
    runs.ProgressLines), told the sentences done after each batch."""
    if beam == 1 and nbest != 1:
        raise ValueError("an n-best list needs beam > 1")
    device = model_device(model)
    results = [[([], 0.0)] for _ in src_seqs]
    todo = [i for i, s in enumerate(src_seqs) if len(s) > 0]
    with eval_mode(model):
        for batch in length_sorted_batches([len(src_seqs[i]) for i in todo], batch_size):
            idxs = [todo[j] for j in batch]
            src, src_mask = pad_sources([src_seqs[i] for i in idxs], device)
            if beam == 1:
                hyps, scores, _ = greedy(model, src, src_mask, max_len_a, max_len_b, length_norm)
                out = [[(h, s)] for h, s in zip(hyps, scores.tolist())]
            else:
                out = beam_search(model, src, src_mask, beam, nbest, max_len_a, max_len_b, length_norm)
            for i, entries in zip(idxs, out):
                results[i] = entries
            if progress is not None:
                progress.update(len(idxs))
    if progress is not None:
        progress.update(len(src_seqs) - len(todo))     # empty lines are done too
    return results


def translate(model, src_vocab, tgt_vocab, lines, beam=1, nbest=1, batch_size=64,
              max_len_a=2.0, max_len_b=10, length_norm=False, progress=None):
    """Translate text lines, in their order. nbest == 1: list of strings; nbest > 1: per line a
    list of (string, score), best first. An empty line translates to ""."""
    src_seqs = [src_vocab.encode(line) for line in lines]
    results = decode_ids(model, src_seqs, beam=beam, nbest=nbest, batch_size=batch_size, max_len_a=max_len_a,
                         max_len_b=max_len_b, length_norm=length_norm, progress=progress)
    if nbest == 1:
        return [tgt_vocab.decode(entries[0][0]) for entries in results]
    return [[(tgt_vocab.decode(ids), s) for ids, s in entries] for entries in results]


def bleu(hyps, refs, tokenize="13a"):
    """Corpus BLEU with sacrebleu: its BLEUScore with `.signature` (a string) added, so that
    `result.format(signature=result.signature)` is the usual one-line report. tokenize="none" for
    pre-tokenized corpora (then it equals tokenized BLEU, the paper's metric), "13a" for raw text."""
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(hyps, [refs])
    result.signature = str(metric.get_signature())
    return result


if __name__ == "__main__":
    argv = shlex.join(sys.argv[1:]) or "..."
    print(f"error: the translation command is now translate.py: python translate.py {argv}",
          file=sys.stderr)
    sys.exit(2)
