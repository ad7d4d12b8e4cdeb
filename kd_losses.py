"""
Training losses for knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

Read top to bottom:
  1. NLL             the ordinary word-level loss, token-normalised over non-padding positions
  2. Word-KD         the student matches the teacher's next-word distribution (section 3.1)
  3. Seq-Inter       choose, from the teacher's K-best list, the hypothesis closest to the reference (3.3)
  4. Attention-relation losses (MiniLM / MiniEnD): relation_kd_loss, parse_relation_terms,
                     RELATION_RECIPES (for the T5-like model)

Seq-KD itself (section 3.2) needs no loss: it is plain NLL on the teacher's beam output, so it
lives in beam.py (generate the data) and train.py (train on it with --train-tgt).

Conventions (see data.py): logits are (B, T, V) over the target vocabulary, `target` is tgt_out,
(B, T) = [y1 .. yn EOS] padded with PAD. The mask is `target != pad` (True = real token); padding
positions contribute nothing to any loss and are not counted in the token normalisation.
All log-probabilities are computed in float32, whatever the dtype of the logits (bf16 autocast).
"""
import functools

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

from data import PAD


# ---------------------------------------------------------------------------------------------
# 1. NLL (negative log-likelihood), the baseline loss
# ---------------------------------------------------------------------------------------------

def nll_sum(logits, target, pad=PAD):
    """Summed NLL over the real (non-pad) target positions.

        L_NLL = - sum_t log p(y_t | y_<t, x)            (Kim & Rush 2016, section 2)

    logits: (B, T, V) float (any dtype; log_softmax runs in float32)
    target: (B, T) long, PAD-padded; positions with target == pad are skipped.
    Returns (loss_sum: 0-dim float32 tensor, ntokens: int). Perplexity over a corpus is
    exp(sum of loss_sum / sum of ntokens).
    """
    _check_shapes(logits, target)
    mask = target != pad                                        # (B, T) True = real token
    logp = F.log_softmax(logits[mask].float(), dim=-1)          # (N, V) the N real positions only
    logp_gold = logp.gather(-1, target[mask].unsqueeze(-1))     # (N, 1) log p(y_t | y_<t, x)
    return -logp_gold.sum(), int(mask.sum())


def nll_loss(logits, target, pad=PAD):
    """Token-mean NLL: nll_sum / number of non-pad target tokens. Shapes as nll_sum.

    A batch with no real token gives 0 (not NaN).
    """
    loss_sum, ntokens = nll_sum(logits, target, pad)
    return loss_sum / max(ntokens, 1)


# ---------------------------------------------------------------------------------------------
# 2. Word-level knowledge distillation (Word-KD)
# ---------------------------------------------------------------------------------------------

def word_kd_sum(student_logits, teacher_logits, target, T=1.0, pad=PAD):
    """Summed word-level KD term over the real target positions.

    Both models are teacher-forced on the same (gold, or Seq-KD) prefix. With
    q = softmax(teacher_logits / T) (the teacher's soft targets, no gradient) and
    p = softmax(student_logits / T):

        L_WORD-KD = - sum_t sum_k q(y_t = k | y_<t, x) log p(y_t = k | y_<t, x)   (Kim & Rush 2016, section 3.1)

    multiplied by T^2 when T != 1 (Hinton et al. 2015): the gradient of the soft cross-entropy
    shrinks like 1/T^2, so the factor keeps its size comparable to the NLL term for any T.

    This is the CROSS-ENTROPY form, as the paper writes it. It equals KL(q || p) + H(q): the
    teacher's entropy H(q) does not depend on the student, so the gradient is that of the KL
    divergence, but the reported value includes H(q). Hence a student identical to the teacher
    has a NONZERO loss (the teacher's entropy) and a ZERO gradient.

    student_logits: (B, T, V) with gradient; teacher_logits: (B, T, V), detached here;
    target: (B, T) long, only used for its mask (target != pad, True = real token).
    Returns (kd_sum: 0-dim float32 tensor, ntokens: int).
    """
    _check_shapes(student_logits, target)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: Word-KD needs the same target vocabulary")
    mask = target != pad                                                    # (B, T) True = real token
    q = F.softmax(teacher_logits[mask].detach().float() / T, dim=-1)       # (N, V) soft targets, real positions
    logp = F.log_softmax(student_logits[mask].float() / T, dim=-1)         # (N, V)
    cross_entropy = -(q * logp).sum(-1)                                     # (N,)  L_WORD-KD, the inner sum over k
    kd_sum = cross_entropy.sum() * (T * T)                                  # Hinton et al.: scale by T^2
    return kd_sum, int(mask.sum())


