"""Attention-relation losses for knowledge distillation (MiniLM / MiniEnD), for the T5-like model.

Instead of (or besides) the output distribution, the student learns how the teacher's attention relates
the positions of a sentence to each other. For two sets of vectors a and b of one attention layer (its
queries and its queries, say), with all heads concatenated, (N, T, heads * d_kv), and the width re-split
into R "relation heads" a_r, b_r of width d_r:

    Reln(a, b)_r = softmax(a_r b_r^T / sqrt(d_r))        a (T_a, d_r) x b (T_b, d_r) -> (T_a, T_b)
    L = KL(Reln_teacher || Reln_student), per row, averaged over relation heads and real rows

Because both models are re-split into the same R relation heads, a teacher and a student with different
widths and head counts can be compared; R must divide both inner widths. (N is the batch size in this
file: b is taken.)

What the papers did.
  MiniLM (Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    Compression of Pre-Trained Transformers") distils the LAST self-attention layer of a BERT teacher into
    the last layer of the student: the attention distributions softmax(QK^T/sqrt d) per head (so the head
    counts must match) and the value relation softmax(VV^T/sqrt d), both with KL(teacher || student).
  MiniLMv2 (Wang et al., Findings of ACL 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation
    for Compressing Pretrained Transformers") uses the relations Q-Q, K-K and V-V and the
    concatenate-and-re-split relation heads above, which frees the student's head count; for large
    teachers it takes an upper-middle teacher layer rather than the last.
  MiniEnD (Zhang, Yang, Li, Wang & Song, LREC-COLING 2024, "Task-agnostic Distillation of Encoder-Decoder
    Language Models") reports that existing task-agnostic methods can fail on encoder-decoder models such
    as T5, and distils them task-agnostically (then fine-tunes). The variants as we take them: decoder
    self-attention relations plus logit KD, with either the cross-attention relations (MiniEnD-D here) or
    the encoder's self-attention relations (MiniEnD-E here). The authors' code release holds only a
    README: no code, so the exact loss definitions, masks, relation-head counts, layer pairing and loss
    weights cannot be checked; the recipes below are our reading.

Our choices (not from the papers): the two cross-attention terms are the decoder queries against the
encoder-side keys of the cross-attention (a T x S relation; with R = heads it is the cross-attention
distribution itself, but for the 1/sqrt(d_r) that T5 leaves out) and the relation of the cross-attention
values with themselves (S x S, encoder side); decoder relations are causal; every term of a recipe has
weight 1; the same layer index (default -1: last to last, as MiniLM) is used in the encoder and in the
decoder; KL is averaged over relation heads and over the real query rows of the whole batch
(token-weighted, like the NLL); relations are computed in float32 outside autocast; the "logit" term is
Word-KD with alpha = 1 (the soft cross-entropy at temperature T, kd_losses.word_kd_sum), so its value
includes the teacher's entropy while the relation terms are 0 for a student equal to the teacher.
"""
import math

import torch
import torch.nn.functional as F

import kd_losses  # (kd_losses imports this module too: both import the module, not names)
from data import PAD, UserError

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
        "miniend-e,nll=0.5,logit=0.5"   MiniEnD-E with Kim & Rush's Word-KD mixture (alpha 0.5)"""
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


def encoder_only(terms):
    """True when every term is a relation of the encoder's self-attention (MiniLM): the loss then needs
    neither model's decoder nor output layer, and T5Model.forward(..., encoder_only=True) skips them."""
    return all(name in RELATION_TERMS and RELATION_TERMS[name][0] == "enc_self" for name in terms)


def check_relation_heads(relation_heads, teacher_width, student_width):
    """UserError unless R divides both inner attention widths (heads * d_kv)."""
    if relation_heads < 1 or teacher_width % relation_heads or student_width % relation_heads:
        raise UserError(f"--relation-heads {relation_heads} must divide the inner attention width "
                        f"(heads x d_kv) of both models: the teacher's is {teacher_width}, the student's "
                        f"{student_width}; use a divisor of {math.gcd(teacher_width, student_width)}")


