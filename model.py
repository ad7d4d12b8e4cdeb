"""Sequence-to-sequence models behind one incremental-decoding interface.

Sections
  1. Config and presets     LSTMConfig, PRESETS (the sizes of Kim & Rush 2016 and Luong et al. 2015)
  2. The LSTM model         Luong et al. (2015): stacked LSTM encoder/decoder, global attention
                            (dot / general / concat), attentional hidden state, input feeding
  2b. The T5-like model     Raffel et al. (2020): pre-norm Transformer with RMS norm, relative
                            position buckets, shared embeddings, a key/value cache for decoding
  3. Checkpoints            build, save (atomically), load (weights_only=True), rebuild

The interface every model implements (beam.py and train.py use nothing else):

    logits, attn = model(src, src_mask, tgt_in)     # teacher forcing: (B, T, V), (B, T, S)
    state = model.start(src, src_mask)               # encode once -> decoder state
    logp, attn, state = model.step(prev, state)      # one target step: (B, V) log-probs, (B, S)
    state = model.reorder(state, index)              # pick / repeat rows after a beam step

Conventions: tensors are batch-first; `src` (B, S) and `tgt_in` (B, T) hold token ids padded with
PAD; `src_mask` (B, S) is boolean with True = real token, False = padding. A decoder state is a
dict of tensors that all have the batch as dimension 0, so reordering it is one index_select per
entry, whatever the architecture.
"""
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from data import BOS, PAD, UserError

# ---------------------------------------------------------------------------------------------
# 1. Config and presets
# ---------------------------------------------------------------------------------------------


@dataclass
class LSTMConfig:
    src_vocab: int = 0           # filled in from the vocabularies
    tgt_vocab: int = 0
    emb_dim: int = 500
    hidden: int = 500
    layers: int = 2
    bidirectional: bool = False  # the encoder; each direction then has hidden // 2 units
    attention: str = "general"   # dot | general | concat  (Luong et al. 2015, eq. 8)
    input_feed: bool = True      # feed h~_{t-1} into the decoder's first layer (Luong sec. 3.3)
    dropout: float = 0.2
    init_range: float = 0.1      # uniform initialisation in [-0.1, 0.1] (Luong et al. 2015)


# Model sizes. Vocabulary sizes come from the data, so presets leave them out.
PRESETS = {
    # Kim & Rush (2016), WMT14 en->de: teacher 4x1000, students 2x500 and 2x300.
    "kim-rush-teacher": dict(layers=4, hidden=1000, emb_dim=1000, dropout=0.3),
    "kim-rush-student": dict(layers=2, hidden=500, emb_dim=500, dropout=0.3),
    "kim-rush-student-small": dict(layers=2, hidden=300, emb_dim=300, dropout=0.3),
    # Kim & Rush (2016), IWSLT15 th->en: teacher 2x500, student 2x100.
    "iwslt-teacher": dict(layers=2, hidden=500, emb_dim=500, dropout=0.3),
    "iwslt-student": dict(layers=2, hidden=100, emb_dim=100, dropout=0.3),
    # The built-in synthetic corpus: trains to a good model in a few CPU minutes.
    "builtin": dict(layers=1, hidden=128, emb_dim=64, bidirectional=True, dropout=0.1),
    # Unit tests.
    "tiny": dict(layers=1, hidden=16, emb_dim=8, dropout=0.0),
}


