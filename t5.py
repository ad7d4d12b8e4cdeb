"""A T5-like Transformer: Raffel et al. (2020), "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.1. T5Model implements the decoding interface
described in model.py's docstring.

An encoder-decoder Transformer (Vaswani et al. 2017) with T5's changes, written from the paper:
  - one token embedding shared by the encoder input, the decoder input and (tied) the output
    layer; a tied output is scaled by d_model^-0.5 (so logits start with unit variance);
  - pre-norm residual blocks  x = x + dropout(sublayer(norm(x))), with a final norm after each
    stack; the norm is RMS norm (a learned scale only: no bias, no mean subtraction);
  - no bias terms anywhere;
  - no absolute positions: each attention logit gets a learned scalar per head that depends on
    the bucketed key-minus-query distance (32 buckets, logarithmic up to 128). The bias table
    is computed once per stack (T5 keeps it in the stack's first layer) and added in every
    layer of that stack; cross-attention gets none;
  - attention logits are NOT divided by sqrt(d_kv): T5 folds that factor into the initial
    scale of the query weights (see T5Model._init_weights);
  - feed-forward: ReLU (T5 v1.0) or gated GELU (T5 v1.1), a config choice;
  - dropout on the embeddings, on the attention weights, inside the feed-forward (after the
    activation), on every sublayer output before the residual add, and after each final norm.

Decoder start token. T5 starts the decoder with PAD; seqkd's batches (data.collate) and
beam.py start it with BOS. Rather than change either, the T5 decoder READS BOS AS PAD: every
decoder input token equal to BOS is replaced by PAD before the embedding lookup, in forward
and in step alike (BOS never occurs elsewhere in tgt_in). The embedding has no padding_idx,
so the PAD row is an ordinary trained vector: it is the start-of-decoding embedding.

Decoder masks. Decoder self-attention is causal (position t sees positions <= t). That is all
the masking it needs: target padding only ever follows the real tokens, so a real position
never sees a padded one. (Target padding is not a usable mask anyway: the start token IS PAD.)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import BOS, PAD, UserError


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
# relation losses of relation_losses.py split into relation heads.
T5_PRESETS = {
    # the size of T5-small: 6 + 6 layers, d_model 512, 8 heads of 64, d_ff 2048
    "t5-teacher": dict(layers=6, d_model=512, heads=8, d_kv=64, d_ff=2048, dropout=0.1),
    # students: 6 + 6 layers at width 384, and 3 + 3 layers at width 256
    "t5-student": dict(layers=6, d_model=384, heads=6, d_kv=64, d_ff=1536, dropout=0.1),
    "t5-student-small": dict(layers=3, d_model=256, heads=4, d_kv=64, d_ff=1024, dropout=0.1),
    "t5-builtin": dict(layers=2, d_model=128, heads=4, d_kv=32, d_ff=512, dropout=0.1),  # built-in corpus
    "t5-tiny": dict(layers=2, d_model=16, heads=2, d_kv=8, d_ff=32, dropout=0.0),        # unit tests
}


def check_t5_config(cfg):
    """Raise UserError for a T5Config that cannot be built (called by model.make_config)."""
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
    relative_position: long tensor (any shape) of key position - query position -> bucket ids, a
    long tensor of the same shape with values in [0, num_buckets).
    bidirectional (encoder): half of the buckets are for keys at or before the query, half for
        keys after it (offset num_buckets / 2).
    causal (decoder): all buckets are for keys at or before the query; keys after it are masked
        anyway and share bucket 0.
    Within the n buckets of one direction, distances 0 .. n/2 - 1 each get their own bucket;
    larger distances d share logarithmically wider buckets,
        n/2 + floor((n - n/2) * log(d / (n/2)) / log(max_distance / (n/2))),
    and every distance from max_distance on falls into the last bucket n - 1.
    Example, encoder (n = 16): distance 12 -> 8 + floor(8 * log(1.5) / log(16)) = 9."""
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
    """T5's layer norm: y = w * x / sqrt(mean(x^2) + eps), a learned scale w only (no bias, no mean
    subtraction); the mean of squares in float32 even under bf16/fp16 autocast. x (..., D) -> (..., D)."""

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
        self.wi_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.ff == "gated-gelu" else None
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.wi_gate is None:
            h = F.relu(self.wi(x))                                        # (B, T, d_ff)
        else:
            h = F.gelu(self.wi_gate(x), approximate="tanh") * self.wi(x)  # (B, T, d_ff)
        return self.wo(self.drop(h))


