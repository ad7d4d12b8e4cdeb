"""Pictures of a run, as SVG files written with the Python standard library alone:

    python plot.py curves runs/a/log.jsonl runs/b/log.jsonl --out curves.svg
    python plot.py attention --ckpt runs/builtin/best.pt --src "the red bird sees the bus" --out attention.svg

curves: the training curves of train.py's SAVE_DIR/log.jsonl (one row per evaluation), in three
panels sharing the x axis (the step; --x epoch or elapsed): validation BLEU, validation perplexity
(log scale) and the train loss. One line per log, named by its run folder, one circle per
evaluation; several logs in one picture compare runs (three seeds, two recipes).

attention: translate one sentence as translate.py --show-attention does (beam.py's search) and draw
report.attention_of's weights, one cell per (output token, source token), darker = more attention.
The weights are those the model's teacher-forced forward returns: for the LSTM its global
attention a_t(s), for T5 the last decoder layer's cross-attention averaged over its heads.
"""
import argparse
import json
import math
import os
import re
import sys
from xml.sax.saxutils import escape

import data
from beam import decode_ids
from data import UserError
from model import load_checkpoint, model_from_checkpoint, pick_device
from report import attention_of
from runs import write_atomically

# 1. SVG pieces -------------------------------------------------------------------------------

CHAR_W = 7.0                    # rough width of one character of 12-pixel sans-serif text
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")   # characters XML 1.0 forbids


def esc(value) -> str:
    """Text for SVG content or an attribute: & < > " ' escaped, characters XML forbids replaced."""
    return escape(NOT_XML.sub("\ufffd", str(value)), {'"': "&quot;", "'": "&apos;"})


def text(x, y, value, size=12, anchor="start", extra="") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f'{esc(value)}</text>')


def line(x1, y1, x2, y2, stroke="#ccc") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def svg_document(width, height, body) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">\n'
            '<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def clip(token, most=24) -> str:
    return token if len(token) <= most else token[:most - 1] + "…"


# 2. Axes -------------------------------------------------------------------------------------

def nice_ticks(lo, hi, count=5):
    """Round tick values (multiples of 1, 2, 2.5 or 5 x 10^k), about `count` steps apart from at or below lo
    to at or above hi."""
    if hi <= lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def log_ticks(lo, hi):
    """Tick values for a log axis over [lo, hi], 0 < lo: powers of ten, else 1-2-5 or 1..9 times them,
    the first kind that gives 4 ticks or more and is not much wider than the data; a narrow range
    (e.g. perplexities 9 to 12) gets nice_ticks."""
    low, high = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        candidates = [m * 10.0 ** e for e in range(low, high + 1) for m in mantissas]
        below = max(c for c in candidates if c <= lo * (1 + 1e-9))
        above = min(c for c in candidates if c >= hi * (1 - 1e-9))
        ticks = [c for c in candidates if below <= c <= above]
        if len(ticks) >= 4 and math.log(hi / lo) >= 0.4 * math.log(above / below):
            return ticks
    return [t for t in nice_ticks(lo, hi) if t > 0] or [lo, hi]


def scale(ticks, lo, hi, start, end, log=False):
    """The map value -> coordinate that sends the axis' range (its ticks and the data) onto [start, end]."""
    f = math.log10 if log else float
    a, b = f(min(ticks[0], lo)), f(max(ticks[-1], hi))
    return lambda v: start + (f(v) - a) / ((b - a) or 1.0) * (end - start)


def tick_label(value) -> str:
    return f"{round(value, 10):g}"


# 3. Training curves --------------------------------------------------------------------------

METRICS = (("valid_bleu", "validation BLEU", False),          # (log key, panel title, log scale)
           ("valid_ppl", "validation perplexity (log scale)", True),
           ("train_loss", "train loss (per target token, since the previous evaluation)", False))
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
LEFT, PLOT_W, TOP, PANEL_H, PANEL_GAP = 70, 520, 66, 160, 64


