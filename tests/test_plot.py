"""Tests for plot.py: the SVG of training curves (one circle per evaluation, monotonic values to
monotonic coordinates, a log axis for perplexity), the attention heat map (one cell per weight,
darkest = largest, escaped tokens), and the command line on hand-made logs and tiny real models."""
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import beam  # noqa: E402
import data  # noqa: E402
import model as seqmodel  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
from test_beam import REF, SRC, tiny_lstm  # noqa: E402

NS = {"s": "http://www.w3.org/2000/svg"}


def row(step, bleu, ppl, loss):
    return {"step": step, "epoch": 1 + step // 300, "lr": 1.0, "train_loss": loss, "valid_ppl": ppl,
            "valid_bleu": bleu, "tokens_per_s": 1000.0, "elapsed": step / 10}


RUN_A = [row(100, 1.0, 100.0, 5.0), row(200, 5.0, 10.0, 3.0), row(300, 20.0, 1.0, 2.0), row(400, 30.0, 1.0, 1.5)]
RUN_B = [row(0, 0.5, 90.0, None), row(150, 2.0, 40.0, 4.0), row(350, 12.0, 6.0, 2.5)]


def circles(root, panel):
    return [(float(c.get("cx")), float(c.get("cy"))) for c in root.find(f".//s:g[@id='{panel}']", NS)
            .iterfind(".//s:circle", NS)]


def polyline(root, panel):
    lines = root.find(f".//s:g[@id='{panel}']", NS).findall(".//s:polyline", NS)
    return [[tuple(map(float, p.split(","))) for p in pl.get("points").split()] for pl in lines]


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------

def test_curves_have_one_circle_per_evaluation_in_each_panel():
    root = ET.fromstring(plot.curves_svg({"seed1": RUN_A, "seed2": RUN_B}))
    assert len(circles(root, "valid_bleu")) == len(circles(root, "valid_ppl")) == 7
    assert len(circles(root, "train_loss")) == 6                  # RUN_B's first row has no train loss
    assert len(root.findall(".//s:circle", NS)) == 7 + 7 + 6      # no other circle (the legend has lines)
    assert len(polyline(root, "valid_bleu")) == 2
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "seed1 (4 evaluations)" in texts and "seed2 (3 evaluations)" in texts and "step" in texts


def test_curves_map_monotonic_values_to_monotonic_coordinates():
    root = ET.fromstring(plot.curves_svg({"run": RUN_A}))
    bleu = circles(root, "valid_bleu")
    assert [x for x, _ in bleu] == sorted(x for x, _ in bleu) and len({x for x, _ in bleu}) == 4
    assert all(a[1] > b[1] for a, b in zip(bleu, bleu[1:]))      # BLEU rises: the mark goes up (smaller y)
    assert polyline(root, "valid_bleu") == [pytest.approx(bleu, abs=0.01)]
    loss = circles(root, "train_loss")
    assert all(a[1] < b[1] for a, b in zip(loss, loss[1:]))      # the loss falls: the mark goes down
    ppl_y = [y for _, y in circles(root, "valid_ppl")]           # 100, 10, 1, 1 on a log axis
    assert ppl_y[1] - ppl_y[0] == pytest.approx(ppl_y[2] - ppl_y[1], abs=0.02)   # equal ratios, equal steps
    assert ppl_y[1] - ppl_y[0] > 10
    assert ppl_y[2] == pytest.approx(ppl_y[3])
    steps = [x for x, _ in circles(root, "train_loss")]          # the x axis is shared by the panels
    assert steps == pytest.approx([x for x, _ in bleu])
    assert steps[1] - steps[0] == pytest.approx(steps[3] - steps[2])   # linear in the step


def test_curves_against_epoch_and_missing_x():
    root = ET.fromstring(plot.curves_svg({"run": RUN_A}, x="epoch"))
    xs = [x for x, _ in circles(root, "valid_bleu")]             # epochs 1, 1, 2, 2
    assert xs[0] == xs[1] < xs[2] == xs[3]
    with pytest.raises(data.UserError, match="--x elapsed"):
        plot.curves_svg({"run": [{k: v for k, v in r.items() if k != "elapsed"} for r in RUN_A]}, x="elapsed")


