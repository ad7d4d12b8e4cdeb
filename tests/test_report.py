"""Tests for report.py: the Table 1 columns and the attention heat map, on the hand-made
table model of test_report.py."""
import math
import os
import sys

import pytest
import torch
from sacrebleu.metrics import CHRF

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import report  # noqa: E402
from test_beam import VOCAB, L, TableModel  # noqa: E402


def test_p_t_equals_y_hat_is_the_product_of_table_probabilities():
    model = TableModel()
    r = report.table1_report(model, VOCAB, VOCAB, ["a", "b b", ""], ["b", "a b", "a"], beam=2)
    assert r["sentences"] == 2                               # the pair with an empty side is out
    # greedy: "a" (p = .5 * .4), "" (p = .55); beam 2: "b" (.4 * .9), "" (.55)
    assert r["p_greedy"] == pytest.approx((.5 * .4 + .55) / 2, abs=1e-6)
    assert r["p_beam"] == pytest.approx((.4 * .9 + .55) / 2, abs=1e-6)
    # perplexity on the references "b" (.4 * .9, 2 tokens) and "a b" (.45 * .9 * .9, 3 tokens)
    assert r["ppl"] == pytest.approx(math.exp(-(L(.36) + L(.3645)) / 5), rel=1e-5)
    assert "BLEU" in report.format_report(r) and "nrefs:1" in r["bleu_signature"]
    # the outputs themselves, their chrF (sacrebleu's), and the references they align with
    assert r["hyps_greedy"] == ["a", ""] and r["hyps_beam"] == ["b", ""] and r["refs"] == ["b", "a b"]
    assert r["chrf_beam"] == pytest.approx(CHRF().corpus_score(["b", ""], [["b", "a b"]]).score)
    assert "nc:6|nw:0" in r["chrf_signature"] and "| chrF |" in report.format_report(r)


def test_heatmap_rows_columns_and_shades():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.1, 0.2, 0.7]])
    text = report.heatmap(w, ["das", "Haus", "."], ["the", "house", "</s>"])
    lines = text.split("\n")
    assert len(lines) == 4 + 1 + 3                          # header ("Haus"), rule, 3 targets
    assert [line.split("│")[0].strip() for line in lines[5:]] == ["the", "house", "</s>"]
    body = [line.split("│")[1] for line in lines[5:]]
    assert body == ["██    ", "  ▒▒▒▒", "  ░░▓▓"]
    assert lines[0].split("│")[1] == "d H . " and lines[3].split("│")[1] == "  s   "


def test_show_attention_of_a_translation():
    text = report.show_attention(TableModel(), VOCAB, VOCAB, "a b", beam=2)
    lines = text.split("\n")
    assert lines[1] == "translation: b"
    assert lines[-1].endswith("</s> │▒▒▒▒") and lines[-2].endswith("b │▒▒▒▒")



def test_paired_bootstrap_separates_a_real_difference_from_noise():
    """100 sentences. A system right where the baseline is wrong on 60 of them differs (p < 0.05);
    one that differs on a single sentence does not; identical outputs give p = 1."""
    refs = [f"the cat number {i} sat on the red mat" for i in range(100)]
    baseline = [r if i % 5 < 2 else f"a dog {i} ran" for i, r in enumerate(refs)]     # 40 of 100 right
    better = [r if i % 5 < 2 or i < 80 else b for i, (r, b) in enumerate(zip(refs, baseline))]
    one_more = [refs[2] if i == 2 else b for i, b in enumerate(baseline)]
    one_more[2] = refs[2] + " today"
    s, b, p = report.paired_bootstrap(baseline, better, refs)
    assert s > b and p < 0.05
    s, b, p = report.paired_bootstrap(baseline, one_more, refs)
    assert abs(s - b) < 2 and p > 0.05
    assert report.paired_bootstrap(baseline, baseline, refs)[2] == 1.0
