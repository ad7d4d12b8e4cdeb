"""The LSTM model of Luong, Pham & Manning (2015), "Effective Approaches to Attention-based NMT".

A stacked LSTM encoder (optionally bidirectional) and decoder, global attention (dot / general /
concat, eq. 8), the attentional hidden state h~_t = tanh(W_c [c_t; h_t]) (eq. 5) and input
feeding (sec. 3.3). Seq2Seq implements the decoding interface described in model.py's docstring.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from data import PAD, UserError


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
    "builtin": dict(layers=1, hidden=128, emb_dim=64, bidirectional=True, dropout=0.1),  # built-in corpus
    "tiny": dict(layers=1, hidden=16, emb_dim=8, dropout=0.0),                           # unit tests
}


def check_lstm_config(cfg):
    """Raise UserError for an LSTMConfig that cannot be built (called by model.make_config)."""
    if cfg.attention not in ("dot", "general", "concat"):
        raise UserError(f"--attention {cfg.attention}: choose dot, general or concat")
    if cfg.bidirectional and cfg.hidden % 2:
        raise UserError(f"--hidden {cfg.hidden}: a bidirectional encoder needs an even size")


class Encoder(nn.Module):
    """Embeddings and a stacked (optionally bidirectional) LSTM over the source."""

    def __init__(self, cfg):
        super().__init__()
        per_direction = cfg.hidden // 2 if cfg.bidirectional else cfg.hidden
        self.embed = nn.Embedding(cfg.src_vocab, cfg.emb_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(cfg.emb_dim, per_direction, cfg.layers, batch_first=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0, bidirectional=cfg.bidirectional)
        self.bidirectional = cfg.bidirectional

    def forward(self, src, src_mask):
        """src, src_mask: (B, S) -> memory (B, S, H) and the final (h, c), each (L, B, H).
        The sequences are packed, so padding never enters the recurrence: a sentence gets the
        same encoding alone and in a padded batch."""
        lengths = src_mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(src), lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.rnn(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, H)
        if self.bidirectional:  # (2L, B, H/2) -> (L, B, H): both directions side by side
            h = torch.cat([h[0::2], h[1::2]], dim=-1)
            c = torch.cat([c[0::2], c[1::2]], dim=-1)
        return memory, (h, c)


class DecoderLSTM(nn.Module):
    """The decoder's stacked LSTM, its equations written out (nn.LSTMCell's, gate order i, f, g, o):

        [i; f; g; o] = W_l [x; h_{t-1}] + b_l                      (4H,)   one product per layer
        c_t = σ(f) * c_{t-1} + σ(i) * tanh(g),    h_t = σ(o) * tanh(c_t)

    Layer 1's input is [e_t; h~_{t-1}] (the word and, with input feeding, the previous attentional
    state), so its product splits as W_e e_t + W_1 [h~_{t-1}; h_{t-1}]. The word part depends on
    no earlier step: teacher forcing computes it for all T positions in one product (word_gates);
    only W_1 [h~_{t-1}; h_{t-1}] and the upper layers are computed step by step. One matrix
    [W_ih | W_hh] per layer, not nn.LSTMCell's two, is one product (and one gradient) per step.
    Each product is an nn.Linear, so torch's dynamic int8 quantisation applies to all of them."""

    def __init__(self, emb_dim, feed_dim, hidden, layers, dropout):
        super().__init__()
        inputs = [feed_dim] + [hidden] * (layers - 1)             # per layer, besides h_{t-1}
        self.W_e = nn.Linear(emb_dim, 4 * hidden, bias=False)
        self.W = nn.ModuleList(nn.Linear(n + hidden, 4 * hidden) for n in inputs)   # W_l and b_l
        self.drop = nn.Dropout(dropout)

    def word_gates(self, emb):
        """emb (..., E) -> W_e e (..., 4H): layer 1's share of the word."""
        return self.W_e(emb)

    def forward(self, word_gates, feed, h, c):
        """One step. word_gates (B, 4H); feed (B, H) = h~_{t-1}, or None without input feeding;
        h, c (B, L, H) -> the top layer's h_t (B, H) and the new h, c (B, L, H)."""
        hs, cs = [], []
        for i, W in enumerate(self.W):
            if i == 0:
                x = h[:, 0] if feed is None else torch.cat([feed, h[:, 0]], 1)       # (B, H_f + H)
                gates = word_gates + W(x)                                           # (B, 4H)
            else:
                gates = W(torch.cat([self.drop(hs[-1]), h[:, i]], 1))   # dropout between layers
            i_, f, g, o = gates.chunk(4, 1)
            cs.append(torch.sigmoid(f) * c[:, i] + torch.sigmoid(i_) * torch.tanh(g))
            hs.append(torch.sigmoid(o) * torch.tanh(cs[-1]))
        return hs[-1], torch.stack(hs, 1), torch.stack(cs, 1)