def word_kd_loss(student_logits, teacher_logits, target, alpha=0.5, T=1.0, pad=PAD):
    """Token-mean Word-KD training loss, interpolated with NLL on the target:

        L = alpha * L_WORD-KD + (1 - alpha) * L_NLL                (Kim & Rush 2016, section 3.1)

    Each term is summed over the real target positions and divided by their number, so with
    alpha = 0 this is exactly nll_loss. L_WORD-KD is the cross-entropy form (includes the teacher
    entropy, see word_kd_sum) and is scaled by T^2 when T != 1; L_NLL always uses T = 1 (the true
    distribution). The paper uses alpha = 0.5, T = 1.

    student_logits, teacher_logits: (B, T, V); target: (B, T) long, PAD-padded (True = target != pad).
    Returns a 0-dim float32 tensor. The teacher gets no gradient.
    """
    kd_sum, ntokens = word_kd_sum(student_logits, teacher_logits, target, T=T, pad=pad)
    nll, _ = nll_sum(student_logits, target, pad)
    return (alpha * kd_sum + (1.0 - alpha) * nll) / max(ntokens, 1)


def _check_shapes(logits, target):
    if logits.dim() != 3 or target.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and target (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")


# ---------------------------------------------------------------------------------------------
# 3. Seq-Inter: pick the teacher hypothesis closest to the reference
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sentence_bleu_metric(tokenize, smooth_method):
    return BLEU(tokenize=tokenize, smooth_method=smooth_method, effective_order=True)


def sentence_bleu(hyp, ref, tokenize="13a", smooth_method="exp"):
    """Smoothed sentence-level BLEU (0..100) of one hypothesis against one reference (sacrebleu)."""
    return _sentence_bleu_metric(tokenize, smooth_method).sentence_score(hyp, [ref]).score


def select_seq_inter(hyps, ref, tokenize="13a", smooth_method="exp"):
    """Index of the K-best entry closest to the reference (Kim & Rush 2016, section 3.3, Seq-Inter):

        y~ = argmax_{s in K-best(x)} sim(y, s)

    with sim = smoothed sentence-level BLEU, computed by sacrebleu exactly like
    `sacrebleu.sentence_bleu(hyp, [ref])`: effective order (n-gram orders longer than the
    hypothesis are left out, so short sentences are not zeroed) and smooth_method='exp'
    (Chen & Cherry 2014, "NIST geometric" smoothing: the k-th n-gram order with no match counts
    as 1 / 2^k matches). We choose 'exp' because it is sacrebleu's default for sentence BLEU, so
    anyone can recompute the score with the command-line sacrebleu; a hypothesis that shares no
    unigram with the reference scores 0.

    hyps: the K-best list, best first (strings; an empty translation is ""). ref: the reference.
    tokenize: sacrebleu tokenizer ("13a" for raw text, "none" for pre-tokenized corpora).
    Ties go to the earlier (higher-ranked by the teacher) hypothesis. Returns an int index.
    """
    if len(hyps) == 0:
        raise ValueError("select_seq_inter: empty K-best list")
    best_index, best_bleu = 0, sentence_bleu(hyps[0], ref, tokenize, smooth_method)
    for i in range(1, len(hyps)):
        b = sentence_bleu(hyps[i], ref, tokenize, smooth_method)
        if b > best_bleu:                       # strictly greater: ties keep the earlier entry
            best_index, best_bleu = i, b
    return best_index


# ---------------------------------------------------------------------------------------------
# 4. Attention-relation losses (MiniLM / MiniEnD)
# ---------------------------------------------------------------------------------------------
#
# Instead of (or besides) the output distribution, the student learns how the teacher's
# attention relates the positions of a sentence to each other. For two sets of vectors a and b
# of one attention layer (its queries and its queries, say), with all heads concatenated,
# (N, T, heads * d_kv), and the width re-split into R "relation heads" a_r, b_r of width d_r:
#
#     Reln(a, b)_r = softmax(a_r b_r^T / sqrt(d_r))        a (T_a, d_r) x b (T_b, d_r) -> (T_a, T_b)
#     L = KL(Reln_teacher || Reln_student), per row, averaged over relation heads and real rows
#
# Because both models are re-split into the same R relation heads, a teacher and a student with
# different widths and head counts can be compared; R must divide both inner widths.
# (N is the batch size in this section: b is taken.)
#
# What the papers did.
#   MiniLM (Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
#     Compression of Pre-Trained Transformers") distils the LAST self-attention layer of a BERT
#     teacher into the last layer of the student: the attention distributions softmax(QK^T/sqrt d)
#     per head (so the head counts must match) and the value relation softmax(VV^T/sqrt d), both
#     with KL(teacher || student).
#   MiniLMv2 (Wang et al., Findings of ACL 2021, "MiniLMv2: Multi-Head Self-Attention Relation
#     Distillation for Compressing Pretrained Transformers") uses the relations Q-Q, K-K and V-V
#     and the concatenate-and-re-split relation heads above, which frees the student's head
#     count; for large teachers it takes an upper-middle teacher layer rather than the last.
#   MiniEnD (Zhang, Yang, Li, Wang & Song, LREC-COLING 2024, "Task-agnostic Distillation of
#     Encoder-Decoder Language Models") reports that existing task-agnostic methods can fail on
#     encoder-decoder models such as T5, and distils them task-agnostically (then fine-tunes).
#     As this project's issue describes the variants: decoder self-attention relations plus
#     logit KD, with either the cross-attention relations (MiniEnD-D here) or the encoder's
#     self-attention relations (MiniEnD-E here). The authors' code release holds only a README:
#     no code, so the exact loss definitions, masks, relation-head counts, layer pairing and
#     loss weights cannot be checked; the recipes below are our reading.
#
# Our choices (not from the papers): the two cross-attention terms are the decoder queries
# against the encoder-side keys of the cross-attention (a T x S relation; with R = heads it is
# the cross-attention distribution itself, but for the 1/sqrt(d_r) that T5 leaves out) and the
# relation of the cross-attention values with themselves (S x S, encoder side); decoder
# relations are causal; every term of a recipe has weight 1; the same layer index
# (default -1: last to last, as MiniLM) is used in the encoder and in the decoder; KL is averaged
# over relation heads and over the real query rows of the whole batch (token-weighted, like
# the NLL); relations are computed in float32 outside autocast; the "logit" term is Word-KD with
# alpha = 1 (the soft cross-entropy at temperature T, section 2), so its value includes the
# teacher's entropy while the relation terms are 0 for a student equal to the teacher.

import math  # noqa: E402  (this section's own imports)

from data import UserError  # noqa: E402

# name: (attention, first set, second set). Rows are the first set's positions, keys the second's.
RELATION_TERMS = {
    "enc-qq": ("enc_self", "q", "q"),     # S x S  encoder self-attention
    "enc-kk": ("enc_self", "k", "k"),
    "enc-vv": ("enc_self", "v", "v"),
    "dec-qq": ("dec_self", "q", "q"),     # T x T  decoder self-attention, causal
    "dec-kk": ("dec_self", "k", "k"),
    "dec-vv": ("dec_self", "v", "v"),
    "cross-qk": ("cross", "q", "k"),      # T x S  decoder queries against encoder-side keys
    "cross-vv": ("cross", "v", "v"),      # S x S  cross-attention values (encoder side)
}
OUTPUT_TERMS = ("logit", "nll")           # Word-KD soft cross-entropy (alpha = 1), plain NLL

RELATION_RECIPES = {
    "minilm": ("enc-qq", "enc-kk", "enc-vv"),
    "miniend-d": ("logit", "dec-qq", "dec-kk", "dec-vv", "cross-qk", "cross-vv"),
    "miniend-e": ("logit", "dec-qq", "dec-kk", "dec-vv", "enc-qq", "enc-kk", "enc-vv"),
}


def parse_relation_terms(spec):
    """--relation-terms text -> {term: weight}.

    Comma-separated items, read left to right: a recipe name adds its terms with weight 1; a
    term name adds that term with weight 1; term=W sets its weight (W = 0 removes it).
        "miniend-d"               logit + dec-qq/kk/vv + cross-qk/vv
        "miniend-d,logit=0"       the same without the logit term
        "minilm,nll"              MiniLM's relations plus NLL on the training targets
        "miniend-e,nll=0.5,logit=0.5"   MiniEnD-E with Kim & Rush's Word-KD mixture (alpha 0.5)
    """
    known = ", ".join([*RELATION_RECIPES, *RELATION_TERMS, *OUTPUT_TERMS])
    terms = {}
    for item in spec.split(","):
        name, has_weight, weight = (s.strip() for s in item.strip().lower().partition("="))
        if name in RELATION_RECIPES and not has_weight:
            terms.update({term: 1.0 for term in RELATION_RECIPES[name]})
            continue
        if name not in RELATION_TERMS and name not in OUTPUT_TERMS:
            raise UserError(f"--relation-terms: unknown term {item.strip()!r} (known: {known}; "
                            "a recipe takes no weight)")
        try:
            w = float(weight) if has_weight else 1.0
        except ValueError:
            w = float("nan")
        if not 0.0 <= w < float("inf"):
            raise UserError(f"--relation-terms: bad weight in {item.strip()!r}: give a number >= 0")
        terms[name] = w
    terms = {name: w for name, w in terms.items() if w > 0}
    if not terms:
        raise UserError(f"--relation-terms {spec!r}: no term with a positive weight")
    return terms


def check_relation_heads(relation_heads, teacher_width, student_width):
    """UserError unless R divides both inner attention widths (heads * d_kv)."""
    if relation_heads < 1 or teacher_width % relation_heads or student_width % relation_heads:
        raise UserError(f"--relation-heads {relation_heads} must divide the inner attention width "
                        f"(heads x d_kv) of both models: the teacher's is {teacher_width}, the "
                        f"student's {student_width}; use a divisor of "
                        f"{math.gcd(teacher_width, student_width)}")


def check_relation_setup(terms, relation_heads, student_cfg, teacher_cfg,
                         student_layer=-1, teacher_layer=-1):
    """Check once, before training, what relation_kd_loss would find out at the first batch:
    both models are T5-like, R divides both inner widths, the chosen layers exist."""
    if not any(name in RELATION_TERMS for name in terms):
        return
    for who, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        if not hasattr(cfg, "d_kv"):
            raise UserError(f"relation terms need a T5-like {who} (--arch t5): the LSTM has no "
                            "attention queries, keys and values")
    check_relation_heads(relation_heads, teacher_cfg.heads * teacher_cfg.d_kv,
                         student_cfg.heads * student_cfg.d_kv)
    for who, cfg, index in (("student", student_cfg, student_layer),
                            ("teacher", teacher_cfg, teacher_layer)):
        _check_layer(index, cfg.layers, who, "encoder")
        _check_layer(index, cfg.dec_layers or cfg.layers, who, "decoder")


def _check_layer(index, n_layers, who, stack):
    if not -n_layers <= index < n_layers:
        raise UserError(f"--relation-{who}-layer {index}: the {who} has {n_layers} {stack} layers "
                        f"(give 0 .. {n_layers - 1}, or -1 for the last)")


def relation(a, b, relation_heads, allowed):
    """Reln(a, b)_r = softmax(a_r b_r^T / sqrt(d_r)) for each relation head r (MiniLMv2), as
    float32 log-probabilities.

    a: (N, heads, T_a, d_kv), b: (N, heads, T_b, d_kv): two sets of per-head vectors of one
    attention layer. The heads are concatenated, (N, T, W) with W = heads * d_kv, and W is
    re-split into R = relation_heads pieces of d_r = W / R.
    allowed: bool, broadcastable to (N, R, T_a, T_b), True where row i may relate to key j.
    Returns (N, R, T_a, T_b); a key that is not allowed gets probability 0.
    """
    with torch.autocast(a.device.type, enabled=False):
        N, heads, T_a, d_kv = a.shape
        T_b, W = b.size(2), heads * d_kv
        d_r = W // relation_heads
        # concatenate the heads, then re-split the width into R relation heads
        a = a.float().transpose(1, 2).reshape(N, T_a, W)              # (N, T_a, W)
        b = b.float().transpose(1, 2).reshape(N, T_b, W)              # (N, T_b, W)
        a = a.view(N, T_a, relation_heads, d_r).transpose(1, 2)       # (N, R, T_a, d_r)
        b = b.view(N, T_b, relation_heads, d_r).transpose(1, 2)       # (N, R, T_b, d_r)
        scores = a @ b.transpose(-1, -2) / math.sqrt(d_r)             # (N, R, T_a, T_b)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)


def relation_kl(teacher_logp, student_logp, allowed, row_mask):
    """KL(teacher || student) summed over keys, averaged over relation heads and real rows.

    teacher_logp, student_logp: (N, R, T_a, T_b) from `relation`; allowed: as for `relation`;
    row_mask: (N, T_a) True = real row. Returns a 0-dim float32 tensor (0 if no real row).
    """
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - student_logp)).masked_fill(~allowed, 0.0).sum(-1)  # (N, R, T_a)
    kl = kl.mean(1)                                                   # (N, T_a): mean over R
    kl = torch.where(row_mask, kl, 0.0)                               # padded rows count nothing
    return kl.sum() / row_mask.sum().clamp(min=1)