def make_config(arch, preset=None, **overrides):
    """A config for ARCH ("lstm" or "t5") from a preset name plus field overrides.

    None values, and fields the architecture does not have, are ignored. The T5 presets and
    config live in section 2b; ARCHS (section 3) maps an architecture to its classes."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: unknown architecture (known: {', '.join(ARCHS)})")
    presets = PRESETS if arch == "lstm" else T5_PRESETS
    if preset is not None and preset not in presets:
        raise UserError(f"--preset {preset}: unknown preset for --arch {arch} "
                        f"(known: {', '.join(presets)})")
    config_cls = ARCHS[arch][0]
    values = dict(presets.get(preset, {}))
    names = {f.name for f in fields(config_cls)}
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    cfg = config_cls(**values)
    if arch == "t5":
        check_t5_config(cfg)
        return cfg
    if cfg.attention not in ("dot", "general", "concat"):
        raise UserError(f"--attention {cfg.attention}: choose dot, general or concat")
    if cfg.bidirectional and cfg.hidden % 2:
        raise UserError(f"--hidden {cfg.hidden}: a bidirectional encoder needs an even size")
    return cfg


# ---------------------------------------------------------------------------------------------
# 2. The LSTM model (Luong, Pham & Manning 2015, "Effective Approaches to Attention-based NMT")
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Embeddings and a stacked (optionally bidirectional) LSTM over the source."""

    def __init__(self, cfg):
        super().__init__()
        per_direction = cfg.hidden // 2 if cfg.bidirectional else cfg.hidden
        self.embed = nn.Embedding(cfg.src_vocab, cfg.emb_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(cfg.emb_dim, per_direction, cfg.layers, batch_first=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0,
                           bidirectional=cfg.bidirectional)
        self.bidirectional = cfg.bidirectional

    def forward(self, src, src_mask):
        """src, src_mask: (B, S) -> memory (B, S, H) and the final (h, c), each (L, B, H).

        The sequences are packed, so padding never enters the recurrence: a sentence gets the
        same encoding alone and in a padded batch."""
        B, S = src.shape
        lengths = src_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(src), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, (h, c) = self.rnn(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, H)
        if self.bidirectional:  # (2L, B, H/2) -> (L, B, H): both directions side by side
            h = torch.cat([h[0::2], h[1::2]], dim=-1)
            c = torch.cat([c[0::2], c[1::2]], dim=-1)
        return memory, (h, c)


class GlobalAttention(nn.Module):
    """Luong et al. (2015), eq. 8: score(h_t, h̄_s) for every source position s.

        dot:     h_t · h̄_s
        general: h_t · (W_a h̄_s)
        concat:  v_a · tanh(W_a [h_t; h̄_s])  =  v_a · tanh(W_q h_t + W_k h̄_s)

    The part that depends only on the source (`keys`) is computed once per sentence by
    `precompute`, so each decoding step costs one batched product over the source.
    """

    def __init__(self, hidden, kind):
        super().__init__()
        self.kind = kind
        if kind in ("general", "concat"):
            self.W_k = nn.Linear(hidden, hidden, bias=False)
        if kind == "concat":
            self.W_q = nn.Linear(hidden, hidden, bias=False)
            self.v = nn.Linear(hidden, 1, bias=False)

    def precompute(self, memory):
        """memory (B, S, H) -> keys (B, S, H)."""
        return memory if self.kind == "dot" else self.W_k(memory)

    def forward(self, h, keys, memory, src_mask):
        """h (B, H), keys and memory (B, S, H), src_mask (B, S) -> context (B, H), align (B, S)."""
        if self.kind == "concat":
            scores = self.v(torch.tanh(keys + self.W_q(h).unsqueeze(1))).squeeze(2)  # (B, S)
        else:
            scores = torch.bmm(keys, h.unsqueeze(2)).squeeze(2)                       # (B, S)
        scores = scores.masked_fill(~src_mask, float("-inf"))
        align = torch.softmax(scores, dim=-1)                        # a_t(s), Luong eq. 7
        context = torch.bmm(align.unsqueeze(1), memory).squeeze(1)   # c_t = Σ_s a_t(s) h̄_s  (B, H)
        return context, align


class Seq2Seq(nn.Module):
    """Encoder, attentional decoder with input feeding, and the output layer (the "generator")."""

    arch = "lstm"

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.encoder = Encoder(cfg)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.emb_dim, padding_idx=PAD)
        first_input = cfg.emb_dim + (H if cfg.input_feed else 0)
        self.cells = nn.ModuleList(
            [nn.LSTMCell(first_input if i == 0 else H, H) for i in range(cfg.layers)])
        self.attention = GlobalAttention(H, cfg.attention)
        self.W_c = nn.Linear(2 * H, H, bias=False)        # h~_t = tanh(W_c [c_t; h_t]), eq. 5
        self.generator = nn.Linear(H, cfg.tgt_vocab)       # p(y_t | y<t, x) = softmax(W_s h~_t), eq. 6
        self.drop = nn.Dropout(cfg.dropout)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    # -- the decoder step shared by training (teacher forcing) and decoding -----------------------

    def _decode_step(self, emb, state):
        """One target position. emb (B, E) -> h~_t (B, H), a_t (B, S), and the new state."""
        h, c, feed = state["h"], state["c"], state["feed"]           # (B, L, H), (B, L, H), (B, H)
        x = torch.cat([emb, feed], dim=1) if self.cfg.input_feed else emb
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i > 0:
                x = self.drop(x)                                      # dropout between layers
            h_i, c_i = cell(x, (h[:, i], c[:, i]))
            hs.append(h_i)
            cs.append(c_i)
            x = h_i
        context, align = self.attention(x, state["keys"], state["memory"], state["src_mask"])
        h_tilde = torch.tanh(self.W_c(torch.cat([context, x], dim=1)))  # eq. 5   (B, H)
        new_state = dict(state, h=torch.stack(hs, 1), c=torch.stack(cs, 1), feed=h_tilde)
        return h_tilde, align, new_state

    # -- the interface -------------------------------------------------------------------------

    def start(self, src, src_mask):
        """Encode the source once. Returns the decoder state: every entry has batch dim 0."""
        memory, (h, c) = self.encoder(src, src_mask)
        B = src.size(0)
        return {
            "h": h.transpose(0, 1).contiguous(),          # (B, L, H): decoder starts from the
            "c": c.transpose(0, 1).contiguous(),          # encoder's final state
            "feed": memory.new_zeros(B, self.cfg.hidden),  # h~_0 = 0
            "memory": memory,                              # (B, S, H)
            "keys": self.attention.precompute(memory),     # (B, S, H)
            "src_mask": src_mask,                          # (B, S)
        }

    def step(self, prev, state):
        """prev (B,) previous tokens (BOS first) -> log-probs (B, V) float32, attention (B, S), state."""
        h_tilde, align, state = self._decode_step(self.tgt_embed(prev), state)
        logp = torch.log_softmax(self.generator(h_tilde).float(), dim=-1)
        return logp, align, state

    @staticmethod
    def reorder(state, index):
        """Select rows of every state tensor: index (B',) -> a state of batch B'."""
        return {k: v.index_select(0, index) for k, v in state.items()}

    def forward(self, src, src_mask, tgt_in):
        """Teacher forcing. src, src_mask (B, S); tgt_in (B, T) = [BOS y1 .. yn] ->
        logits (B, T, V) and attention (B, T, S)."""
        state = self.start(src, src_mask)
        emb = self.tgt_embed(tgt_in)                       # (B, T, E)
        outputs, aligns = [], []
        for t in range(tgt_in.size(1)):
            h_tilde, align, state = self._decode_step(emb[:, t], state)
            outputs.append(h_tilde)
            aligns.append(align)
        h_tilde = self.drop(torch.stack(outputs, 1))       # (B, T, H)
        return self.generator(h_tilde), torch.stack(aligns, 1)


