"""Decoding: greedy search, batched beam search, scoring, BLEU, and the beam.py command line.

Scoring convention (used everywhere in this file)
-------------------------------------------------
* What is summed: the score of an output y = y_1 .. y_n </s> is the raw sum of the model's
  log-probabilities of every generated token, INCLUDING the final end-of-sentence token:

      score(y) = Σ_{t=1..n+1} log p(y_t | y_<t, x)          (float32 log_softmax)

  This is what the reference seq2seq-attn code of Kim & Rush (2016) ranks by (no length
  normalisation), and it is the default here.
* What the length counts: the generated tokens including </s>, so |y| = n + 1. With
  `length_norm=True` (`--length-norm`) hypotheses are ranked by score(y) / |y|, and that
  normalised value is the score returned.
* Maximum length: max_len = floor(max_len_a * src_len + max_len_b) generated tokens, per
  sentence (src_len = real source tokens). A hypothesis still open after max_len steps is closed
  as it is ("forced"): it has max_len tokens, no </s>, and its score sums those tokens only.
* When search stops, for each sentence of a batch:
    - it has collected `beam` finished hypotheses (each step keeps the K best extensions of the
      live hypotheses; those that end in </s> are set aside and never extended again, and the
      next step refills the beam from the remaining live ones), or
    - without length normalisation, its nbest-th best finished score is >= the best live score:
      log-probabilities are <= 0, so a live hypothesis can only lose score and can no longer
      enter the n-best list (with nbest=1 this is the reference code's rule "stop when the top
      of the beam ends in </s>"), or
    - it reached max_len (see above).
  Greedy search is beam search with K = 1: it stops at </s> or max_len, and gives the same
  tokens and scores as beam_search(beam=1).

Read top to bottom:
  1. Searches          greedy, beam_search (one model.step per time step for the whole batch)
  2. Scoring           score: log p(y|x) by teacher forcing; score_pairs
  3. Corpus helpers    decode_ids, translate (sort by length, batch, restore order), bleu
  4. Files             translate_file: line-aligned output, n-best lists, Seq-Inter selection,
                       --shard I/N, resume after an interrupt (distillation data for Seq-KD);
                       under torchrun, one shard per process, joined in order by process 0
  5. Reports           table1_report (Kim & Rush 2016, Table 1 columns), attention heat map
  6. Command line      python beam.py --ckpt model.pt --src FILE [--ref FILE] [--out FILE] ...

Tensors are batch-first; src (B, S) is PAD-padded and src_mask (B, S) is boolean with
True = real token. Token lists (hypotheses, n-best entries) never contain BOS or EOS.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time

import torch
from sacrebleu.metrics import BLEU
from tqdm import tqdm

import data
from data import BOS, EOS, PAD, UserError
from model import count_params, load_checkpoint, model_from_checkpoint, pick_device

# ---------------------------------------------------------------------------------------------
# 1. Searches
# ---------------------------------------------------------------------------------------------


def max_lengths(src_mask, max_len_a, max_len_b):
    """(B,) maximum number of generated tokens per sentence: floor(a * src_len + b), at least 1.
    (Computed in float64 with a tiny epsilon so that e.g. 1.2 * 5 + 0 gives 6, not 5.)"""
    src_len = src_mask.sum(1).double()
    return (max_len_a * src_len + max_len_b + 1e-6).floor().long().clamp(min=1)


@torch.no_grad()
def greedy(model, src, src_mask, max_len_a=2.0, max_len_b=10):
    """Greedy search: at each step take the most probable next token.

    src, src_mask: (B, S), mask True = real token (every sentence needs >= 1 real token).
    Returns
      hyps:   list of B token lists, without EOS
      scores: (B,) float32, the sum of log p of every generated token incl. EOS (see the top)
      attn:   list of B tensors (len, S_b): attention of each generated token (incl. EOS) over
              the sentence's S_b real source tokens
    """
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
        best_logp, word = logp.max(dim=1)                           # (B,), (B,)
        scores += best_logp.masked_fill(ended, 0.0)                 # score(y) = Σ_t log p(y_t|..)
        word = word.masked_fill(ended, PAD)
        lengths += (~ended).long()
        words.append(word)
        attns.append(attn)
        ended |= (word == EOS) | (max_len <= t)
        if ended.all():
            break
        prev = word
    words = torch.stack(words, 1).tolist()                          # (B, T)
    attns = torch.stack(attns, 1)                                   # (B, T, S)
    src_len = src_mask.sum(1).tolist()
    hyps, attn_list = [], []
    for b, n in enumerate(lengths.tolist()):
        tokens = words[b][:n]
        hyps.append(tokens[:-1] if tokens and tokens[-1] == EOS else tokens)
        attn_list.append(attns[b, :n, :src_len[b]].cpu())
    return hyps, scores, attn_list


@torch.no_grad()
def beam_search(model, src, src_mask, beam=5, nbest=1, max_len_a=2.0, max_len_b=10,
                length_norm=False):
    """Batched beam search: all sentences and all their beams advance in ONE model.step per step.

    src, src_mask: (B, S), mask True = real token (every sentence needs >= 1 real token).
    Returns, per sentence, a list of at most `nbest` (tokens without EOS, score), best first.
    The score is score(y), or score(y) / |y| with length_norm (see the top of the file).

    Layout: the K beams of sentence b are rows b*K .. b*K+K-1 of the decoder state; `scores`
    (n, K) holds their running scores, -inf for a slot that holds no live hypothesis. Sentences
    that are done are dropped from the batch, so `n` (active sentences) shrinks over time.
    """
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
    n_finished = torch.zeros(B, dtype=torch.long, device=device)
    nth_best = torch.full((B,), float("-inf"), device=device)   # nbest-th best finished score

    for t in range(1, int(max_len.max()) + 1):
        logp, _, state = model.step(prev, state)                    # (n*K, V)
        n, V = scores.size(0), logp.size(1)
        # score(y_1..t) = score(y_1..t-1) + log p(y_t | y_<t, x), for every (beam, word) pair
        candidates = (scores.view(n * K, 1) + logp).view(n, K * V)  # (n, K*V)
        top, index = candidates.topk(K, dim=1)                      # (n, K) best K per sentence
        origin, word = index // V, index % V                        # beam each extends, its word
        rows = (torch.arange(n, device=device).unsqueeze(1) * K + origin).view(-1)  # (n*K,)
        tokens = torch.cat([tokens[rows], word.view(-1, 1)], dim=1)  # (n*K, t)
        state = model.reorder(state, rows)
        prev = word.view(-1)

        # Hypotheses that end here: they produced EOS, or hit their sentence's max length.
        alive = top > float("-inf")
        ends = alive & ((word == EOS) | (max_len[sent] <= t).unsqueeze(1))   # (n, K)
        if ends.any():
            where = ends.nonzero()                      # (m, 2): (active sentence, beam slot)
            sents = sent[where[:, 0]].tolist()
            seqs = tokens[where[:, 0] * K + where[:, 1]].tolist()
            for b, seq, s in zip(sents, seqs, top[ends].tolist()):   # store finished hyps
                length = len(seq)                       # generated tokens, incl. EOS if any
                rank = s / length if length_norm else s
                finished[b].append((rank, seq[:-1] if seq[-1] == EOS else seq))
                finished[b].sort(key=lambda entry: -entry[0])
                n_finished[b] = len(finished[b])
                if len(finished[b]) >= nbest:
                    nth_best[b] = finished[b][nbest - 1][0]
        scores = top.masked_fill(ends, float("-inf"))   # finished: held aside, not extended

        # Which sentences are done (see the stopping rules at the top of the file).
        done = (n_finished[sent] >= K) | (max_len[sent] <= t)
        if not length_norm:
            done |= nth_best[sent] >= scores.max(dim=1).values
        if done.any():                                  # drop done sentences from the batch
            keep = (~done).nonzero().squeeze(1)         # (n',)
            if keep.numel() == 0:
                break
            keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            sent, scores = sent[keep], scores[keep]
            tokens, prev = tokens[keep_rows], prev[keep_rows]
            state = model.reorder(state, keep_rows)

    return [[(seq, rank) for rank, seq in hyps[:nbest]] for hyps in finished]


# ---------------------------------------------------------------------------------------------
# 2. Scoring a given target: log p(y | x) by teacher forcing
# ---------------------------------------------------------------------------------------------


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
    for idxs in length_sorted_batches([len(s) for s in src_seqs], batch_size):
        batch = data.collate(examples, idxs).to(device)
        for i, s in zip(idxs, score(model, batch).tolist()):
            out[i] = s
    return out


# ---------------------------------------------------------------------------------------------
# 3. Corpus helpers: batching, translate, BLEU
# ---------------------------------------------------------------------------------------------


def model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def length_sorted_batches(lengths, batch_size):
    """Indices grouped into batches of similar length (longest first): less padding, so faster."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_sources(seqs, device):
    """list of B token lists -> src (B, S) long PAD-padded, src_mask (B, S) bool (True = real)."""
    S = max(len(s) for s in seqs)
    src = torch.full((len(seqs), S), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    src = src.to(device)
    return src, src != PAD


def decode_ids(model, src_seqs, beam=1, nbest=1, batch_size=64, max_len_a=2.0, max_len_b=10,
               length_norm=False, progress=None):
    """Decode a list of source token lists in batches of similar length; results in input order.

    Returns per sentence a list of (tokens, score), best first (one entry for greedy, beam == 1).
    An empty source gives [([], 0.0)] without running the model. `progress`: a tqdm bar or None.
    """
    if beam == 1 and nbest != 1:
        raise ValueError("an n-best list needs beam > 1")
    was_training = model.training
    model.eval()
    device = model_device(model)
    results = [[([], 0.0)] for _ in src_seqs]
    todo = [i for i, s in enumerate(src_seqs) if len(s) > 0]
    for batch in length_sorted_batches([len(src_seqs[i]) for i in todo], batch_size):
        idxs = [todo[j] for j in batch]
        src, src_mask = pad_sources([src_seqs[i] for i in idxs], device)
        if beam == 1:
            hyps, scores, _ = greedy(model, src, src_mask, max_len_a, max_len_b)
            out = [[(h, s)] for h, s in zip(hyps, scores.tolist())]
        else:
            out = beam_search(model, src, src_mask, beam, nbest, max_len_a, max_len_b, length_norm)
        for i, entries in zip(idxs, out):
            results[i] = entries
        if progress is not None:
            progress.update(len(idxs))
    if progress is not None:
        progress.update(len(src_seqs) - len(todo))     # empty lines are done too
    model.train(was_training)
    return results


def translate(model, src_vocab, tgt_vocab, lines, beam=1, nbest=1, batch_size=64,
              max_len_a=2.0, max_len_b=10, length_norm=False, progress=None):
    """Translate text lines, in their order. nbest == 1: list of strings; nbest > 1: per line a
    list of (string, score), best first. An empty line translates to ""."""
    src_seqs = [src_vocab.encode(line) for line in lines]
    results = decode_ids(model, src_seqs, beam=beam, nbest=nbest, batch_size=batch_size,
                         max_len_a=max_len_a, max_len_b=max_len_b, length_norm=length_norm,
                         progress=progress)
    if nbest == 1:
        return [tgt_vocab.decode(entries[0][0]) for entries in results]
    return [[(tgt_vocab.decode(ids), s) for ids, s in entries] for entries in results]


def bleu(hyps, refs, tokenize="13a"):
    """Corpus BLEU with sacrebleu. Returns its BLEUScore, with `.signature` (a string) added;
    `result.format(signature=result.signature)` gives the usual one-line report.
    tokenize="none" for pre-tokenized corpora (then it equals tokenized BLEU, the paper's
    metric); "13a" (sacrebleu's default) for raw text."""
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(hyps, [refs])
    result.signature = str(metric.get_signature())
    return result


# ---------------------------------------------------------------------------------------------
# 4. Files: line-aligned output, n-best lists, Seq-Inter, shards, resume
# ---------------------------------------------------------------------------------------------


def parse_shard(text):
    """'I/N' -> (I, N) with 1 <= I <= N: shard I of N takes the I-th contiguous block of lines."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise UserError(f"--shard {text}: write I/N with 1 <= I <= N, e.g. --shard 1/4 ... 4/4")
    return i, n


def shard_range(num_lines, i, n):
    """Lines [start, end) of shard i of n (1-based): contiguous, so `cat` of the parts in order
    gives the unsharded output."""
    return (i - 1) * num_lines // n, i * num_lines // n


def output_lines(index, entries, tgt_vocab, nbest, select_ref=None, tokenize="13a"):
    """The output line(s) for one source sentence.

    index: the sentence's 0-based line number in the whole --src file; entries: its (tokens,
    score) list, best first. Three formats:
      select_ref given (Seq-Inter): the entry closest to that reference by smoothed sentence
        BLEU (kd_losses.select_seq_inter), one line
      nbest > 1: one line per entry, `index ||| translation ||| score` (Moses n-best format)
      otherwise: the best translation, one line (possibly empty)
    """
    texts = [tgt_vocab.decode(ids) for ids, _ in entries]
    if select_ref is not None:
        import kd_losses  # only Seq-Inter needs it
        return [texts[kd_losses.select_seq_inter(texts, select_ref, tokenize=tokenize)]]
    if nbest > 1:
        return [f"{index} ||| {text} ||| {s:.4f}" for text, (_, s) in zip(texts, entries)]
    return [texts[0]]


def _resume_point(partial, record, settings):
    """How many sentences an earlier, interrupted run with the same settings has finished."""
    if not (os.path.exists(partial) and os.path.exists(record)):
        return 0
    with open(record, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                         if settings.get(k) != saved.get("settings", {}).get(k))
        raise UserError(f"{partial} is from an interrupted run with other settings "
                        f"({', '.join(changed)}): rerun with the same flags to resume, or "
                        f"delete {partial} and {record} to start again")
    os.truncate(partial, saved["bytes"])   # drop lines written after the last record
    return saved["done"]


def _write_json_atomic(obj, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def translate_file(model, src_vocab, tgt_vocab, lines, out_path=None, *, beam=5, nbest=1,
                   refs=None, select=False, tokenize="13a", shard=(1, 1), chunk_size=1000,
                   batch_size=64, max_len_a=2.0, max_len_b=10, length_norm=False,
                   run_info=None, progress=True):
    """Translate `lines` (a whole --src file) to out_path, or to stdout when out_path is None.

    This is how Seq-KD data is made (Kim & Rush 2016, sec. 3.2): translate the training source
    with the teacher's beam and train the student on the output. The output is line-aligned
    with the input (an empty source or an empty translation is an empty line, never skipped),
    except n-best lists (nbest > 1 without select), which have up to nbest lines per sentence.

    select=True (Seq-Inter, sec. 3.3): from each nbest list write the entry closest to refs[i].
    shard=(I, N): translate only the I-th of N contiguous blocks of lines.
    Resume: output goes to OUT.partial in chunks of `chunk_size` sentences; after each chunk
    OUT.partial.json records how many sentences are done. A rerun with the same settings skips
    them; at the end OUT.partial becomes OUT. run_info (e.g. checkpoint and source paths) is
    stored with the settings, so a different run never continues someone else's file.
    Returns {"sentences", "src_words", "seconds"} for what this call translated, and, when
    writing to stdout, "lines": the lines written.
    """
    start, end = shard_range(len(lines), *shard)
    settings = dict(run_info or {}, lines=len(lines), shard=f"{shard[0]}/{shard[1]}", beam=beam,
                    nbest=nbest, select=f"sentence-bleu/{tokenize}" if select else None,
                    max_len_a=max_len_a, max_len_b=max_len_b, length_norm=length_norm)
    settings = json.loads(json.dumps(settings))         # the form it has when read back
    done = 0
    if out_path is None:
        sink = sys.stdout
    else:
        partial, record = out_path + ".partial", out_path + ".partial.json"
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        done = _resume_point(partial, record, settings)
        sink = open(partial, "a" if done else "w", encoding="utf-8")
        if done:
            print(f"resuming {out_path}: {done} of {end - start} sentences already done",
                  file=sys.stderr)
    bar = tqdm(total=end - start, initial=done, unit="sent", desc="translating", smoothing=0.1,
               disable=None if progress else True)
    stats = {"sentences": 0, "src_words": 0, "seconds": 0.0, "lines": []}
    t0 = time.perf_counter()
    try:
        for lo in range(start + done, end, chunk_size):
            hi = min(lo + chunk_size, end)
            src_seqs = [src_vocab.encode(line) for line in lines[lo:hi]]
            results = decode_ids(model, src_seqs, beam=beam, nbest=nbest, batch_size=batch_size,
                                 max_len_a=max_len_a, max_len_b=max_len_b,
                                 length_norm=length_norm, progress=bar)
            for i, entries in zip(range(lo, hi), results):
                ref = refs[i] if select else None
                for text in output_lines(i, entries, tgt_vocab, nbest, ref, tokenize):
                    sink.write(text + "\n")
                    if out_path is None:
                        stats["lines"].append(text)
            stats["sentences"] += hi - lo
            stats["src_words"] += sum(len(line.split()) for line in lines[lo:hi])
            if out_path is not None:                     # commit the chunk, then record it
                sink.flush()
                os.fsync(sink.fileno())
                _write_json_atomic({"settings": settings, "done": hi - start,
                                    "bytes": sink.tell()}, record)
    finally:
        bar.close()
        if out_path is not None:
            sink.close()
    stats["seconds"] = time.perf_counter() - t0
    if out_path is not None:
        os.replace(partial, out_path)
        os.remove(record)
    return stats


def first_best(out_lines, nbest):
    """The 1-best translation per sentence from translate_file's output lines."""
    if nbest == 1:
        return out_lines
    best = {}
    for line in out_lines:
        index, rest = line.split(" ||| ", 1)
        best.setdefault(int(index), rest.rsplit(" ||| ", 1)[0])
    return [best[i] for i in sorted(best)]