@pytest.mark.parametrize("lo, hi", [(0.3, 37.2), (9.0, 12.0), (20.0, 20.0), (1.5, 86.9), (1.02, 1200.0)])
def test_ticks_cover_the_data_and_log_ticks_are_positive(lo, hi):
    for ticks in (plot.nice_ticks(lo, hi), plot.log_ticks(lo, hi)):
        assert ticks[0] <= lo and ticks[-1] >= hi and ticks == sorted(ticks) and 2 <= len(ticks) <= 12
    assert all(t > 0 for t in plot.log_ticks(lo, hi))
    assert plot.nice_ticks(0.3, 37.2) == [0, 10, 20, 30, 40]


def test_run_names_are_the_run_folders_or_the_paths_when_two_share_a_name():
    assert plot.run_names(["runs/s1/log.jsonl", "runs/s2/log.jsonl"]) == ["s1", "s2"]
    assert plot.run_names(["a/s1/log.jsonl", "b/s1/log.jsonl"]) == [os.path.join("a", "s1"), os.path.join("b", "s1")]
    assert plot.run_names(["r/log.jsonl", "r/log.jsonl"]) == ["r", "r #2"]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def darkness(fill):
    return -sum(int(fill[i:i + 2], 16) for i in (1, 3, 5))


def test_attention_cells_darkest_is_largest_and_tokens_are_escaped():
    src, out = ["a", "<unk>", "R&D"], ['"q"', "it's", "</s>"]
    weights = [[0.2, 0.3, 0.5], [0.05, 0.1, 0.85], [0.6, 0.4, 0.0]]
    svg = plot.attention_svg(src, out, weights, notes=["source: a <unk> R&D"])
    root = ET.fromstring(svg)
    cells = root.findall(".//s:rect[@class='cell']", NS)
    assert len(cells) == len(src) * len(out)
    xs = sorted({float(c.get("x")) for c in cells})
    ys = sorted({float(c.get("y")) for c in cells})
    darkest = max(cells, key=lambda c: darkness(c.get("fill")))
    assert (xs.index(float(darkest.get("x"))), ys.index(float(darkest.get("y")))) == (2, 1)
    assert "0.850" in darkest.find("s:title", NS).text
    by_weight = sorted(cells, key=lambda c: float(c.find("s:title", NS).text.rsplit(": ", 1)[1]))
    assert [darkness(c.get("fill")) for c in by_weight] == sorted(darkness(c.get("fill")) for c in cells)
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert set(src + out) <= texts and "source: a <unk> R&D" in texts
    assert "<unk>" not in svg and "&lt;unk&gt;" in svg and "R&amp;D" in svg and "&quot;q&quot;" in svg


def test_attention_takes_a_tensor_and_refuses_the_wrong_shape():
    root = ET.fromstring(plot.attention_svg(["x", "y"], ["z"], torch.tensor([[0.25, 0.75]])))
    assert len(root.findall(".//s:rect[@class='cell']", NS)) == 2
    with pytest.raises(ValueError, match="1 x 2"):
        plot.attention_svg(["x", "y"], ["z"], [[0.25, 0.5, 0.25]])


def test_escape_replaces_characters_xml_forbids():
    assert plot.esc("a\x01b<'") == "a\ufffdb&lt;&apos;"


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def write_log(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return str(path)


def test_cli_curves_writes_the_file(tmp_path, capsys):
    a = write_log(tmp_path / "seed1" / "log.jsonl", RUN_A, tail='{"step": 500, "val')   # a row being written
    write_log(tmp_path / "seed2" / "log.jsonl", RUN_B)
    out = tmp_path / "pics" / "curves.svg"
    plot.main(["curves", a, str(tmp_path / "seed2"), "--out", str(out)])     # a run folder works too
    assert capsys.readouterr().out.strip() == f"wrote {out}: 7 evaluations of 2 run(s)"
    root = ET.parse(out).getroot()
    assert len(circles(root, "valid_bleu")) == 7
    assert os.listdir(tmp_path / "pics") == ["curves.svg"]                   # no temporary file left


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing" / "log.jsonl"), "missing/log.jsonl: file not found"),
    (lambda d: write_log(d / "empty" / "log.jsonl", []), "empty/log.jsonl: no evaluations"),
    (lambda d: write_log(d / "bad" / "log.jsonl", RUN_A[:1], tail="not json\n" + json.dumps(RUN_A[1]) + "\n"),
     "bad/log.jsonl: line 2 is not a JSON object"),
])
def test_cli_curves_refuses_a_bad_log_with_a_one_line_error(tmp_path, make, message):
    out = tmp_path / "curves.svg"
    with pytest.raises(SystemExit) as e:
        plot.main(["curves", write_log(tmp_path / "ok" / "log.jsonl", RUN_A), make(tmp_path), "--out", str(out)])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert "\n" not in str(e.value.code) and not out.exists()