def check_relation_setup(terms, relation_heads, student_cfg, teacher_cfg, student_layer=-1, teacher_layer=-1):
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
    for who, cfg, index in (("student", student_cfg, student_layer), ("teacher", teacher_cfg, teacher_layer)):
        _check_layer(index, cfg.layers, who, "encoder")
        _check_layer(index, cfg.dec_layers or cfg.layers, who, "decoder")


def _check_layer(index, n_layers, who, stack):
    if not -n_layers <= index < n_layers:
        raise UserError(f"--relation-{who}-layer {index}: the {who} has {n_layers} {stack} layers "
                        f"(give 0 .. {n_layers - 1}, or -1 for the last)")


def relation(a, b, relation_heads, allowed):
    """Reln(a, b)_r = softmax(a_r b_r^T / sqrt(d_r)) for each relation head r (MiniLMv2): float32 log-probs.

    a: (N, heads, T_a, d_kv), b: (N, heads, T_b, d_kv): two sets of per-head vectors of one attention
    layer, concatenated to (N, T, W), W = heads * d_kv, and re-split into R = relation_heads of d_r = W / R.
    allowed: bool, broadcastable to (N, R, T_a, T_b), True where row i may relate to key j.
    Returns (N, R, T_a, T_b); a key that is not allowed gets probability 0."""
    with torch.autocast(a.device.type, enabled=False):
        N, heads, T_a, d_kv = a.shape
        T_b, W = b.size(2), heads * d_kv
        d_r = W // relation_heads
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
    row_mask: (N, T_a) True = real row. Returns a 0-dim float32 tensor (0 if no real row)."""
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - student_logp)).masked_fill(~allowed, 0.0).sum(-1)  # (N, R, T_a)
    kl = kl.mean(1)                                                   # (N, T_a): mean over R
    kl = torch.where(row_mask, kl, 0.0)                               # padded rows count nothing
    return kl.sum() / row_mask.sum().clamp(min=1)


def relation_term_loss(name, student_qkv, teacher_qkv, relation_heads, student_layer=-1, teacher_layer=-1):
    """One relation term (a key of RELATION_TERMS), from a teacher layer to a student layer.

    student_qkv, teacher_qkv: the dicts T5Model.forward(..., return_qkv=True) returns for the same batch
    (each q/k/v (N, heads, len, d_kv); "src_mask" (N, S) and "tgt_mask" (N, T), True = real token).
    The teacher gets no gradient. Returns a 0-dim float32 tensor."""
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


def relation_kd_loss(student_qkv, teacher_qkv, terms, relation_heads, student_layer=-1, teacher_layer=-1,
                     student_logits=None, teacher_logits=None, target=None, T=1.0, pad=PAD):
    """The distillation loss of MiniLM / MiniEnD: a weighted sum of terms,

        L = sum_term weight_term * L_term

    terms: {name: weight} from parse_relation_terms (names: RELATION_TERMS, "logit", "nll").
    student_qkv, teacher_qkv, relation_heads, student_layer, teacher_layer: as relation_term_loss.
    student_logits, teacher_logits (N, T, V) and target (N, T) = tgt_out: needed by "logit"
        (kd_losses.word_kd_loss with alpha = 1 at temperature T) and "nll" (kd_losses.nll_loss).
    Returns (loss: 0-dim float32 tensor, parts: {name: the term's unweighted value, detached})."""
    loss, parts = 0.0, {}
    for name, weight in terms.items():
        if name in OUTPUT_TERMS and (student_logits is None or target is None
                                     or (name == "logit" and teacher_logits is None)):
            raise ValueError(f"the {name!r} term needs student_logits, target"
                             f"{' and teacher_logits' if name == 'logit' else ''}")
        if name == "logit":
            value = kd_losses.word_kd_loss(student_logits, teacher_logits, target, alpha=1.0, T=T, pad=pad)
        elif name == "nll":
            value = kd_losses.nll_loss(student_logits, target, pad=pad)
        else:
            value = relation_term_loss(name, student_qkv, teacher_qkv, relation_heads,
                                       student_layer, teacher_layer)
        loss = loss + weight * value
        parts[name] = value.detach()
    return loss, parts