# ---------------------------------------------------------------------------------------------
# 2b. The T5-like transformer (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
#     with a Unified Text-to-Text Transformer", section 2.1)
# ---------------------------------------------------------------------------------------------
#
# An encoder-decoder Transformer (Vaswani et al. 2017) with T5's changes, written from the paper:
#   - one token embedding shared by the encoder input, the decoder input and (tied) the output
#     layer; a tied output is scaled by d_model^-0.5 (so logits start with unit variance);
#   - pre-norm residual blocks  x = x + dropout(sublayer(norm(x))), with a final norm after each
#     stack; the norm is RMS norm (a learned scale only: no bias, no mean subtraction);
#   - no bias terms anywhere;
#   - no absolute positions: each attention logit gets a learned scalar per head that depends on
#     the bucketed key-minus-query distance (32 buckets, logarithmic up to 128). The bias table
#     is computed once per stack (T5 keeps it in the stack's first layer) and added in every
#     layer of that stack; cross-attention gets none;
#   - attention logits are NOT divided by sqrt(d_kv): T5 folds that factor into the initial
#     scale of the query weights (see T5Model._init_weights);
#   - feed-forward: ReLU (T5 v1.0) or gated GELU (T5 v1.1), a config choice;
#   - dropout on the embeddings, on the attention weights, inside the feed-forward (after the
#     activation), on every sublayer output before the residual add, and after each final norm.
#
# Decoder start token. T5 starts the decoder with PAD; seqkd's batches (data.collate) and
# beam.py start it with BOS. Rather than change either, the T5 decoder READS BOS AS PAD: every
# decoder input token equal to BOS is replaced by PAD before the embedding lookup, in forward
# and in step alike (BOS never occurs elsewhere in tgt_in). The embedding has no padding_idx,
# so the PAD row is an ordinary trained vector: it is the start-of-decoding embedding.
#
# Decoder masks. Decoder self-attention is causal (position t sees positions <= t). That is all
# the masking it needs: target padding only ever follows the real tokens, so a real position
# never sees a padded one. (Target padding is not a usable mask anyway: the start token IS PAD.)