class Attention(nn.Module):
    """Multi-head attention, T5 style: no biases, logits not divided by sqrt(d_kv). Keys and values
    are projected by `keys_values` separately from the queries, so a decoder can cache them: the
    cross-attention keys once per sentence, the self-attention keys one new position per step."""

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
        -> the output (B, T, D), the attention weights (B, heads, T, S), the queries (B, heads, T, d_kv)."""
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
        {"self": {"q", "k", "v"}, "cross": {"q", "k", "v"}}."""
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)                          # (B, heads, T, d_kv) new
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, heads, t0+T, d_kv)
        a, _, q = self.self_attn(h, k, v, causal, bias)
        x = x + self.drop(a)
        c, cross_weights, cross_q = self.cross_attn(self.cross_norm(x), cross_k, cross_v, src_mask)
        x = x + self.drop(c)
        x = x + self.drop(self.ff(self.ff_norm(x)))
        qkv = {"self": {"q": q, "k": k, "v": v}, "cross": {"q": cross_q, "k": cross_k, "v": cross_v}}
        return x, cross_weights, k, v, qkv


class T5Model(nn.Module):
    """The T5-like encoder-decoder behind the decoding interface of model.py's docstring.
    Decoder state (every entry batch-first, so `reorder` is one index_select per entry):
        memory        (B, S, D)             the encoder output
        src_mask      (B, S)                True = real source token
        dec{i}.self_k, dec{i}.self_v    (B, heads, t, d_kv)   decoder layer i's self-attention
                                            keys/values of the t positions decoded so far (grow)
        dec{i}.cross_k, dec{i}.cross_v  (B, heads, S, d_kv)   its cross-attention keys/values,
                                            computed once from the encoder output"""

    arch = "t5"

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
        self.decoder = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.dec_layers or cfg.layers)])
        # the state entries fixed by the source: the encoder output and every cross-attention's K, V
        self.source_state = ("memory", "src_mask", *(f"dec{i}.cross_{kv}" for i in range(len(self.decoder))
                                                     for kv in "kv"))
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
        cross-attention averaged over heads (B, T, S), and the state with the grown cache."""
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

    @staticmethod
    def reorder(state, index):
        """Select rows of every state tensor: index (B',) -> a state of batch B'."""
        return {k: v.index_select(0, index) for k, v in state.items()}

    def forward(self, src, src_mask, tgt_in, return_qkv=False, encoder_only=False):
        """Teacher forcing. src, src_mask (B, S); tgt_in (B, T) = [BOS y1 .. yn], PAD-padded ->
        logits (B, T, V) and the last layer's cross-attention averaged over heads (B, T, S).

        return_qkv=True adds a third result for the relation losses of relation_losses.py:
            {"enc_self": [per encoder layer {"q", "k", "v"}, each (B, heads, S, d_kv)],
             "dec_self": [per decoder layer {"q", "k", "v"}, each (B, heads, T, d_kv)],
             "cross":    [per decoder layer {"q": (B, heads, T, d_kv), "k", "v": (B, heads, S, d_kv)}],
             "src_mask": (B, S), "tgt_mask": (B, T) = tgt_in != PAD}      (True = real token)
        These are the tensors the layers compute anyway: asking for them costs nothing.
        encoder_only=True runs the encoder alone, for relation terms of the encoder only, and returns
        (None, None, {"enc_self", "src_mask"}): no decoder and no output layer."""
        if encoder_only:
            record = {"enc_self": [], "src_mask": src_mask}
            self.encode(src, src_mask, record)
            return None, None, record
        record = {"enc_self": [], "dec_self": [], "cross": []} if return_qkv else None
        state = self.start(src, src_mask, record)
        y, attn, _ = self.decode(tgt_in, state, record)
        logits = self.output(y)                                       # (B, T, V)
        if not return_qkv:
            return logits, attn
        record["src_mask"], record["tgt_mask"] = src_mask, tgt_in != PAD
        return logits, attn, record
