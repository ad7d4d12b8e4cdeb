"""Tests for beam.py: searches on a hand-made probability table, files, reports, the CLI.

The fake model's next-token distribution depends only on the previous token and on the first
source token (its "context"), so every expected hypothesis and score below is computed by hand
from the tables. Vocabulary: <pad>=0 <unk>=1 <s>=2 </s>=3 a=4 b=5 c=6.
"""
import json
import math
import os
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import beam  # noqa: E402
import data  # noqa: E402
import model as seqmodel  # noqa: E402
from data import BOS, EOS, SPECIALS  # noqa: E402

A, B_, C = 4, 5, 6          # token ids of the words a, b, c
V = 7


def table(rows):
    """rows: {prev token: {next token: prob}} -> (V, V) probability table. Rows not given
    (PAD, UNK, EOS as the previous token) are uniform, so teacher forcing never sees NaN."""
    t = torch.full((V, V), 1.0 / V)
    for prev, dist in rows.items():
        t[prev] = 0.0
        for tok, p in dist.items():
            t[prev, tok] = p
        assert abs(t[prev].sum().item() - 1.0) < 1e-6
    return t


TABLES = torch.stack([
    # context 0 (source starts with "a"): greedy takes a (.5) then </s> (.4): p = .2,
    # but b </s> has p = .4 * .9 = .36 -> beam 2 finds it.
    table({BOS: {A: .5, B_: .4, EOS: .1},
           A: {EOS: .4, B_: .35, C: .25},
           B_: {EOS: .9, C: .1},
           C: {EOS: 1.0}}),
    # context 1 ("b ..."): "" has p = .55 (best raw sum); "a b" has p = .45 * .9 * .9 = .3645
    # over 3 tokens, the best per-token score -> length normalisation prefers it.
    table({BOS: {EOS: .55, A: .45},
           A: {B_: .9, EOS: .1},
           B_: {EOS: .9, C: .1},
           C: {EOS: 1.0}}),
    # context 2 ("c ..."): never emits </s>; a is always the most likely word (.6).
    table({BOS: {A: .6, B_: .4}, A: {A: .6, B_: .4}, B_: {A: .6, B_: .4}, C: {A: .6, B_: .4}}),
])