@dataclass
class T5Config:
    src_vocab: int = 0             # filled in from the vocabularies
    tgt_vocab: int = 0
    d_model: int = 512
    d_kv: int = 64                 # width of one attention head (T5 decouples it from d_model/heads)
    heads: int = 8
    d_ff: int = 2048
    layers: int = 6                # encoder layers (and decoder layers unless dec_layers is set)
    dec_layers: int | None = None  # None: as many as the encoder
    ff: str = "relu"               # relu (T5 v1.0) | gated-gelu (T5 v1.1)
    num_buckets: int = 32          # relative-position buckets ...
    max_distance: int = 128        # ... logarithmic up to this distance, the last bucket beyond
    dropout: float = 0.1
    share_embeddings: bool = True  # one embedding for source and target: needs a joint vocabulary
    tie_output: bool = True        # output layer = embedding^T (T5 v1.0); False: its own matrix
    norm_eps: float = 1e-6


# Model sizes (vocabulary sizes come from the data). "Inner width" = heads * d_kv, which the
# relation losses of kd_losses.py split into relation heads.
T5_PRESETS = {
    # the size of T5-small: 6 + 6 layers, d_model 512, 8 heads of 64, d_ff 2048
    "t5-teacher": dict(layers=6, d_model=512, heads=8, d_kv=64, d_ff=2048, dropout=0.1),
    # students: 6 + 6 layers at width 384, and 3 + 3 layers at width 256
    "t5-student": dict(layers=6, d_model=384, heads=6, d_kv=64, d_ff=1536, dropout=0.1),
    "t5-student-small": dict(layers=3, d_model=256, heads=4, d_kv=64, d_ff=1024, dropout=0.1),
    # the built-in synthetic corpus: trains in a few CPU minutes
    "t5-builtin": dict(layers=2, d_model=128, heads=4, d_kv=32, d_ff=512, dropout=0.1),
    # unit tests
    "t5-tiny": dict(layers=2, d_model=16, heads=2, d_kv=8, d_ff=32, dropout=0.0),
}