def from_lstm_cells(state):
    """A state dict saved when the decoder was nn.LSTMCell modules (cells.i.weight_ih, weight_hh,
    bias_ih, bias_hh) -> DecoderLSTM's names (rnn.W_e.weight, rnn.W.i.weight, rnn.W.i.bias), so
    that older checkpoints still load. The same weights: W_e = W_ih[:, :E], W_i = [W_ih[:, E:] | W_hh],
    b_i = b_ih + b_hh. Returns the new state and {old name: [new names]} (for pruning masks)."""
    state, renamed, i = dict(state), {}, 0
    while f"cells.{i}.weight_ih" in state:
        w_ih, w_hh = state.pop(f"cells.{i}.weight_ih"), state.pop(f"cells.{i}.weight_hh")
        state[f"rnn.W.{i}.bias"] = state.pop(f"cells.{i}.bias_ih") + state.pop(f"cells.{i}.bias_hh")
        E = state["tgt_embed.weight"].size(1) if i == 0 else 0    # layer 1's first E inputs: the word
        if E:
            state["rnn.W_e.weight"] = w_ih[:, :E].contiguous()
        state[f"rnn.W.{i}.weight"] = torch.cat([w_ih[:, E:], w_hh], 1)
        renamed[f"cells.{i}.weight_ih"] = (["rnn.W_e.weight"] if E else []) + [f"rnn.W.{i}.weight"]
        renamed[f"cells.{i}.weight_hh"] = [f"rnn.W.{i}.weight"]
        i += 1
    return state, renamed


class GlobalAttention(nn.Module):
    """Luong et al. (2015), eq. 8: score(h_t, h̄_s) for every source position s.

        dot:     h_t · h̄_s
        general: h_t · (W_a h̄_s)
        concat:  v_a · tanh(W_a [h_t; h̄_s])  =  v_a · tanh(W_q h_t + W_k h̄_s)

    The part that depends only on the source (`keys`) is computed once per sentence by
    `precompute`, so each decoding step costs one batched product over the source."""

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
    source_state = ("memory", "keys", "src_mask")      # the state entries fixed by the source

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.encoder = Encoder(cfg)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.emb_dim, padding_idx=PAD)
        self.rnn = DecoderLSTM(cfg.emb_dim, H if cfg.input_feed else 0, H, cfg.layers, cfg.dropout)
        self.attention = GlobalAttention(H, cfg.attention)
        self.W_c = nn.Linear(2 * H, H, bias=False)        # h~_t = tanh(W_c [c_t; h_t]), eq. 5
        self.generator = nn.Linear(H, cfg.tgt_vocab)       # p(y_t | y<t, x) = softmax(W_s h~_t), eq. 6
        self.drop = nn.Dropout(cfg.dropout)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    # -- the decoder step shared by training (teacher forcing) and decoding -----------------------

    def _decode_step(self, word_gates, state):
        """One target position. word_gates (B, 4H) = rnn.word_gates(e_t) -> h~_t (B, H),
        a_t (B, S), and the new state."""
        feed = state["feed"] if self.cfg.input_feed else None        # h~_{t-1} (B, H)
        top, h, c = self.rnn(word_gates, feed, state["h"], state["c"])   # (B, H), (B, L, H) x 2
        context, align = self.attention(top, state["keys"], state["memory"], state["src_mask"])
        h_tilde = torch.tanh(self.W_c(torch.cat([context, top], dim=1)))  # eq. 5   (B, H)
        return h_tilde, align, dict(state, h=h, c=c, feed=h_tilde)

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
        h_tilde, align, state = self._decode_step(self.rnn.word_gates(self.tgt_embed(prev)), state)
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
        word_gates = self.rnn.word_gates(self.tgt_embed(tgt_in))   # (B, T, 4H): every t at once
        outputs, aligns = [], []
        for gates_t in word_gates.unbind(1):     # unbind: one backward step for all T slices
            h_tilde, align, state = self._decode_step(gates_t, state)
            outputs.append(h_tilde)
            aligns.append(align)
        h_tilde = self.drop(torch.stack(outputs, 1))       # (B, T, H)
        return self.generator(h_tilde), torch.stack(aligns, 1)