def relation_term_loss(name, student_qkv, teacher_qkv, relation_heads, student_layer=-1,
                       teacher_layer=-1):
    """One relation term (a key of RELATION_TERMS), from a teacher layer to a student layer.

    student_qkv, teacher_qkv: the dicts T5Model.forward(..., return_qkv=True) returns for the
    same batch (each q/k/v (N, heads, len, d_kv); "src_mask" (N, S) and "tgt_mask" (N, T),
    True = real token). The teacher gets no gradient. Returns a 0-dim float32 tensor.
    """
    kind, first, second = RELATION_TERMS[name]
    stack = "encoder" if kind == "enc_self" else "decoder"
    _check_layer(student_layer, len(student_qkv[kind]), "student", stack)
    _check_layer(teacher_layer, len(teacher_qkv[kind]), "teacher", stack)
    s, t = student_qkv[kind][student_layer], teacher_qkv[kind][teacher_layer]
    check_relation_heads(relation_heads, t[first].size(1) * t[first].size(3),
                         s[first].size(1) * s[first].size(3))
    for which in (first, second):
        if t[which].shape[0] != s[which].shape[0] or t[which].shape[2] != s[which].shape[2]:
            raise ValueError(f"{name}: teacher {tuple(t[which].shape)} and student "
                             f"{tuple(s[which].shape)} {which} come from different batches")

    def positions(which):    # the mask of the positions a set of vectors lives on
        on_target = kind == "dec_self" or (kind == "cross" and which == "q")
        return student_qkv["tgt_mask" if on_target else "src_mask"]

    row_mask, key_mask = positions(first), positions(second)         # (N, T_a), (N, T_b)
    allowed = key_mask[:, None, None, :]                              # (N, 1, 1, T_b)
    if kind == "dec_self":                                            # no looking at the future
        T = key_mask.size(1)
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=key_mask.device).tril()
    teacher_logp = relation(t[first].detach(), t[second].detach(), relation_heads, allowed)
    student_logp = relation(s[first], s[second], relation_heads, allowed)
    return relation_kl(teacher_logp, student_logp, allowed, row_mask)