def check_t5_config(cfg):
    """Raise UserError for a T5Config that cannot be built (called by make_config)."""
    if cfg.ff not in ("relu", "gated-gelu"):
        raise UserError(f"--ff {cfg.ff}: choose relu (T5 v1.0) or gated-gelu (T5 v1.1)")
    if cfg.share_embeddings and cfg.src_vocab != cfg.tgt_vocab:
        raise UserError(f"--arch t5 shares one embedding between source and target, but the "
                        f"vocabularies differ ({cfg.src_vocab} vs {cfg.tgt_vocab} entries): use a "
                        "joint vocabulary, or set share_embeddings=False")
    if cfg.num_buckets < 4 or cfg.num_buckets % 4:
        raise UserError(f"--num-buckets {cfg.num_buckets}: use a multiple of 4 (T5 uses 32)")
    for name in ("d_model", "d_kv", "heads", "d_ff", "layers"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")


def relative_position_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
    """Bucket ids for key-minus-query distances (T5, Raffel et al. 2020, section 2.1).

    relative_position: long tensor (any shape) of key position - query position.
    Returns a long tensor of the same shape with values in [0, num_buckets).

    bidirectional (encoder): half of the buckets are for keys at or before the query, half for
        keys after it (offset num_buckets / 2).
    causal (decoder): all buckets are for keys at or before the query; keys after it are masked
        anyway and share bucket 0.
    Within the n buckets of one direction, distances 0 .. n/2 - 1 each get their own bucket;
    larger distances d share logarithmically wider buckets,
        n/2 + floor((n - n/2) * log(d / (n/2)) / log(max_distance / (n/2))),
    and every distance from max_distance on falls into the last bucket n - 1.
    Example, encoder (n = 16): distance 12 -> 8 + floor(8 * log(1.5) / log(16)) = 9.
    """
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets    # keys after the query: upper half
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)              # how far back the key is
    max_exact = num_buckets // 2
    log_ratio = (torch.log(distance.float().clamp(min=1) / max_exact)
                 / math.log(max_distance / max_exact))            # 0 at max_exact, 1 at max_distance
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """The learned bias b[head, bucket(k - q)] added to every attention logit of one stack."""

    def __init__(self, cfg, bidirectional):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.bias = nn.Embedding(cfg.num_buckets, cfg.heads)

    def forward(self, q_len, k_len, offset=0):
        """Bias for query positions offset .. offset+q_len-1 against key positions 0 .. k_len-1:
        (1, heads, q_len, k_len)."""
        device = self.bias.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]   # (q_len, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]                    # (1, k_len)
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (q_len, k_len)
        return self.bias(buckets).permute(2, 0, 1).unsqueeze(0)               # (1, heads, q, k)


class RMSNorm(nn.Module):
    """T5's layer norm: y = w * x / sqrt(mean(x^2) + eps), a learned scale w and nothing else
    (no bias, no mean subtraction). The mean of squares is computed in float32 even under
    bf16/fp16 autocast. x (..., D) -> (..., D)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)                  # (..., 1) mean of squares
        return (self.weight * x32 * torch.rsqrt(variance + self.eps)).type_as(x)


class FeedForward(nn.Module):
    """relu (T5 v1.0):        FF(x) = W_o dropout(relu(W_i x))
    gated-gelu (T5 v1.1):  FF(x) = W_o dropout(gelu(W_gate x) * W_i x)
    x (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        gated = cfg.ff == "gated-gelu"
        self.wi_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if gated else None
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.wi_gate is None:
            h = F.relu(self.wi(x))                                        # (B, T, d_ff)
        else:
            h = F.gelu(self.wi_gate(x), approximate="tanh") * self.wi(x)  # (B, T, d_ff)
        return self.wo(self.drop(h))


class Attention(nn.Module):
    """Multi-head attention, T5 style: no biases, logits not divided by sqrt(d_kv).

    Keys and values are projected by `keys_values` separately from the queries, so a decoder can
    cache them: the cross-attention keys once per sentence, the self-attention keys one new
    position per step.
    """

    def __init__(self, cfg):
        super().__init__()
        inner = cfg.heads * cfg.d_kv
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def split_heads(self, x):
        """(B, T, heads * d_kv) -> (B, heads, T, d_kv)."""
        B, T, _ = x.shape
        return x.view(B, T, self.heads, -1).transpose(1, 2)

    def keys_values(self, y):
        """y (B, S, D) -> keys and values, each (B, heads, S, d_kv)."""
        return self.split_heads(self.k(y)), self.split_heads(self.v(y))

    def forward(self, x, k, v, mask, bias=None):
        """x (B, T, D): the query positions; k, v (B, heads, S, d_kv) from keys_values;
        mask: bool, broadcastable to (B, heads, T, S), True = may attend;
        bias: (1, heads, T, S) relative-position bias, or None.
        Returns the output (B, T, D), the attention weights (B, heads, T, S) and the queries
        (B, heads, T, d_kv)."""
        q = self.split_heads(self.q(x))                                   # (B, heads, T, d_kv)
        scores = q @ k.transpose(-1, -2)                   # (B, heads, T, S); no 1/sqrt(d_kv) (T5)
        if bias is not None:
            scores = scores + bias
        # a large negative number rather than -inf: a row with no allowed key (never a real
        # query) then gives finite garbage instead of NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)  # (B, heads, T, S)
        out = self.drop(weights) @ v                                      # (B, heads, T, d_kv)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), -1)      # (B, T, heads * d_kv)
        return self.o(out), weights, q


class EncoderLayer(nn.Module):
    """x = x + dropout(SelfAttn(norm(x)));  x = x + dropout(FF(norm(x)))."""

    def __init__(self, cfg):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, bias):
        """x (B, S, D); mask (B, 1, 1, S) True = real key; bias (1, heads, S, S) ->
        x (B, S, D) and this layer's {"q", "k", "v"}, each (B, heads, S, d_kv)."""
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)
        a, _, q = self.self_attn(h, k, v, mask, bias)
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.ff_norm(x)))
        return x, {"q": q, "k": k, "v": v}