def read_log(path):
    """The rows (dicts) of one log.jsonl, blank lines skipped. UserError naming the file: missing, not
    UTF-8, a line that is not a JSON object (but an unfinished last line, a row being written, is
    skipped), no evaluation yet."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; give a log.jsonl written by train.py, or its --save-dir") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; is it a log.jsonl written by train.py?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    rows = []
    for n, row_text in enumerate(lines, 1):
        if not row_text.strip():
            continue
        try:
            row = json.loads(row_text)
        except json.JSONDecodeError:
            if n == len(lines) and not row_text.endswith("\n"):
                continue
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is not a JSON object; is it a log.jsonl written by train.py?")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no evaluations in it yet; plot it after train.py's first evaluation")
    return rows


def run_names(paths):
    """Legend names: each log's run folder; where two share one, the paths themselves (less /log.jsonl)."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(set(names)) < len(names):
        names = [re.sub(r"[/\\]log\.jsonl$", "", os.path.normpath(p)) for p in paths]
    seen = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        names[i] = name if seen[name] == 1 else f"{name} #{seen[name]}"
    return names


def points(rows, x_key, metric, log):
    """(x, y) of the rows where both are finite numbers (and y > 0 on a log axis)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return [(r[x_key], r[metric]) for r in rows if number(r.get(x_key)) and number(r.get(metric))
            and (r[metric] > 0 or not log)]


def panel_svg(metric, title, log, series, styles, x_axis, top):
    """One panel of curves_svg: frame, grid, ticks, one polyline and its circles per run.
    styles: ({name: colour}, {name: dash attribute}); x_axis: (ticks, value -> x)."""
    (colours, dashes), (x_ticks, x_at) = styles, x_axis
    bottom, right = top + PANEL_H, LEFT + PLOT_W
    out = [f'<g class="panel" id="{metric}">', text(LEFT, top - 10, title, 13, extra=' font-weight="bold"')]
    for t in x_ticks:
        out += [line(x_at(t), top, x_at(t), bottom), text(x_at(t), bottom + 16, tick_label(t), 11, "middle")]
    ys = [y for pts in series.values() for _, y in pts]
    if ys:
        y_ticks = log_ticks(min(ys), max(ys)) if log else nice_ticks(min(ys), max(ys))
        y_at = scale(y_ticks, min(ys), max(ys), bottom, top, log)
        for t in y_ticks:
            out += [line(LEFT, y_at(t), right, y_at(t)), text(LEFT - 6, y_at(t) + 4, tick_label(t), 11, "end")]
    else:
        out.append(text(LEFT + PLOT_W / 2, top + PANEL_H / 2, "no values in these logs", 12, "middle"))
    out.append(f'<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{PANEL_H}" fill="none" stroke="#666"/>')
    for name, pts in series.items():
        if not pts:
            continue
        xy = [(x_at(x), y_at(y)) for x, y in pts]
        out.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="1.5"{dashes[name]} points="'
                   + " ".join(f"{cx:.2f},{cy:.2f}" for cx, cy in xy) + '"/>')
        for (x, y), (cx, cy) in zip(pts, xy):
            out.append(f'<circle cx="{cx:.2f}" cy="{cy:.2f}" r="3" fill="{colours[name]}">'
                       f'<title>{esc(f"{name}: {tick_label(x)}, {y:.4g}")}</title></circle>')
    out.append("</g>")
    return out


def curves_svg(logs, x="step", title=None) -> str:
    """Training curves as SVG text. logs: {run name: its log rows}, in legend order; x: the row key of
    the x axis (step, epoch, elapsed). One panel per METRICS entry, all on the same x axis; per run one
    line and one circle per evaluation with that value, in the run's colour. UserError when no row
    has a number for x."""
    series = {m: {name: points(rows, x, m, log) for name, rows in logs.items()} for m, _, log in METRICS}
    xs = [px for per_run in series.values() for pts in per_run.values() for px, _ in pts]
    if not xs:
        raise UserError(f"--x {x}: no evaluation in these logs has a number for {x!r} beside its figures")
    x_ticks = nice_ticks(min(xs), max(xs))
    x_axis = (x_ticks, scale(x_ticks, min(xs), max(xs), LEFT, LEFT + PLOT_W))
    colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(logs)}
    dashes = {name: "" if i < len(COLOURS) else ' stroke-dasharray="6 3"' for i, name in enumerate(logs)}
    names = ", ".join(logs)
    title = title or ("training curves: " + names if len(names) <= 70 else f"training curves of {len(logs)} runs")
    body = [text(LEFT, 26, title, 15, extra=' font-weight="bold"')]
    for i, (metric, panel_title, log) in enumerate(METRICS):
        top = TOP + i * (PANEL_H + PANEL_GAP)
        body += panel_svg(metric, panel_title, log, series[metric], (colours, dashes), x_axis, top)
    bottom = TOP + len(METRICS) * PANEL_H + (len(METRICS) - 1) * PANEL_GAP
    body.append(text(LEFT + PLOT_W / 2, bottom + 36, x, 12, "middle"))
    legend_x = LEFT + PLOT_W + 20
    for i, (name, colour) in enumerate(colours.items()):
        y = TOP + 8 + 20 * i
        count = len(logs[name])
        body += [f'<line x1="{legend_x}" y1="{y}" x2="{legend_x + 22}" y2="{y}" stroke="{colour}" '
                 f'stroke-width="3"{dashes[name]}/>',
                 text(legend_x + 28, y + 4, f"{clip(name, 30)} ({count} evaluation{'s' * (count != 1)})", 12)]
    width = legend_x + 28 + CHAR_W * max(len(clip(n, 30)) + 16 for n in logs) + 10
    return svg_document(max(width, LEFT + CHAR_W * len(title) + 20), bottom + 50, body)


# 4. Attention heat map -----------------------------------------------------------------------

ATTENTION_RULES = {"lstm": "the LSTM's global attention a_t(s)",
                   "t5": "T5: the last decoder layer's cross-attention, mean over its heads"}
DARK = (8, 48, 107)             # the colour of weight 1; weight 0 is white
CELL = 26


def shade(weight) -> str:
    """Fill colour of a weight: white at 0, a straight line through RGB to DARK at 1 (clamped)."""
    w = min(1.0, max(0.0, float(weight)))
    return "#" + "".join(f"{round(255 + (end - 255) * w):02x}" for end in DARK)


def attention_svg(src_tokens, out_tokens, weights, notes=()) -> str:
    """An attention heat map as SVG text: one row per output token, one column per source token, one
    cell (a rect of class "cell") per weight, white = 0 to dark blue = 1, the value in its tooltip.
    weights: len(out_tokens) rows of len(src_tokens) numbers (lists or a tensor); notes: lines on top."""
    rows = weights.tolist() if hasattr(weights, "tolist") else [list(r) for r in weights]
    if len(rows) != len(out_tokens) or any(len(r) != len(src_tokens) for r in rows):
        raise ValueError(f"weights must be {len(out_tokens)} x {len(src_tokens)} (output x source tokens)")
    src_labels, out_labels = [clip(t) for t in src_tokens], [clip(t) for t in out_tokens]
    slant = 0.72 * CHAR_W * max(map(len, src_labels), default=1)     # source labels at 45 degrees
    left = 16 + CHAR_W * max(map(len, out_labels), default=1)
    top = 24 + 18 * len(notes) + slant
    body = [text(12, 22 + 18 * i, note, 13 if i == 0 else 12) for i, note in enumerate(notes)]
    for j, token in enumerate(src_labels):
        x, y = left + (j + 0.5) * CELL, top - 6
        body.append(text(x, y, token, extra=f' transform="rotate(-45 {x:.1f} {y:.1f})"'))
    for i, token in enumerate(out_labels):
        body.append(text(left - 6, top + (i + 0.5) * CELL + 4, token, anchor="end"))
    for i, row in enumerate(rows):
        for j, w in enumerate(row):
            tip = f"{out_tokens[i]} <- {src_tokens[j]}: {w:.3f}"
            body.append(f'<rect class="cell" x="{left + j * CELL:.1f}" y="{top + i * CELL:.1f}" width="{CELL}" '
                        f'height="{CELL}" fill="{shade(w)}" stroke="#ddd"><title>{esc(tip)}</title></rect>')
    key_x, bottom = left + len(src_labels) * CELL + slant + 20, top + len(rows) * CELL
    for k in range(5):                                               # the colour key: 0, 0.25 .. 1
        body += [f'<rect class="key" x="{key_x:.1f}" y="{top + 18 * k:.1f}" width="14" height="14" '
                 f'fill="{shade(k / 4)}" stroke="#999"/>', text(key_x + 20, top + 18 * k + 11, f"{k / 4:g}", 11)]
    width = max(key_x + 50, 24 + CHAR_W * max(map(len, notes), default=0))
    return svg_document(width, max(bottom, top + 90) + 16, body)


def attention_of_sentence(ckpt_path, line, beam=1, device=None):
    """Translate one sentence with the model of a checkpoint, as translate.py --show-attention does.
    Returns (source tokens, output tokens with </s> last, weights (len(output), len(source)), notes)."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("arch") not in ATTENTION_RULES:
        raise UserError(f"--ckpt {ckpt_path}: a {ckpt.get('arch')} model; the heat map supports "
                        f"{', '.join(ATTENTION_RULES)} models")
    src_vocab, tgt_vocab = data.vocabs_from_checkpoint(ckpt)
    src_ids = src_vocab.encode(line)
    if not src_ids:
        raise UserError('--src: the sentence is empty; give the words to translate, e.g. --src "the red bird"')
    model = model_from_checkpoint(ckpt, pick_device(device))
    hyp = decode_ids(model, [src_ids], beam=beam)[0][0][0]            # the best entry's tokens
    weights = attention_of(model, src_ids, hyp)
    notes = [f"source: {line.strip()}", f"output: {tgt_vocab.decode(hyp)}",
             f"{os.path.basename(ckpt_path)}, beam {beam}: {ATTENTION_RULES[ckpt['arch']]}; darker = more"]
    return src_vocab.tokens(src_ids), tgt_vocab.tokens(hyp) + ["</s>"], weights, notes