def relation_kd_loss(student_qkv, teacher_qkv, terms, relation_heads, student_layer=-1,
                     teacher_layer=-1, student_logits=None, teacher_logits=None, target=None,
                     T=1.0, pad=PAD):
    """The distillation loss of MiniLM / MiniEnD: a weighted sum of terms,

        L = sum_term weight_term * L_term

    terms: {name: weight} from parse_relation_terms (names: RELATION_TERMS, "logit", "nll").
    student_qkv, teacher_qkv: from model(src, src_mask, tgt_in, return_qkv=True) on one batch
        (the teacher's under torch.no_grad()); see relation_term_loss.
    relation_heads: R, a divisor of both models' heads * d_kv.
    student_layer, teacher_layer: which layer of each stack to relate (default: the last).
    student_logits, teacher_logits (N, T, V) and target (N, T) = tgt_out: needed by "logit"
        (word_kd_loss with alpha = 1 at temperature T) and "nll" (nll_loss).
    Returns (loss: 0-dim float32 tensor, parts: {name: the term's unweighted value, detached}).
    """
    loss, parts = 0.0, {}
    for name, weight in terms.items():
        if name in OUTPUT_TERMS and (student_logits is None or target is None
                                     or (name == "logit" and teacher_logits is None)):
            raise ValueError(f"the {name!r} term needs student_logits, target"
                             f"{' and teacher_logits' if name == 'logit' else ''}")
        if name == "logit":
            value = word_kd_loss(student_logits, teacher_logits, target, alpha=1.0, T=T, pad=pad)
        elif name == "nll":
            value = nll_loss(student_logits, target, pad=pad)
        else:
            value = relation_term_loss(name, student_qkv, teacher_qkv, relation_heads,
                                       student_layer, teacher_layer)
        loss = loss + weight * value
        parts[name] = value.detach()
    return loss, parts