class DecoderLayer(nn.Module):
    """x = x + dropout(CausalSelfAttn(norm(x)));  x = x + dropout(CrossAttn(norm(x), encoder));
    x = x + dropout(FF(norm(x)))."""

    def __init__(self, cfg):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past_k, past_v, causal, bias, cross_k, cross_v, src_mask):
        """Decoder positions t0 .. t0+T-1 given the cached self-attention keys/values of 0 .. t0-1.

        x (B, T, D); past_k, past_v (B, heads, t0, d_kv); causal (T, t0+T) True = may attend;
        bias (1, heads, T, t0+T); cross_k, cross_v (B, heads, S, d_kv); src_mask (B, 1, 1, S).
        Returns x (B, T, D), the cross-attention weights (B, heads, T, S), the self-attention
        keys/values of positions 0 .. t0+T-1, each (B, heads, t0+T, d_kv), and this layer's
        {"self": {"q", "k", "v"}, "cross": {"q", "k", "v"}}.
        """
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)                          # (B, heads, T, d_kv) new
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, heads, t0+T, d_kv)
        a, _, q = self.self_attn(h, k, v, causal, bias)
        x = x + self.drop(a)
        h = self.cross_norm(x)
        c, cross_weights, cross_q = self.cross_attn(h, cross_k, cross_v, src_mask)
        x = x + self.drop(c)
        x = x + self.drop(self.ff(self.ff_norm(x)))
        qkv = {"self": {"q": q, "k": k, "v": v},
               "cross": {"q": cross_q, "k": cross_k, "v": cross_v}}
        return x, cross_weights, k, v, qkv