def save_ckpt(path, arch, m, src_vocab, tgt_vocab, cfg):
    ckpt = {"format": "seqkd", "arch": arch, "config": asdict(cfg),
            "vocab": {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()}, "model": m.state_dict()}
    seqmodel.save_checkpoint(ckpt, path)
    return str(path)


@pytest.fixture
def lstm_ckpt(tmp_path):
    return save_ckpt(tmp_path / "model.pt", "lstm", *tiny_lstm())


def test_cli_attention_draws_the_weights_of_report_attention_of(lstm_ckpt, tmp_path):
    line, out = "the dog sees the cat today", tmp_path / "attention.svg"
    plot.main(["attention", "--ckpt", lstm_ckpt, "--src", line, "--out", str(out)])
    m, sv, tv, _ = tiny_lstm()
    src_ids = sv.encode(line)
    hyp = beam.decode_ids(m, [src_ids])[0][0][0]
    weights = report.attention_of(m, src_ids, hyp)
    root = ET.parse(out).getroot()
    cells = root.findall(".//s:rect[@class='cell']", NS)
    assert len(cells) == len(src_ids) * (len(hyp) + 1) == weights.numel()
    drawn = [float(c.find("s:title", NS).text.rsplit(": ", 1)[1]) for c in cells]
    assert drawn == pytest.approx(weights.flatten().tolist(), abs=5e-4)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert f"output: {tv.decode(hyp)}" in texts and "</s>" in texts and "the LSTM" in " ".join(texts)
    assert f"translation: {tv.decode(hyp)}" in report.show_attention(m, sv, tv, line)   # the same search


def test_cli_attention_on_a_t5_model(tmp_path):
    torch.manual_seed(0)
    vocab = data.WordVocab.build(SRC + REF, 40)
    cfg = seqmodel.make_config("t5", "t5-tiny", src_vocab=len(vocab), tgt_vocab=len(vocab))
    ckpt = save_ckpt(tmp_path / "t5.pt", "t5", seqmodel.build_model("t5", asdict(cfg)).eval(), vocab, vocab, cfg)
    src_tokens, out_tokens, weights, notes = plot.attention_of_sentence(ckpt, "a dog sees the cat")
    assert len(src_tokens) == 5 and out_tokens[-1] == "</s>" and tuple(weights.shape) == (len(out_tokens), 5)
    assert weights.sum(1) == pytest.approx(torch.ones(len(out_tokens)), abs=1e-5)   # each row a distribution
    assert "cross-attention, mean over its heads" in notes[2]


@pytest.mark.parametrize("flags, message", [
    (["--src", "  "], "--src: the sentence is empty"),
    (["--src", "a dog", "--beam", "0"], "--beam 0"),
    (["--src", "a dog", "--ckpt", "missing.pt"], "checkpoint missing.pt not found"),
])
def test_cli_attention_bad_input_gives_one_line_errors(lstm_ckpt, tmp_path, flags, message):
    out = tmp_path / "attention.svg"
    with pytest.raises(SystemExit) as e:
        plot.main(["attention", "--ckpt", lstm_ckpt, "--out", str(out)] + flags)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert "\n" not in str(e.value.code) and not out.exists()


def test_attention_of_an_unsupported_architecture_is_refused(lstm_ckpt, monkeypatch):
    monkeypatch.setattr(plot, "ATTENTION_RULES", {"t5": "cross-attention"})
    with pytest.raises(data.UserError, match="a lstm model; the heat map supports t5 models"):
        plot.attention_of_sentence(lstm_ckpt, "a dog")