class TableModel(nn.Module):
    """p(y_t | y_<t, x) = TABLES[context(x)][y_{t-1}], context = first source token - 4.
    Attention is uniform over the real source tokens. Implements start/step/reorder/forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logp", TABLES.log())          # (contexts, V, V), log 0 = -inf

    def start(self, src, src_mask):
        return {"ctx": src[:, 0] - A, "src_mask": src_mask}

    def step(self, prev, state):
        mask = state["src_mask"].float()
        return self.logp[state["ctx"], prev], mask / mask.sum(1, keepdim=True), state

    @staticmethod
    def reorder(state, index):
        return {k: v.index_select(0, index) for k, v in state.items()}

    def forward(self, src, src_mask, tgt_in):
        ctx = (src[:, 0] - A).unsqueeze(1).expand_as(tgt_in)
        mask = src_mask.float()
        attn = (mask / mask.sum(1, keepdim=True)).unsqueeze(1).expand(-1, tgt_in.size(1), -1)
        return self.logp[ctx, tgt_in], attn                  # (B, T, V), (B, T, S)


VOCAB = data.WordVocab(SPECIALS + ["a", "b", "c"])
L = math.log


def src_batch(seqs):
    return beam.pad_sources(seqs, "cpu")


# ---------------------------------------------------------------------------------------------
# Searches on the hand-made table
# ---------------------------------------------------------------------------------------------

def test_greedy_is_not_optimal_and_beam_2_finds_the_better_hypothesis():
    model = TableModel()
    src, mask = src_batch([[A]])
    hyps, scores, _ = beam.greedy(model, src, mask)
    assert hyps == [[A]]
    assert scores[0].item() == pytest.approx(L(.5) + L(.4), abs=1e-6)      # p = .2
    out = beam.beam_search(model, src, mask, beam=2, nbest=1)
    assert [toks for toks, _ in out[0]] == [[B_]]
    assert out[0][0][1] == pytest.approx(L(.4) + L(.9), abs=1e-6)           # p = .36


def test_nbest_list_order_and_scores():
    model = TableModel()
    src, mask = src_batch([[A]])
    # beam 3, step 1: a .5, b .4, </s> .1 (finished: ""); step 2: b</s> .36, a</s> .2, a b .175
    # -> 3 finished hypotheses, search ends.
    out = beam.beam_search(model, src, mask, beam=3, nbest=3)[0]
    assert [toks for toks, _ in out] == [[B_], [A], []]
    expected = [L(.4) + L(.9), L(.5) + L(.4), L(.1)]
    assert [s for _, s in out] == pytest.approx(expected, abs=1e-6)
    # the best entry does not depend on how many we ask for
    assert beam.beam_search(model, src, mask, beam=3, nbest=1)[0] == out[:1]


def test_beam_1_equals_greedy():
    model = TableModel()
    seqs = [[A], [B_, B_], [C, A, B_], [A, C]]
    src, mask = src_batch(seqs)
    hyps, scores, _ = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=2)
    out = beam.beam_search(model, src, mask, beam=1, max_len_a=1.0, max_len_b=2)
    assert [entries[0][0] for entries in out] == hyps
    assert [entries[0][1] for entries in out] == scores.tolist()
    assert hyps == [[A], [], [A] * 5, [A]]


def test_sentence_decodes_the_same_alone_and_in_a_batch():
    model = TableModel()
    seqs = [[A], [B_, B_], [C, A, B_], [A, C, C, C]]
    src, mask = src_batch(seqs)
    batched = beam.beam_search(model, src, mask, beam=3, nbest=2, max_len_a=1.0, max_len_b=1)
    g_hyps, g_scores, g_attn = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=1)
    for i, s in enumerate(seqs):
        one_src, one_mask = src_batch([s])
        assert beam.beam_search(model, one_src, one_mask, beam=3, nbest=2,
                                max_len_a=1.0, max_len_b=1)[0] == batched[i]
        h, sc, at = beam.greedy(model, one_src, one_mask, max_len_a=1.0, max_len_b=1)
        assert h[0] == g_hyps[i] and sc[0].item() == g_scores[i].item()
        assert torch.equal(at[0], g_attn[i])
        assert g_attn[i].shape == (len(g_hyps[i]) + (len(g_hyps[i]) < len(s) + 1), len(s))


def test_max_length_stops_a_model_that_never_emits_eos():
    model = TableModel()
    src, mask = src_batch([[C, A, A]])                    # S = 3, max_len = 1.0 * 3 + 2 = 5
    hyps, scores, attn = beam.greedy(model, src, mask, max_len_a=1.0, max_len_b=2)
    assert hyps == [[A] * 5] and scores[0].item() == pytest.approx(5 * L(.6), abs=1e-5)
    assert attn[0].shape == (5, 3)
    out = beam.beam_search(model, src, mask, beam=2, nbest=2, max_len_a=1.0, max_len_b=2)[0]
    assert [len(toks) for toks, _ in out] == [5, 5]       # closed as they were, no </s>
    assert out[0] == ([A] * 5, pytest.approx(5 * L(.6), abs=1e-5))
    assert out[1][1] < out[0][1]


def test_length_normalisation_changes_the_ranking():
    model = TableModel()
    src, mask = src_batch([[B_]])
    raw = beam.beam_search(model, src, mask, beam=3, nbest=1)[0]
    assert raw == [([], pytest.approx(L(.55), abs=1e-6))]          # "" beats "a b" (.3645)
    # beam 3 with normalisation: "" (-0.598 / 1), "a" (log .045 / 2), "a b" (log .3645 / 3)
    norm = beam.beam_search(model, src, mask, beam=3, nbest=3, length_norm=True)[0]
    assert [toks for toks, _ in norm] == [[A, B_], [], [A]]
    assert [s for _, s in norm] == pytest.approx(
        [L(.45 * .9 * .9) / 3, L(.55) / 1, L(.45 * .1) / 2], abs=1e-6)


def test_score_equals_search_score_and_table_products():
    model = TableModel()
    got = beam.score_pairs(model, [[A], [A], [B_, A]], [[B_], [A, C], [A, B_]])
    want = [L(.4 * .9), L(.5 * .25 * 1.0), L(.45 * .9 * .9)]
    assert got == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Files: line order, empty lines, shards, resume, n-best, Seq-Inter
# ---------------------------------------------------------------------------------------------

LINES = ["a", "", "b b", "c", "a c", "", "b", "a a"]
# beam 2, max length 2 * len + 10: a.. -> "b"; b.. -> "" (empty translation); c -> a x 12
EXPECTED = ["b", "", "", " ".join(["a"] * 12), "b", "", "", "b"]


def run_file(tmp_path, name, **kw):
    out = str(tmp_path / name)
    kw.setdefault("beam", 2)
    beam.translate_file(TableModel(), VOCAB, VOCAB, LINES, out, progress=False, **kw)
    with open(out, encoding="utf-8") as f:
        return f.read()


def test_generation_keeps_line_order_and_empty_lines(tmp_path):
    text = run_file(tmp_path, "out.txt", chunk_size=3, batch_size=2)
    assert text == "".join(line + "\n" for line in EXPECTED)
    assert not os.path.exists(tmp_path / "out.txt.partial")


def test_two_shards_joined_equal_unsharded(tmp_path):
    whole = run_file(tmp_path, "all.txt")
    parts = [run_file(tmp_path, f"part{i}.txt", shard=(i, 2), chunk_size=3) for i in (1, 2)]
    assert parts[0] + parts[1] == whole
    assert parts[0].count("\n") == 4
    assert beam.shard_range(10, 1, 3) == (0, 3) and beam.shard_range(10, 3, 3) == (6, 10)


def test_resume_after_interrupt_gives_the_same_file(tmp_path, monkeypatch):
    whole = run_file(tmp_path, "all.txt")
    # Interrupt right after chunk 2 (lines 3-5) is written but before it is recorded as done:
    # the resumed run must drop those lines and translate them again.
    real, calls = beam._write_json_atomic, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(beam, "_write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_file(tmp_path, "out.txt", chunk_size=3)
    partial = tmp_path / "out.txt.partial"
    assert partial.read_text(encoding="utf-8") == "".join(x + "\n" for x in EXPECTED[:6])
    assert json.loads((tmp_path / "out.txt.partial.json").read_text())["done"] == 3
    monkeypatch.setattr(beam, "_write_json_atomic", real)
    with pytest.raises(data.UserError, match="other settings"):   # other flags: refuse
        run_file(tmp_path, "out.txt", chunk_size=3, beam=3)
    chunks = []
    real_decode = beam.decode_ids

    def counting(*args, **kwargs):
        chunks.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(beam, "decode_ids", counting)
    assert run_file(tmp_path, "out.txt", chunk_size=3) == whole
    assert len(chunks) == 2                                  # chunks 2 and 3 only
    assert not partial.exists()


def test_nbest_file_format(tmp_path):
    text = run_file(tmp_path, "nbest.txt", nbest=2)
    lines = text.splitlines()
    assert lines[0] == f"0 ||| b ||| {L(.36):.4f}"
    assert lines[1] == f"0 ||| a ||| {L(.2):.4f}"
    assert lines[2] == "1 |||  ||| 0.0000"                   # empty source: one empty entry
    assert beam.first_best(lines, 2) == EXPECTED


def test_seq_inter_selects_the_entry_closest_to_the_reference(tmp_path):
    refs = ["a", "", "a b", "x", "b", "", "", "c"]
    text = run_file(tmp_path, "inter.txt", nbest=2, refs=refs, select=True)
    lines = text.splitlines()
    assert len(lines) == len(LINES)
    assert lines[0] == "a"            # n-best of "a" is [b, a]: the reference picks "a"
    assert lines[4] == "b"            # ... and here "b"
    assert lines[2] == "a"            # n-best of "b b" is ["", "a"]: reference "a b" -> "a"
    assert lines[7] == "b"            # no entry matches the reference "c": the first (best)
    assert lines[1] == ""


# ---------------------------------------------------------------------------------------------
# Reports: Table 1 columns, attention heat map
# ---------------------------------------------------------------------------------------------

def test_p_t_equals_y_hat_is_the_product_of_table_probabilities():
    model = TableModel()
    r = beam.table1_report(model, VOCAB, VOCAB, ["a", "b b", ""], ["b", "a b", "a"], beam=2)
    assert r["sentences"] == 2                               # the pair with an empty side is out
    # greedy: "a" (p = .5 * .4), "" (p = .55); beam 2: "b" (.4 * .9), "" (.55)
    assert r["p_greedy"] == pytest.approx((.5 * .4 + .55) / 2, abs=1e-6)
    assert r["p_beam"] == pytest.approx((.4 * .9 + .55) / 2, abs=1e-6)
    # perplexity on the references "b" (.4 * .9, 2 tokens) and "a b" (.45 * .9 * .9, 3 tokens)
    assert r["ppl"] == pytest.approx(math.exp(-(L(.36) + L(.3645)) / 5), rel=1e-5)
    assert "BLEU" in beam.format_report(r) and "nrefs:1" in r["bleu_signature"]


def test_heatmap_rows_columns_and_shades():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.1, 0.2, 0.7]])
    text = beam.heatmap(w, ["das", "Haus", "."], ["the", "house", "</s>"])
    lines = text.split("\n")
    assert len(lines) == 4 + 1 + 3                          # header ("Haus"), rule, 3 targets
    assert [line.split("│")[0].strip() for line in lines[5:]] == ["the", "house", "</s>"]
    body = [line.split("│")[1] for line in lines[5:]]
    assert body == ["██    ", "  ▒▒▒▒", "  ░░▓▓"]
    assert lines[0].split("│")[1] == "d H . " and lines[3].split("│")[1] == "  s   "


def test_show_attention_of_a_translation():
    text = beam.show_attention(TableModel(), VOCAB, VOCAB, "a b", beam=2)
    lines = text.split("\n")
    assert lines[1] == "translation: b"
    assert lines[-1].endswith("</s> │▒▒▒▒") and lines[-2].endswith("b │▒▒▒▒")


# ---------------------------------------------------------------------------------------------
# A real (tiny, random) LSTM: consistency with teacher forcing, and the command line
# ---------------------------------------------------------------------------------------------

SRC = ["the cat sees a dog", "", "a dog", "the dog sees the cat today", "cat"]
REF = ["die katze sieht einen hund", "", "ein hund", "der hund sieht heute die katze", "katze"]


def tiny_lstm(seed=0):
    torch.manual_seed(seed)
    src_vocab = data.WordVocab.build(SRC, 20)
    tgt_vocab = data.WordVocab.build(REF, 20)
    cfg = seqmodel.make_config("lstm", "tiny", src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab))
    m = seqmodel.build_model("lstm", asdict(cfg)).eval()
    with torch.no_grad():
        m.generator.bias[EOS] += 1.5      # ends most sentences before the maximum length
    return m, src_vocab, tgt_vocab, cfg


def test_real_model_search_scores_equal_teacher_forced_scores():
    m, sv, tv, _ = tiny_lstm()
    seqs = [sv.encode(s) for s in SRC if s]
    src, mask = beam.pad_sources(seqs, "cpu")
    hyps, scores, _ = beam.greedy(m, src, mask)
    out = beam.beam_search(m, src, mask, beam=3, nbest=3)
    max_len = beam.max_lengths(mask, 2.0, 10).tolist()
    pairs = [(s, h, sc) for s, h, sc, n in zip(seqs, hyps, scores.tolist(), max_len) if len(h) < n]
    pairs += [(s, h, sc) for s, entries, n in zip(seqs, out, max_len)
              for h, sc in entries if len(h) < n]
    assert len(pairs) >= 6                                   # ended with </s>: include its log p
    forced = beam.score_pairs(m, [p[0] for p in pairs], [p[1] for p in pairs])
    assert forced == pytest.approx([p[2] for p in pairs], abs=1e-4)
    assert [e[0][0] for e in beam.beam_search(m, src, mask, beam=1)] == hyps
    for i, s in enumerate(seqs):                             # alone == in a batch
        one = beam.beam_search(m, *beam.pad_sources([s], "cpu"), beam=3, nbest=3)[0]
        assert [h for h, _ in one] == [h for h, _ in out[i]]
        assert [x for _, x in one] == pytest.approx([x for _, x in out[i]], abs=1e-4)


@pytest.fixture
def ckpt_files(tmp_path):
    m, sv, tv, cfg = tiny_lstm()
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
            "vocab": {"src": sv.to_dict(), "tgt": tv.to_dict()}, "model": m.state_dict(),
            "args": {"bleu_tokenize": "none"}}
    seqmodel.save_checkpoint(ckpt, tmp_path / "model.pt")
    (tmp_path / "src.txt").write_text("\n".join(SRC) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REF) + "\n", encoding="utf-8")
    return {k: str(tmp_path / f) for k, f in
            (("ckpt", "model.pt"), ("src", "src.txt"), ("ref", "ref.txt"), ("dir", ""))}


def test_cli_translates_in_order_and_prints_bleu(ckpt_files, capsys):
    f = ckpt_files
    out = os.path.join(f["dir"], "hyp.txt")
    result = beam.main(["--ckpt", f["ckpt"], "--src", f["src"], "--ref", f["ref"], "--out", out,
                        "--beam", "3", "--batch-size", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert "BLEU|nrefs:1|case:mixed|eff:no|tok:none" in printed and "source words/s" in printed
    with open(out, encoding="utf-8") as fh:
        hyps = fh.read().split("\n")[:-1]
    assert len(hyps) == len(SRC) and hyps[1] == ""
    m, sv, tv, _ = tiny_lstm()
    assert hyps == beam.translate(m, sv, tv, SRC, beam=3)
    assert result.score == beam.bleu(hyps, REF, "none").score


def test_cli_nbest_report_and_attention(ckpt_files, capsys):
    f = ckpt_files
    base = ["--ckpt", f["ckpt"], "--src", f["src"], "--no-progress"]
    beam.main(base + ["--beam", "3", "--nbest", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0 ||| ") and {int(x.split(" ||| ")[0]) for x in lines} == set(range(5))
    report_json = os.path.join(f["dir"], "report.json")
    beam.main(base + ["--ref", f["ref"], "--report", "--json", report_json, "--beam", "2"])
    assert "p(t = ŷ)" in capsys.readouterr().out
    with open(report_json) as fh:
        r = json.load(fh)
    assert r["sentences"] == 4 and 0 < r["p_greedy"] <= 1 and r["ppl"] > 1 and r["params"] > 0
    beam.main(base + ["--show-attention", "4"])
    text = capsys.readouterr().out
    assert text.startswith("source: the dog sees the cat today") and "</s> │" in text


@pytest.mark.parametrize("flags, message", [
    (["--nbest", "3", "--beam", "2"], "--nbest 3 needs --beam"),
    (["--shard", "3/2"], "--shard 3/2"),
    (["--select", "sentence-bleu", "--nbest", "2"], "--select sentence-bleu needs --ref"),
    (["--report"], "--report needs --ref"),
    (["--show-attention", "9"], "--show-attention 9"),
])
def test_cli_bad_flags_give_one_line_errors(ckpt_files, flags, message):
    f = ckpt_files
    with pytest.raises(SystemExit) as e:
        beam.main(["--ckpt", f["ckpt"], "--src", f["src"], "--no-progress"] + flags)
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_reference_with_other_line_count_is_refused(ckpt_files, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("ein hund\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="has 1 lines but --src"):
        beam.main(["--ckpt", ckpt_files["ckpt"], "--src", ckpt_files["src"], "--ref", str(short)])


def test_cli_seq_inter_and_shard(ckpt_files, capsys):
    f = ckpt_files
    base = ["--ckpt", f["ckpt"], "--src", f["src"], "--ref", f["ref"], "--no-progress"]
    inter = os.path.join(f["dir"], "inter.txt")
    beam.main(base + ["--beam", "3", "--nbest", "3", "--select", "sentence-bleu", "--out", inter])
    assert "not a test score" in capsys.readouterr().out
    with open(inter, encoding="utf-8") as fh:
        assert len(fh.read().split("\n")[:-1]) == len(SRC)       # one line per source line
    parts = []
    for i in (1, 2):
        out = os.path.join(f["dir"], f"part{i}.txt")
        beam.main(base + ["--beam", "2", "--shard", f"{i}/2", "--out", out])
        with open(out, encoding="utf-8") as fh:
            parts.append(fh.read())
    m, sv, tv, _ = tiny_lstm()
    assert "".join(parts) == "".join(h + "\n" for h in beam.translate(m, sv, tv, SRC, beam=2))