class T5Model(nn.Module):
    """The T5-like encoder-decoder behind the same interface as Seq2Seq (see the top of the file).

    Decoder state (every entry batch-first, so Seq2Seq.reorder serves it):
        memory        (B, S, D)             the encoder output
        src_mask      (B, S)                True = real source token
        dec{i}.self_k, dec{i}.self_v    (B, heads, t, d_kv)   decoder layer i's self-attention
                                            keys/values of the t positions decoded so far (grow)
        dec{i}.cross_k, dec{i}.cross_v  (B, heads, S, d_kv)   its cross-attention keys/values,
                                            computed once from the encoder output
    """

    arch = "t5"
    reorder = staticmethod(Seq2Seq.reorder)   # index_select dim 0 on every state tensor

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        # one embedding: decoder input, tied output and (when shared) encoder input
        self.embed = nn.Embedding(cfg.tgt_vocab, D)
        self.src_embed = None if cfg.share_embeddings else nn.Embedding(cfg.src_vocab, D)
        self.encoder = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])
        self.enc_position = RelativePositionBias(cfg, bidirectional=True)
        self.enc_norm = RMSNorm(D, cfg.norm_eps)
        dec_layers = cfg.dec_layers or cfg.layers
        self.decoder = nn.ModuleList([DecoderLayer(cfg) for _ in range(dec_layers)])
        self.dec_position = RelativePositionBias(cfg, bidirectional=False)
        self.dec_norm = RMSNorm(D, cfg.norm_eps)
        self.lm_head = None if cfg.tie_output else nn.Linear(D, cfg.tgt_vocab, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _init_weights(self):
        """T5's initialisation (Mesh TensorFlow), normal with mean 0 and these standard deviations:
            embeddings 1.0;  q (d_model * d_kv)^-0.5;  k, v d_model^-0.5;  o (heads * d_kv)^-0.5;
            feed-forward W_i (and W_gate) d_model^-0.5, W_o d_ff^-0.5;  position biases d_model^-0.5;
            RMS norm scales 1.
        The q scale stands in for the missing 1/sqrt(d_kv) of the attention logits. Our choice: an
        untied output layer gets std d_model^-0.5, so its logits start at the same scale as the
        tied layer's (which multiplies by d_model^-0.5 instead)."""
        cfg = self.cfg
        D = cfg.d_model
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0)
            elif isinstance(m, Attention):
                nn.init.normal_(m.q.weight, std=(D * cfg.d_kv) ** -0.5)
                nn.init.normal_(m.k.weight, std=D ** -0.5)
                nn.init.normal_(m.v.weight, std=D ** -0.5)
                nn.init.normal_(m.o.weight, std=(cfg.heads * cfg.d_kv) ** -0.5)
            elif isinstance(m, FeedForward):
                nn.init.normal_(m.wi.weight, std=D ** -0.5)
                if m.wi_gate is not None:
                    nn.init.normal_(m.wi_gate.weight, std=D ** -0.5)
                nn.init.normal_(m.wo.weight, std=cfg.d_ff ** -0.5)
        for position in (self.enc_position, self.dec_position):   # after the embedding loop above
            nn.init.normal_(position.bias.weight, std=D ** -0.5)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=D ** -0.5)

    # -- encoder, decoder, output layer --------------------------------------------------------

    def encode(self, src, src_mask, record=None):
        """src, src_mask (B, S) -> encoder output (B, S, D). `record`: a dict whose "enc_self"
        list receives each layer's {"q", "k", "v"} (see forward), or None."""
        embed = self.embed if self.src_embed is None else self.src_embed
        x = self.drop(embed(src))                                     # (B, S, D)
        S = src.size(1)
        bias = self.enc_position(S, S)                                # (1, heads, S, S), all layers
        mask = src_mask[:, None, None, :]                             # (B, 1, 1, S) keys
        for layer in self.encoder:
            x, qkv = layer(x, mask, bias)
            if record is not None:
                record["enc_self"].append(qkv)
        return self.drop(self.enc_norm(x))

    def decode(self, tokens, state, record=None):
        """Run the decoder over the next T positions, given the cached ones.

        tokens (B, T): decoder inputs for positions t0 .. t0+T-1, where t0 = the number of
        positions in the state's cache (0 after `start`). Teacher forcing passes all of tgt_in at
        once; `step` passes one token. Returns the final decoder states (B, T, D), the last layer's
        cross-attention averaged over heads (B, T, S), and the state with the grown cache.
        """
        T = tokens.size(1)
        t0 = state["dec0.self_k"].size(2)
        tokens = tokens.masked_fill(tokens == BOS, PAD)               # T5's decoder starts from PAD
        x = self.drop(self.embed(tokens))                             # (B, T, D)
        bias = self.dec_position(T, t0 + T, offset=t0)                # (1, heads, T, t0+T)
        q_pos = torch.arange(t0, t0 + T, device=tokens.device)[:, None]
        k_pos = torch.arange(t0 + T, device=tokens.device)[None, :]
        causal = k_pos <= q_pos                                       # (T, t0+T) True = may attend
        src_mask = state["src_mask"][:, None, None, :]                # (B, 1, 1, S)
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            x, cross_weights, k, v, qkv = layer(
                x, state[f"dec{i}.self_k"], state[f"dec{i}.self_v"], causal, bias,
                state[f"dec{i}.cross_k"], state[f"dec{i}.cross_v"], src_mask)
            state[f"dec{i}.self_k"], state[f"dec{i}.self_v"] = k, v
            if record is not None:
                record["dec_self"].append(qkv["self"])
                record["cross"].append(qkv["cross"])
        y = self.drop(self.dec_norm(x))                               # (B, T, D)
        return y, cross_weights.mean(1), state

    def output(self, y):
        """Decoder states (..., D) -> logits (..., V). Tied: (y * d_model^-0.5) embedding^T."""
        if self.lm_head is None:
            return F.linear(y * self.cfg.d_model ** -0.5, self.embed.weight)
        return self.lm_head(y)

    # -- the interface -------------------------------------------------------------------------

    def start(self, src, src_mask, record=None):
        """Encode the source once; compute every layer's cross-attention keys/values; start empty
        self-attention caches. src, src_mask (B, S) -> state (see the class docstring)."""
        memory = self.encode(src, src_mask, record)
        B, heads, d_kv = src.size(0), self.cfg.heads, self.cfg.d_kv
        state = {"memory": memory, "src_mask": src_mask}
        for i, layer in enumerate(self.decoder):
            cross_k, cross_v = layer.cross_attn.keys_values(memory)  # (B, heads, S, d_kv)
            state[f"dec{i}.cross_k"], state[f"dec{i}.cross_v"] = cross_k, cross_v
            state[f"dec{i}.self_k"] = cross_k.new_zeros(B, heads, 0, d_kv)  # empty: no position yet
            state[f"dec{i}.self_v"] = cross_k.new_zeros(B, heads, 0, d_kv)
        return state

    def step(self, prev, state):
        """prev (B,) the previous tokens (BOS first, read as PAD) -> log-probs (B, V) float32,
        cross-attention (B, S), and the state with one more cached position."""
        y, attn, state = self.decode(prev[:, None], state)            # (B, 1, D), (B, 1, S)
        logp = torch.log_softmax(self.output(y[:, 0]).float(), dim=-1)
        return logp, attn[:, 0], state

    def forward(self, src, src_mask, tgt_in, return_qkv=False):
        """Teacher forcing. src, src_mask (B, S); tgt_in (B, T) = [BOS y1 .. yn], PAD-padded ->
        logits (B, T, V) and the last layer's cross-attention averaged over heads (B, T, S).

        return_qkv=True adds a third result for the relation losses of kd_losses.py:
            {"enc_self": [per encoder layer {"q", "k", "v"}, each (B, heads, S, d_kv)],
             "dec_self": [per decoder layer {"q", "k", "v"}, each (B, heads, T, d_kv)],
             "cross":    [per decoder layer {"q": (B, heads, T, d_kv), "k", "v": (B, heads, S, d_kv)}],
             "src_mask": (B, S), "tgt_mask": (B, T) = tgt_in != PAD}      (True = real token)
        These are the tensors the layers compute anyway: asking for them costs nothing.
        """
        record = {"enc_self": [], "dec_self": [], "cross": []} if return_qkv else None
        state = self.start(src, src_mask, record)
        y, attn, _ = self.decode(tgt_in, state, record)
        logits = self.output(y)                                       # (B, T, V)
        if not return_qkv:
            return logits, attn
        record["src_mask"], record["tgt_mask"] = src_mask, tgt_in != PAD
        return logits, attn, record


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints
# ---------------------------------------------------------------------------------------------

ARCHS = {"lstm": (LSTMConfig, Seq2Seq), "t5": (T5Config, T5Model)}


def build_model(arch, config):
    """A fresh model from an architecture name and a config dict (as stored in checkpoints)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    config_cls, model_cls = ARCHS[arch]
    return model_cls(config_cls(**config))


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(obj, path):
    """torch.save to PATH.tmp, then rename: a crash never leaves a half-written checkpoint."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a seqkd checkpoint dict with torch.load(weights_only=True)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found: give the path of a .pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, or a pickle that holds more than weights
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}): "
                        "is it a seqkd checkpoint written by train.py?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "seqkd" or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not a seqkd checkpoint (no model weights): "
                        "give a file written by train.py or prune.py")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model a checkpoint describes, load its weights, and put it in eval mode."""
    model = build_model(ckpt["arch"], ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its {ckpt['arch']} config: {first}") from None
    return model.to(device).eval()


def pick_device(name=None):
    """'auto' (or None): CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)