# 5. The command line -------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="training curves of one or more train.py logs")
    c.add_argument("logs", nargs="+", metavar="LOG", help="log.jsonl files written by train.py, or their --save-dir")
    c.add_argument("--x", choices=("step", "epoch", "elapsed"), default="step", help="the x axis (default: step)")
    c.add_argument("--title", help="the picture's title (default: the run names)")
    c.add_argument("--out", default="curves.svg", help="the SVG file to write (default: curves.svg)")
    a = sub.add_parser("attention", help="the attention heat map of one translated sentence")
    a.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    a.add_argument("--src", required=True, help="the sentence to translate (the text itself, not a file)")
    a.add_argument("--beam", type=int, default=1, help="beam size of the search (default: 1, greedy)")
    a.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    a.add_argument("--out", default="attention.svg", help="the SVG file to write (default: attention.svg)")
    return p


def run(args) -> str:
    """Make the picture the arguments ask for and write it; returns what was written, in words."""
    if args.command == "curves":
        paths = [os.path.join(p, "log.jsonl") if os.path.isdir(p) else p for p in args.logs]
        logs = dict(zip(run_names(paths), (read_log(p) for p in paths)))
        svg = curves_svg(logs, args.x, args.title)
        summary = f"{sum(map(len, logs.values()))} evaluations of {len(logs)} run(s)"
    else:
        if args.beam < 1:
            raise UserError(f"--beam {args.beam}: must be at least 1")
        src_tokens, out_tokens, weights, notes = attention_of_sentence(args.ckpt, args.src, args.beam, args.device)
        svg = attention_svg(src_tokens, out_tokens, weights, notes)
        summary = f"{len(out_tokens)} x {len(src_tokens)} attention weights; {notes[1]}"
    try:
        write_atomically(args.out, lambda f: f.write(svg), mode="w")
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write it ({e.strerror})") from None
    return f"wrote {args.out}: {summary}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
