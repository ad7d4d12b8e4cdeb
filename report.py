"""Reports on a model: the columns of Kim & Rush (2016), Table 1, and an attention heat map;
whether one system's BLEU differs from another's (paired bootstrap). translate.py --report and
--show-attention print them; the searches and scores are beam.py's.
"""
import math
import time

import torch
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from beam import bleu, decode_ids, model_device, pad_sources, score_pairs
from data import BOS, UserError
from model import count_params, eval_mode


def table1_report(model, src_vocab, tgt_vocab, src_lines, ref_lines, beam=5, batch_size=64,
                  max_len_a=2.0, max_len_b=10, length_norm=False, tokenize="13a"):
    """The columns of Kim & Rush (2016), Table 1, for one model on a test set.

      bleu_greedy, bleu_beam   corpus BLEU of greedy and beam-K output
      chrf_greedy, chrf_beam   their corpus chrF (sacrebleu's CHRF, character 6-grams, β = 2)
      ppl                      perplexity on the references: exp(- Σ score(ref) / Σ |ref|),
                               |ref| counting EOS (token-mean NLL, as in training)
      p_greedy, p_beam         p(t = ŷ): the probability the model gives its own output,
                               mean over sentences of exp(score(ŷ)) (teacher-forced, incl. EOS);
                               the paper's measure of how peaked the distribution is
      words_per_s_*            source words per second of each search
      hyps_greedy, hyps_beam   the outputs, and refs the references, for significance tests
    Pairs with an empty side are left out. Returns a dict (JSON-ready)."""
    pairs = [(s, r) for s, r in zip(src_lines, ref_lines) if s.strip() and r.strip()]
    if not pairs:
        raise UserError("the report needs at least one line pair with both sides non-empty")
    src_seqs = [src_vocab.encode(s) for s, _ in pairs]
    refs = [r for _, r in pairs]
    ref_seqs = [tgt_vocab.encode(r) for r in refs]
    src_words = sum(len(s.split()) for s, _ in pairs)

    ref_scores = score_pairs(model, src_seqs, ref_seqs, batch_size)
    ppl = math.exp(-sum(ref_scores) / sum(len(r) + 1 for r in ref_seqs))   # +1: EOS
    report = {"sentences": len(pairs), "src_words": src_words, "params": count_params(model),
              "beam": beam, "ppl": ppl, "refs": refs}
    for name, k in (("greedy", 1), ("beam", beam)):
        t0 = time.perf_counter()
        results = decode_ids(model, src_seqs, beam=k, batch_size=batch_size, max_len_a=max_len_a,
                             max_len_b=max_len_b, length_norm=length_norm)
        seconds = time.perf_counter() - t0
        hyp_seqs = [entries[0][0] for entries in results]
        hyps = [tgt_vocab.decode(h) for h in hyp_seqs]
        result, chrf = bleu(hyps, refs, tokenize), CHRF()
        own_scores = score_pairs(model, src_seqs, hyp_seqs, batch_size)
        report[f"bleu_{name}"] = result.score
        report[f"chrf_{name}"] = chrf.corpus_score(hyps, [refs]).score
        report[f"hyps_{name}"] = hyps
        report[f"p_{name}"] = sum(math.exp(s) for s in own_scores) / len(own_scores)  # p(t = ŷ)
        report[f"words_per_s_{name}"] = src_words / max(seconds, 1e-9)
    report["bleu_signature"], report["chrf_signature"] = result.signature, str(chrf.get_signature())
    return report


def format_report(report):
    """The report as a small Markdown table plus perplexity, parameters and BLEU signature."""
    lines = ["| search | BLEU | chrF | p(t = ŷ) | src words/s |", "|---|---:|---:|---:|---:|"]
    for label, key in [("greedy", "greedy"), (f"beam {report['beam']}", "beam")]:
        lines.append(f"| {label} | {report[f'bleu_{key}']:.2f} | {report.get(f'chrf_{key}', math.nan):.2f} "
                     f"| {100 * report[f'p_{key}']:.2f}% "
                     f"| {report[f'words_per_s_{key}']:.0f} |")
    lines.append(f"perplexity on the references: {report['ppl']:.2f}   "
                 f"parameters: {report['params']:,}   sentences: {report['sentences']}")
    lines.append(f"BLEU signature: {report['bleu_signature']}")
    if "chrf_signature" in report:
        lines.append(f"chrF signature: {report['chrf_signature']}")
    return "\n".join(lines)


SHADES = " ░▒▓█"   # attention weight 0 .. 1 in five steps of 0.25 (rounded)


def heatmap(weights, src_tokens, tgt_tokens, max_label=12):
    """Attention as text: source tokens across (written downwards as column headers, two characters
    a column), target tokens down, one shade per weight (' ' < 0.125 <= '░' < 0.375 <= '▒' < 0.625
    <= '▓' < 0.875 <= '█'). weights: (T, S) tensor, row t = attention while producing target token t."""
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
    with torch.no_grad(), eval_mode(model):
        _, attn = model(src, src_mask, tgt_in)                # (1, T, S)
    return attn[0].float().cpu()


def show_attention(model, src_vocab, tgt_vocab, line, beam=1, max_len_a=2.0, max_len_b=10,
                   length_norm=False):
    """Translate one line and return its translation and attention heat map as text."""
    src_ids = src_vocab.encode(line)
    if not src_ids:
        raise UserError("--show-attention: that source line is empty; choose another line")
    hyp = decode_ids(model, [src_ids], beam=beam, max_len_a=max_len_a, max_len_b=max_len_b,
                     length_norm=length_norm)[0][0][0]       # the best entry's tokens
    weights = attention_of(model, src_ids, hyp)
    return (f"source: {line.strip()}\ntranslation: {tgt_vocab.decode(hyp)}\n"
            + heatmap(weights, src_vocab.tokens(src_ids), tgt_vocab.tokens(hyp) + ["</s>"]))


def paired_bootstrap(baseline, system, refs, tokenize="13a", samples=1000):
    """Is `system`'s corpus BLEU different from `baseline`'s on the same sentences? sacrebleu's
    paired bootstrap resampling (Koehn 2004; Moses' bootstrap-hypothesis-difference-significance):
    draw `samples` test sets of the same size with replacement, score both systems on each, and
    count how often the resampled difference |Δ| (centred on its mean) exceeds the real one.
    Two-sided; sacrebleu's fixed seed (12345, or $SACREBLEU_SEED). Returns (system BLEU, baseline
    BLEU, p-value). Identical outputs give p = 1 (sacrebleu would return 1 / (samples + 1): zero
    differences, none above the real zero)."""
    base_score = bleu(baseline, refs, tokenize).score
    if list(baseline) == list(system):
        return base_score, base_score, 1.0
    test = PairedTest([("baseline", list(baseline)), ("system", list(system))], {"BLEU": BLEU(tokenize=tokenize)},
                      [refs], test_type="bs", n_samples=samples)
    _, scores = test()
    result = scores["BLEU"][1]
    return result.score, base_score, result.p_value
