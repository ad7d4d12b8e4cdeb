"""Training losses for knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

Read top to bottom: 1. NLL; 2. Word-KD, the student matches the teacher's next-word distribution
(section 3.1); 3. Seq-Inter, the teacher's K-best hypothesis closest to the reference (3.3);
4. training: the --kd flags, the Distillation they ask for, and compute_loss, the loss of a batch;
5. DivergenceCheck, which tells a training loss that has gone wrong.
The attention-relation losses of MiniLM / MiniEnD (for the T5-like model) are in relation_losses.py.
Seq-KD itself (section 3.2) needs no loss: it is plain NLL on the teacher's beam output, so it
lives in translate.py (generate the data) and train.py (train on it with --train-tgt).

Conventions (see data.py): logits are (B, T, V) over the target vocabulary, `target` is tgt_out,
(B, T) = [y1 .. yn EOS] padded with PAD. The mask is `target != pad` (True = real token); padding
positions contribute nothing to any loss and are not counted in the token normalisation.
All log-probabilities are computed in float32, whatever the dtype of the logits (bf16 autocast).
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

import data
import relation_losses  # (relation_losses imports this module too: both import the module, not names)
from data import PAD, UserError
from model import count_params


# 1. NLL (negative log-likelihood), the baseline loss ------------------------------------------

def nll_sum(logits, target, pad=PAD, label_smoothing=0.0):
    """Summed NLL over the real (non-pad) target positions.

        L_NLL = - sum_t log p(y_t | y_<t, x)            (Kim & Rush 2016, section 2)

    With label_smoothing ε > 0 (Szegedy et al. 2016) the target of each position is (1 - ε) one-hot(y_t) + ε/V
    uniform instead, through torch's cross_entropy(label_smoothing=ε): - sum_t [(1 - ε) log p(y_t | ..) +
    ε/V sum_k log p(k | ..)]; a uniform p scores log V per token, smoothed or not. ε = 0 is the plain NLL.
    logits: (B, T, V) float (any dtype; log_softmax runs in float32); target: (B, T) long, PAD-padded.
    Returns (loss_sum: 0-dim float32 tensor, ntokens: int); corpus perplexity = exp(Σ loss_sum / Σ ntokens).
    """
    _check_shapes(logits, target)
    mask = target != pad                                        # (B, T) True = real token
    if label_smoothing:
        loss_sum = F.cross_entropy(logits[mask].float(), target[mask], reduction="sum", label_smoothing=label_smoothing)
        return loss_sum, int(mask.sum())
    logp = F.log_softmax(logits[mask].float(), dim=-1)          # (N, V) the N real positions only
    logp_gold = logp.gather(-1, target[mask].unsqueeze(-1))     # (N, 1) log p(y_t | y_<t, x)
    return -logp_gold.sum(), int(mask.sum())


def nll_loss(logits, target, pad=PAD):
    """Token-mean NLL: nll_sum / number of non-pad target tokens (0, not NaN, if there is none)."""
    loss_sum, ntokens = nll_sum(logits, target, pad)
    return loss_sum / max(ntokens, 1)


# 2. Word-level knowledge distillation (Word-KD) -----------------------------------------------

def word_kd_sum(student_logits, teacher_logits, target, T=1.0, pad=PAD):
    """Summed word-level KD term over the real target positions.

    Both models are teacher-forced on the same (gold, or Seq-KD) prefix. With q = softmax(teacher_logits
    / T) (the teacher's soft targets, no gradient) and p = softmax(student_logits / T):

        L_WORD-KD = - sum_t sum_k q(y_t = k | y_<t, x) log p(y_t = k | y_<t, x)   (Kim & Rush 2016, section 3.1)

    multiplied by T^2 when T != 1 (Hinton et al. 2015): the gradient of the soft cross-entropy
    shrinks like 1/T^2, so the factor keeps its size comparable to the NLL term for any T.

    This is the CROSS-ENTROPY form, as the paper writes it. It equals KL(q || p) + H(q): the
    teacher's entropy H(q) does not depend on the student, so the gradient is that of the KL
    divergence, but the reported value includes H(q). Hence a student identical to the teacher
    has a NONZERO loss (the teacher's entropy) and a ZERO gradient.

    student_logits: (B, T, V) with gradient; teacher_logits: (B, T, V), detached here;
    target: (B, T) long, only used for its mask (target != pad, True = real token).
    Returns (kd_sum: 0-dim float32 tensor, ntokens: int)."""
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


def word_kd_loss(student_logits, teacher_logits, target, alpha=0.5, T=1.0, pad=PAD, return_parts=False,
                 label_smoothing=0.0):
    """Token-mean Word-KD training loss, interpolated with NLL on the target:

        L = alpha * L_WORD-KD + (1 - alpha) * L_NLL                (Kim & Rush 2016, section 3.1)

    Each term is summed over the real target positions and divided by their number (alpha = 0 is
    exactly nll_loss). L_WORD-KD is as word_kd_sum (teacher entropy included, T^2-scaled); L_NLL
    always uses T = 1 (and label_smoothing, as nll_sum). The paper uses alpha = 0.5, T = 1. Shapes as word_kd_sum.
    Returns a 0-dim float32 tensor; with return_parts, (loss, {"word_kd": L_WORD-KD, "nll": L_NLL}),
    the two terms per token and detached (training logs them). The teacher gets no gradient."""
    kd_sum, ntokens = word_kd_sum(student_logits, teacher_logits, target, T=T, pad=pad)
    nll, _ = nll_sum(student_logits, target, pad, label_smoothing)
    n = max(ntokens, 1)
    loss = (alpha * kd_sum + (1.0 - alpha) * nll) / n
    return (loss, {"word_kd": kd_sum.detach() / n, "nll": nll.detach() / n}) if return_parts else loss


def _check_shapes(logits, target):
    if logits.dim() != 3 or target.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and target (B, T), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")


# 3. Seq-Inter: pick the teacher hypothesis closest to the reference ---------------------------

@functools.lru_cache(maxsize=None)
def _sentence_bleu_metric(tokenize, smooth_method):
    return BLEU(tokenize=tokenize, smooth_method=smooth_method, effective_order=True)


def sentence_bleu(hyp, ref, tokenize="13a", smooth_method="exp"):
    """Smoothed sentence-level BLEU (0..100) of one hypothesis against one reference (sacrebleu)."""
    return _sentence_bleu_metric(tokenize, smooth_method).sentence_score(hyp, [ref]).score


def select_seq_inter(hyps, ref, tokenize="13a", smooth_method="exp"):
    """Index of the K-best entry closest to the reference (Kim & Rush 2016, section 3.3, Seq-Inter):

        y~ = argmax_{s in K-best(x)} sim(y, s)

    with sim = smoothed sentence-level BLEU, exactly `sacrebleu.sentence_bleu(hyp, [ref])`: effective
    order (n-gram orders longer than the hypothesis are left out, so short sentences are not zeroed)
    and smooth_method='exp' (Chen & Cherry 2014, "NIST geometric": the k-th n-gram order with no
    match counts as 1 / 2^k matches), sacrebleu's default, so the command-line sacrebleu recomputes
    it; a hypothesis that shares no unigram with the reference scores 0.

    hyps: the K-best list, best first (strings; an empty translation is ""). ref: the reference.
    tokenize: sacrebleu tokenizer ("13a" for raw text, "none" for pre-tokenized corpora).
    Ties go to the earlier (higher-ranked by the teacher) hypothesis. Returns an int index."""
    if len(hyps) == 0:
        raise ValueError("select_seq_inter: empty K-best list")
    scores = [sentence_bleu(hyp, ref, tokenize, smooth_method) for hyp in hyps]
    return scores.index(max(scores))            # the first of the best: ties keep the earlier entry


# 4. Training: the distillation the flags ask for, and the loss of a batch ---------------------

@dataclass
class Distillation:
    """What the student learns from its teacher (--teacher): the loss compute_loss adds."""
    teacher: torch.nn.Module             # in eval mode, no gradient
    kind: str = "word"                   # word: Word-KD; relation: MiniLM / MiniEnD relations
    alpha: float = 0.5                   # word: L = α L_WORD-KD + (1 - α) L_NLL
    temperature: float = 1.0             # word, and the "logit" relation term
    terms: dict | None = None            # relation: {term: weight}, relation_losses.parse_relation_terms
    relation_heads: int = 1              # relation: R, divides heads x d_kv of both models
    student_layer: int = -1              # relation: which layer of each stack, -1 = the last
    teacher_layer: int = -1


def resolve_distillation_flags(args) -> None:
    """The defaults and checks of the --kd flags (part of flags.resolve_defaults)."""
    if args.kd is None and args.teacher:
        args.kd = "word"
    if args.kd and not args.teacher:
        raise UserError(f"--kd {args.kd} distils from a teacher: give --teacher CKPT")
    if args.kd == "word" and args.kd_alpha is None:
        args.kd_alpha = 0.5
    if args.kd == "relation":
        if args.kd_alpha is not None:
            raise UserError("--kd-alpha is for --kd word; with --kd relation weigh the terms in --relation-terms "
                            "(e.g. 'miniend-e,nll=0.5,logit=0.5')")
        if args.label_smoothing:
            raise UserError("--label-smoothing smooths the NLL of plain training and of --kd word, not the 'nll' "
                            "term of --kd relation: drop --label-smoothing")
        args.relation_terms = args.relation_terms or "miniend-d"
        relation_losses.parse_relation_terms(args.relation_terms)  # a bad spec fails now, before any data is read
    elif args.relation_terms or args.relation_heads:
        raise UserError("--relation-terms/--relation-heads go with --kd relation (and --teacher)")


def make_distillation(args, model, teacher) -> Distillation | None:
    """The Distillation of the flags (None without --teacher), checked once before training."""
    if teacher is None:
        return None
    if args.kd == "word":  # any two architectures: only the output distributions are compared
        print(f"teacher: {args.teacher} ({teacher.arch}), {count_params(teacher):,} parameters; "
              f"Word-KD with alpha {args.kd_alpha}, temperature {args.kd_temperature}")
        return Distillation(teacher, "word", alpha=args.kd_alpha, temperature=args.kd_temperature)
    for who, m in [("the student", model), (f"the teacher {args.teacher}", teacher)]:
        if m.arch != "t5":
            raise UserError(f"--kd relation compares attention queries, keys and values: {who} is an "
                            f"{m.arch} model, and both must be --arch t5 (use --kd word for this teacher)")
    terms = relation_losses.parse_relation_terms(args.relation_terms)
    heads = args.relation_heads or model.cfg.heads
    relation_losses.check_relation_setup(terms, heads, model.cfg, teacher.cfg, args.relation_student_layer,
                                         args.relation_teacher_layer)
    print(f"teacher: {args.teacher} ({teacher.arch}), {count_params(teacher):,} parameters; relation KD "
          f"{' + '.join(f'{w:g} {name}' for name, w in terms.items())}, {heads} relation heads, "
          f"student layer {args.relation_student_layer} <- teacher layer {args.relation_teacher_layer}")
    return Distillation(teacher, "relation", temperature=args.kd_temperature, terms=terms, relation_heads=heads,
                        student_layer=args.relation_student_layer, teacher_layer=args.relation_teacher_layer)


def check_teacher_vocabs(teacher_ckpt, path, src_vocab, tgt_vocab) -> None:
    """Word-KD compares distributions over the same words: the teacher must share both vocabularies."""
    teacher_src, teacher_tgt = data.vocabs_from_checkpoint(teacher_ckpt)
    for side, theirs, ours in [("target", teacher_tgt, tgt_vocab), ("source", teacher_src, src_vocab)]:
        if len(theirs) != len(ours):
            raise UserError(f"--teacher {path}: its {side} vocabulary has {len(theirs)} entries but the student's "
                            f"has {len(ours)}; let the student take the teacher's vocabularies (--vocab-from {path})")
        if theirs.to_dict() != ours.to_dict():
            raise UserError(f"--teacher {path}: its {side} vocabulary ({len(theirs)} entries) holds other words "
                            f"than the student's; let the student take the teacher's (--vocab-from {path})")


def warn_unknown_words(args, examples, vocab_source, limit=0.05) -> None:
    """Vocabularies taken from another run (--teacher, --vocab-from, --init): a one-line warning when
    more than `limit` of the training source or target tokens (examples: [(src_ids, tgt_ids)]) are <unk>."""
    if vocab_source is None or args.resume:
        return
    rates = [sum(ids.count(data.UNK) for ids in side) / max(1, sum(map(len, side))) for side in zip(*examples)]
    if max(rates, default=0.0) > limit:
        print(f"warning: {rates[0]:.1%} of the training source tokens and {rates[1]:.1%} of the target tokens "
              f"are <unk> in the vocabularies of {vocab_source}: they were built on other text")


def compute_loss(model, batch, kd: Distillation | None = None, normalize="tokens", label_smoothing=0.0):
    """The training loss of a batch, and its parts for the log.

        no teacher:       L = L_NLL = -Σ_t log p(y_t | y_<t, x), over the real target tokens
        --kd word:        L = α L_WORD-KD + (1 - α) L_NLL       (Kim & Rush 2016, section 3.1)
        --kd relation:    L = Σ_term w_term L_term              (MiniLM / MiniEnD, relation_losses.py)

    Teacher forcing on the batch's target prefix, the teacher in eval mode with no gradient.
    label_smoothing: the ε of L_NLL, with and without Word-KD (nll_sum; not --kd relation's "nll" term).
    normalize="tokens": L per real target token (batch.ntokens). "sents": per sentence instead (Luong
    et al. 2015 and Kim & Rush's code), the per-token loss x ntokens / B, the relation terms too.
    Returns (loss: 0-dim tensor to backpropagate, parts: {"loss": the per-token loss, whatever
    `normalize` is; for a composite loss also each term per token: "nll" and "word_kd", or the
    relation terms}), the parts detached."""
    if kd is not None and kd.kind == "relation":
        enc = relation_losses.encoder_only(kd.terms)      # then no logits: (None, None, qkv)
        logits, _, qkv = model(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True, encoder_only=enc)
        with torch.no_grad():
            teacher_logits, _, teacher_qkv = kd.teacher(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True,
                                                        encoder_only=enc)
        loss, parts = relation_losses.relation_kd_loss(
            qkv, teacher_qkv, kd.terms, kd.relation_heads, kd.student_layer, kd.teacher_layer,
            student_logits=logits, teacher_logits=teacher_logits, target=batch.tgt_out, T=kd.temperature)
    elif kd is not None:
        logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
        with torch.no_grad():
            teacher_logits, _ = kd.teacher(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
        loss, parts = word_kd_loss(logits, teacher_logits, batch.tgt_out, alpha=kd.alpha, T=kd.temperature,
                                   return_parts=True, label_smoothing=label_smoothing)  # Kim & Rush, section 3.1
    else:
        logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
        loss_sum, ntokens = nll_sum(logits, batch.tgt_out, label_smoothing=label_smoothing)
        loss, parts = loss_sum / ntokens, {}
    parts["loss"] = loss.detach()
    if normalize == "sents":
        loss = loss * batch.ntokens / batch.src.size(0)    # Σ over tokens / B
    return loss, parts


@torch.no_grad()
def mean_loss(model, batches, kd: Distillation | None = None, label_smoothing=0.0) -> float:
    """compute_loss per real target token over `batches` (data.Batch on the model's device), token-weighted:
    the training objective on held-out data (train.py --best-metric loss). The caller sets eval mode."""
    total, ntokens = 0.0, 0
    for batch in batches:
        loss, _ = compute_loss(model, batch, kd, "tokens", label_smoothing)
        total, ntokens = total + loss * batch.ntokens, ntokens + batch.ntokens
    return float(total) / max(ntokens, 1)


# 5. Divergence: a training loss that has gone wrong -------------------------------------------

class DivergenceCheck:
    """Watches the training loss (train.py stops the run when check() says what is wrong). Every 10 steps: was the
    loss NaN or infinite in a step since the last check? Every `window` steps after the first `window`: is the
    mean loss per token of the last `window` steps above log V (V: the target vocabulary), the loss of a uniform
    guess, i.e. did the model unlearn even what it knew at the start? The loss watched is the NLL part, of which
    a uniform guess scores log V (label-smoothed or not; Word-KD's L_NLL is at T = 1); with --kd relation and
    no 'nll' term, the total loss, then for NaN and infinity only. `state` (from .state()) continues a check."""
    window = 200     # steps

    def __init__(self, vocab_size: int, kd: Distillation | None = None, state: dict | None = None):
        self.vocab_size = vocab_size
        self.against_uniform = kd is None or kd.kind == "word" or "nll" in kd.terms
        self.sum, self.tokens = (state["sum"], state["tokens"]) if state else (0.0, 0)

    def add(self, parts: dict, ntokens: int) -> None:
        """One batch: compute_loss's parts (per token) and its real target tokens."""
        self.sum = self.sum + parts.get("nll", parts["loss"]) * ntokens   # a tensor: no wait for the GPU here
        self.tokens += ntokens

    def state(self) -> dict:
        return {"sum": float(self.sum), "tokens": self.tokens}

    def check(self, step: int) -> str | None:
        """After optimizer step `step` (counted from 1): what is wrong and what to do, or None."""
        if (step % 10 and step % self.window) or not self.tokens:
            return None
        mean, uniform, end = float(self.sum) / self.tokens, math.log(self.vocab_size), step % self.window == 0
        if end:
            self.sum, self.tokens = 0.0, 0
        if not math.isfinite(mean):
            what = f"the training loss is {mean} by step {step}"
        elif end and step > self.window and self.against_uniform and mean > uniform:
            what = (f"the mean training loss of steps {step - self.window + 1}-{step} is {mean:.4g} a token, above "
                    f"log {self.vocab_size} = {uniform:.4g}, that of a uniform guess")
        else:
            return None
        return (f"training diverged: {what}; lower --lr (or keep --clip on, or add --warmup STEPS) and start "
                "again with --overwrite")