# Under torchrun with N processes, `beam.py ... --out F` is `--shard 1/N` .. `--shard N/N` plus
# `cat`, in one command: process r translates shard r+1 of N into its own part file
# F.shard<r+1>of<N> (resumable like any --out file), then process 0 joins the parts in order.
# Inside a shard, translate_file goes through --chunk-size blocks of lines, and decode_ids sorts
# each block by source length for batching and puts the output back in input order.


def join_torchrun():
    """(rank, world_size) when torchrun started this process with WORLD_SIZE > 1, else None.
    Joins the process group with the gloo backend, whatever the device: the processes exchange
    only a barrier. The timeout is long because one shard may take hours to translate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return torch.distributed.get_rank(), world


def shard_part(out_path, i, n):
    """The file shard i of n (1-based) is written to under torchrun."""
    return f"{out_path}.shard{i}of{n}"


def join_parts(out_path, n):
    """After every process has written its part (a barrier), process 0 concatenates the parts
    in shard order into out_path and deletes them: the shards are contiguous blocks of lines,
    so the result is the unsharded output, line for line."""
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        parts = [shard_part(out_path, i, n) for i in range(1, n + 1)]
        with open(out_path + ".tmp", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        os.replace(out_path + ".tmp", out_path)
        for part in parts:
            os.remove(part)
    torch.distributed.barrier()      # no process ends before the joined file exists


# ---------------------------------------------------------------------------------------------
# 5. Reports: Kim & Rush (2016) Table 1 columns, and the attention heat map
# ---------------------------------------------------------------------------------------------


def table1_report(model, src_vocab, tgt_vocab, src_lines, ref_lines, beam=5, batch_size=64,
                  max_len_a=2.0, max_len_b=10, length_norm=False, tokenize="13a"):
    """The columns of Kim & Rush (2016), Table 1, for one model on a test set.

      bleu_greedy, bleu_beam   corpus BLEU of greedy and beam-K output
      ppl                      perplexity on the references: exp(- Σ score(ref) / Σ |ref|),
                               |ref| counting EOS (token-mean NLL, as in training)
      p_greedy, p_beam         p(t = ŷ): the probability the model gives its own output,
                               mean over sentences of exp(score(ŷ)) (teacher-forced, incl. EOS);
                               the paper's measure of how peaked the distribution is
      words_per_s_*            source words per second of each search
    Pairs with an empty side are left out. Returns a dict (JSON-ready).
    """
    pairs = [(s, r) for s, r in zip(src_lines, ref_lines) if s.strip() and r.strip()]
    if not pairs:
        raise UserError("the report needs at least one line pair with both sides non-empty")
    src_seqs = [src_vocab.encode(s) for s, _ in pairs]
    refs = [r for _, r in pairs]
    ref_seqs = [tgt_vocab.encode(r) for r in refs]
    src_words = sum(len(s.split()) for s, _ in pairs)

    was_training = model.training
    model.eval()
    ref_scores = score_pairs(model, src_seqs, ref_seqs, batch_size)
    ppl = math.exp(-sum(ref_scores) / sum(len(r) + 1 for r in ref_seqs))   # +1: EOS
    report = {"sentences": len(pairs), "src_words": src_words, "params": count_params(model),
              "beam": beam, "ppl": ppl}
    for name, k in (("greedy", 1), ("beam", beam)):
        t0 = time.perf_counter()
        results = decode_ids(model, src_seqs, beam=k, batch_size=batch_size, max_len_a=max_len_a,
                             max_len_b=max_len_b, length_norm=length_norm)
        seconds = time.perf_counter() - t0
        hyp_seqs = [entries[0][0] for entries in results]
        result = bleu([tgt_vocab.decode(h) for h in hyp_seqs], refs, tokenize)
        own_scores = score_pairs(model, src_seqs, hyp_seqs, batch_size)
        report[f"bleu_{name}"] = result.score
        report[f"p_{name}"] = sum(math.exp(s) for s in own_scores) / len(own_scores)  # p(t = ŷ)
        report[f"words_per_s_{name}"] = src_words / max(seconds, 1e-9)
    report["bleu_signature"] = result.signature
    model.train(was_training)
    return report


def format_report(report):
    """The report as a small Markdown table plus perplexity, parameters and BLEU signature."""
    rows = [("greedy", "greedy"), (f"beam {report['beam']}", "beam")]
    lines = ["| search | BLEU | p(t = ŷ) | src words/s |", "|---|---:|---:|---:|"]
    for label, key in rows:
        lines.append(f"| {label} | {report[f'bleu_{key}']:.2f} | {100 * report[f'p_{key}']:.2f}% "
                     f"| {report[f'words_per_s_{key}']:.0f} |")
    lines.append(f"perplexity on the references: {report['ppl']:.2f}   "
                 f"parameters: {report['params']:,}   sentences: {report['sentences']}")
    lines.append(f"BLEU signature: {report['bleu_signature']}")
    return "\n".join(lines)


SHADES = " ░▒▓█"   # attention weight 0 .. 1 in five steps of 0.25 (rounded)


def heatmap(weights, src_tokens, tgt_tokens, max_label=12):
    """Attention as text: source tokens across (written downwards as column headers), target
    tokens down, one shade per weight (' ' < 0.125 <= '░' < 0.375 <= '▒' < 0.625 <= '▓' < 0.875
    <= '█'). weights: (T, S) tensor, row t = attention while producing target token t.
    Each column is two characters wide. Returns the lines as one string."""
    T, S = weights.shape
    src_labels = [tok[:max_label] for tok in src_tokens]
    tgt_labels = [tok[:max_label] for tok in tgt_tokens]
    width = max(len(label) for label in tgt_labels)
    height = max(len(label) for label in src_labels)
    lines = []
    for r in range(height):                                  # column headers, one char per row
        chars = [label[r] if r < len(label) else " " for label in src_labels]
        lines.append(" " * width + " │" + "".join(c + " " for c in chars))
    lines.append("─" * width + "─┼" + "──" * S)
    for t in range(T):
        cells = "".join(SHADES[min(4, int(w * 4 + 0.5))] * 2 for w in weights[t].tolist())
        lines.append(tgt_labels[t].rjust(width) + " │" + cells)
    return "\n".join(lines)


def attention_of(model, src_ids, tgt_ids):
    """(len(tgt_ids) + 1, len(src_ids)) attention of each output token incl. EOS, by teacher
    forcing the model on the given output (model.forward returns the attention)."""
    device = model_device(model)
    src, src_mask = pad_sources([src_ids], device)
    tgt_in = torch.tensor([[BOS] + list(tgt_ids)], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, attn = model(src, src_mask, tgt_in)                # (1, T, S)
    model.train(was_training)
    return attn[0].float().cpu()


def show_attention(model, src_vocab, tgt_vocab, line, beam=1, max_len_a=2.0, max_len_b=10,
                   length_norm=False):
    """Translate one line and return its translation and attention heat map as text."""
    src_ids = src_vocab.encode(line)
    if not src_ids:
        raise UserError("--show-attention: that source line is empty; choose another line")
    results = decode_ids(model, [src_ids], beam=beam, max_len_a=max_len_a, max_len_b=max_len_b,
                         length_norm=length_norm)
    hyp = results[0][0][0]                                   # best entry's tokens
    weights = attention_of(model, src_ids, hyp)
    return (f"source: {line.strip()}\ntranslation: {tgt_vocab.decode(hyp)}\n"
            + heatmap(weights, src_vocab.tokens(src_ids), tgt_vocab.tokens(hyp) + ["</s>"]))


# ---------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Translate a file with a seqkd checkpoint (greedy or beam search), score it "
                    "with BLEU,\nmake Seq-KD / Seq-Inter distillation data, or report the "
                    "Kim & Rush Table 1 columns.",
        epilog="examples:\n"
               "  translate and score:  python beam.py --ckpt best.pt --src test.en --ref test.de --out test.hyp\n"
               "  Seq-KD data:          python beam.py --ckpt teacher.pt --src train.en --beam 5 --out train.kd.de\n"
               "    on 4 GPUs:          torchrun --nproc_per_node 4 beam.py ... --out train.kd.de (one shard each)\n"
               "                        (or --shard 1/4 ... 4/4 with --out part1 ... part4, then cat part1 .. part4)\n"
               "  Seq-Inter data:       python beam.py --ckpt teacher.pt --src train.en --ref train.de \\\n"
               "                          --beam 35 --nbest 35 --select sentence-bleu --out train.inter.de\n"
               "  Table 1 columns:      python beam.py --ckpt best.pt --src test.en --ref test.de --report --json r.json\n"
               "  attention heat map:   python beam.py --ckpt best.pt --src test.en --show-attention 3")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (holds the vocabularies)")
    p.add_argument("--src", required=True, help="source text, one sentence per line")
    p.add_argument("--ref", help="reference translations, line-aligned with --src: prints BLEU")
    p.add_argument("--out", help="output file (default: stdout). Written as OUT.partial in chunks; "
                                 "an interrupted run resumes when rerun with the same flags")
    p.add_argument("--beam", type=int, default=5, help="beam size K; 1 = greedy search (default 5)")
    p.add_argument("--nbest", type=int, default=1,
                   help="write the K best per sentence as 'line ||| translation ||| score' "
                        "(line 0-based); needs --beam >= K")
    p.add_argument("--select", choices=["sentence-bleu"],
                   help="Seq-Inter: with --nbest K and --ref, write per line the n-best entry "
                        "with the highest smoothed sentence BLEU against the reference")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--length-norm", action="store_true",
                   help="rank hypotheses by score / length (default: raw sum of log-probs, as "
                        "the reference seq2seq-attn code)")
    p.add_argument("--max-len-a", type=float, default=2.0,
                   help="max output length = a * source length + b (default a=2.0)")
    p.add_argument("--max-len-b", type=int, default=10, help="see --max-len-a (default b=10)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--bleu-tokenize", help="sacrebleu tokenizer: 13a for raw text, none for "
                                           "pre-tokenized text (default: the one training used, else 13a)")
    p.add_argument("--shard", default="1/1",
                   help="I/N: translate only the I-th of N contiguous blocks of lines; "
                        "`cat` the N outputs in order to join them (under torchrun with N "
                        "processes this is automatic: process r takes shard r+1 of N)")
    p.add_argument("--chunk-size", type=int, default=1000,
                   help="sentences per resumable chunk of --out (default 1000)")
    p.add_argument("--show-attention", type=int, metavar="N",
                   help="translate line N of --src (1 = first) and print its attention heat map")
    p.add_argument("--report", action="store_true",
                   help="with --ref: BLEU greedy and beam, perplexity on the references and "
                        "p(t = ŷ) (Kim & Rush 2016, Table 1)")
    p.add_argument("--json", help="with --report: also write the report to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args):
    """Flag combinations that cannot work -> UserError naming the flag and the fix."""
    for name in ("beam", "nbest", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.nbest > args.beam:
        raise UserError(f"--nbest {args.nbest} needs --beam {args.nbest} or more (now {args.beam})")
    if args.select and (args.ref is None or args.nbest < 2):
        raise UserError("--select sentence-bleu needs --ref FILE and --nbest K (K >= 2)")
    if args.report and args.ref is None:
        raise UserError("--report needs --ref FILE (the references of --src)")
    if args.report and (args.out or args.nbest > 1 or args.select):
        raise UserError("--report prints a report: leave out --out, --nbest and --select")
    if args.json and not args.report:
        raise UserError("--json writes the --report: add --report")
    if args.bleu_tokenize is not None:
        try:
            BLEU(tokenize=args.bleu_tokenize)
        except Exception:
            raise UserError(f"--bleu-tokenize {args.bleu_tokenize}: not a sacrebleu tokenizer; use "
                            "13a (raw text), none (pre-tokenized), intl, char, zh ...") from None
    if args.max_len_a < 0:
        raise UserError(f"--max-len-a {args.max_len_a}: must be >= 0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:        # started by torchrun
        if args.out is None or args.report or args.show_attention is not None:
            raise UserError("under torchrun beam.py only makes files: give --out FILE (and no "
                            "--report / --show-attention, which run in one process)")
        if args.shard != "1/1":
            raise UserError(f"--shard {args.shard}: under torchrun each process takes one shard "
                            "already; leave out --shard")
    return parse_shard(args.shard)


def run(args):
    shard = check_args(args)
    ranks = join_torchrun()                  # (rank, world size) under torchrun, else None
    device = pick_device(args.device)
    if ranks and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a GPU per process
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, device)
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(ckpt)
    lines = data.read_lines(args.src)
    refs = None
    if args.ref:
        refs = data.read_lines(args.ref)
        if len(refs) != len(lines):
            raise UserError(f"--ref {args.ref} has {len(refs)} lines but --src {args.src} has "
                            f"{len(lines)}: give line-aligned files")
    tokenize = args.bleu_tokenize or (ckpt.get("args") or {}).get("bleu_tokenize") or "13a"
    search = dict(max_len_a=args.max_len_a, max_len_b=args.max_len_b, length_norm=args.length_norm)

    if args.show_attention is not None:
        if not 1 <= args.show_attention <= len(lines):
            raise UserError(f"--show-attention {args.show_attention}: --src has lines 1 to {len(lines)}")
        print(show_attention(model, src_vocab, tgt_vocab, lines[args.show_attention - 1],
                             args.beam, **search))
        return None

    if args.report:
        report = table1_report(model, src_vocab, tgt_vocab, lines, refs, args.beam,
                               args.batch_size, tokenize=tokenize, **search)
        report.update(ckpt=args.ckpt, src=args.src, ref=args.ref)
        print(format_report(report))
        if args.json:
            _write_json_atomic(report, args.json)
        return report

    log = sys.stderr if args.out is None else sys.stdout      # keep stdout for translations
    run_info = {"ckpt": os.path.abspath(args.ckpt), "src": os.path.abspath(args.src)}
    out_path, show_progress = args.out, not args.no_progress
    if ranks:                                # this process: shard rank+1 of N, to its own part
        shard = (ranks[0] + 1, ranks[1])
        out_path = shard_part(args.out, *shard)
        show_progress = show_progress and ranks[0] == 0     # one progress bar: process 0's
    stats = translate_file(model, src_vocab, tgt_vocab, lines, out_path, beam=args.beam,
                           nbest=args.nbest, refs=refs, select=bool(args.select),
                           tokenize=tokenize, shard=shard, chunk_size=args.chunk_size,
                           batch_size=args.batch_size, run_info=run_info,
                           progress=show_progress, **search)
    if stats["sentences"]:
        print(f"translated {stats['sentences']} sentences, {stats['src_words']} source words in "
              f"{stats['seconds']:.1f}s: {stats['src_words'] / max(stats['seconds'], 1e-9):.0f} "
              f"source words/s ({device}, beam {args.beam}"
              + (f", shard {shard[0]}/{shard[1]})" if ranks else ")"), file=log)
    if ranks:
        join_parts(args.out, ranks[1])
        torch.distributed.destroy_process_group()
        if ranks[0] != 0:
            return stats
        shard = (1, 1)                       # the joined file holds every line
    if refs is not None:
        start, end = shard_range(len(lines), *shard)
        if args.out is None:
            out_lines = stats["lines"]
        else:
            with open(args.out, encoding="utf-8") as f:
                out_lines = [line.rstrip("\n") for line in f]
        hyps = first_best(out_lines, 1 if args.select else args.nbest)   # select: 1 per line
        result = bleu(hyps, refs[start:end], tokenize)
        note = " (Seq-Inter picked each line with the reference: not a test score)" if args.select else ""
        print(result.format(signature=result.signature) + note, file=log)
        return result
    return stats


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted" + (": rerun the same command to resume" if args.out else ""))


if __name__ == "__main__":
    main()
