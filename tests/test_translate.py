"""Tests for translate.py: files (line order, empty lines, shards, resume, n-best, Seq-Inter)
on the hand-made table model of test_beam.py, and the command line on a tiny random LSTM."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import beam  # noqa: E402
import data  # noqa: E402
import model as seqmodel  # noqa: E402
import runs  # noqa: E402
import translate  # noqa: E402
from test_beam import REF, SRC, VOCAB, L, TableModel, tiny_lstm  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Files: line order, empty lines, shards, resume, n-best, Seq-Inter
# ---------------------------------------------------------------------------------------------

LINES = ["a", "", "b b", "c", "a c", "", "b", "a a"]
# beam 2, max length 2 * len + 10: a.. -> "b"; b.. -> "" (empty translation); c -> a x 11 and
# the </s> forced at step 12
EXPECTED = ["b", "", "", " ".join(["a"] * 11), "b", "", "", "b"]


def run_file(tmp_path, name, **kw):
    out = str(tmp_path / name)
    kw.setdefault("beam", 2)
    translate.translate_file(TableModel(), VOCAB, VOCAB, LINES, out, progress=False, **kw)
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
    assert translate.shard_range(10, 1, 3) == (0, 3) and translate.shard_range(10, 3, 3) == (6, 10)


def test_resume_after_interrupt_gives_the_same_file(tmp_path, monkeypatch):
    whole = run_file(tmp_path, "all.txt")
    # Interrupt right after chunk 2 (lines 3-5) is written but before it is recorded as done:
    # the resumed run must drop those lines and translate them again.
    real, calls = runs.write_json, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(runs, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_file(tmp_path, "out.txt", chunk_size=3)
    partial = tmp_path / "out.txt.partial"
    assert partial.read_text(encoding="utf-8") == "".join(x + "\n" for x in EXPECTED[:6])
    assert json.loads((tmp_path / "out.txt.partial.json").read_text())["done"] == 3
    monkeypatch.setattr(runs, "write_json", real)
    with pytest.raises(data.UserError, match="other settings"):   # other flags: refuse
        run_file(tmp_path, "out.txt", chunk_size=3, beam=3)
    chunks = []
    real_decode = translate.decode_ids

    def counting(*args, **kwargs):
        chunks.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(translate, "decode_ids", counting)
    assert run_file(tmp_path, "out.txt", chunk_size=3) == whole
    assert len(chunks) == 2                                  # chunks 2 and 3 only
    assert not partial.exists()


def test_nbest_file_format(tmp_path):
    text = run_file(tmp_path, "nbest.txt", nbest=2)
    lines = text.splitlines()
    assert lines[0] == f"0 ||| b ||| {L(.36):.4f}"
    assert lines[1] == f"0 ||| a ||| {L(.2):.4f}"
    assert lines[2] == "1 |||  ||| 0.0000"                   # empty source: one empty entry
    assert translate.first_best(lines, 2) == EXPECTED


def test_seq_inter_selects_the_entry_closest_to_the_reference(tmp_path):
    refs = ["a", "", "a b", "x", "b", "", "", "c"]
    text = run_file(tmp_path, "inter.txt", nbest=2, refs=refs, select=True)
    lines = text.splitlines()
    assert len(lines) == len(LINES)
    assert lines[0] == "a"            # n-best of "a" is [b, a]: the reference picks "a"
    assert lines[4] == "b"            # ... and here "b"
    assert lines[2] == "a b"          # n-best of "b b" is ["", "a b"]: reference "a b" -> "a b"
    assert lines[7] == "b"            # no entry matches the reference "c": the first (best)
    assert lines[1] == ""


# ---------------------------------------------------------------------------------------------
# The command line on a tiny random LSTM
# ---------------------------------------------------------------------------------------------

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
    result = translate.main(["--ckpt", f["ckpt"], "--src", f["src"], "--ref", f["ref"], "--out", out,
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
    translate.main(base + ["--beam", "3", "--nbest", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0 ||| ") and {int(x.split(" ||| ")[0]) for x in lines} == set(range(5))
    report_json = os.path.join(f["dir"], "report.json")
    translate.main(base + ["--ref", f["ref"], "--report", "--json", report_json, "--beam", "2"])
    assert "p(t = ŷ)" in capsys.readouterr().out
    with open(report_json) as fh:
        r = json.load(fh)
    assert r["sentences"] == 4 and 0 < r["p_greedy"] <= 1 and r["ppl"] > 1 and r["params"] > 0
    translate.main(base + ["--show-attention", "4"])
    text = capsys.readouterr().out
    assert text.startswith("source: the dog sees the cat today") and "</s> │" in text


@pytest.mark.parametrize("flags, message", [
    (["--nbest", "3", "--beam", "2"], "--nbest 3 needs --beam"),
    (["--shard", "3/2"], "--shard 3/2"),
    (["--select", "sentence-bleu", "--nbest", "2"], "--select sentence-bleu needs --ref"),
    (["--report"], "--report needs --ref"),
    (["--show-attention", "9"], "--show-attention 9"),
    (["--autocast", "fp16", "--device", "cpu"], "--autocast fp16 is for CUDA, not cpu"),
    (["--autocast", "tf32", "--device", "cpu"], "--autocast tf32 is for CUDA, not cpu"),
    (["--autocast", "bf16", "--int8"], "give one precision"),
])
def test_cli_bad_flags_give_one_line_errors(ckpt_files, flags, message):
    f = ckpt_files
    with pytest.raises(SystemExit) as e:
        translate.main(["--ckpt", f["ckpt"], "--src", f["src"], "--no-progress"] + flags)
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--max-len-a", "nan"], "--max-len-a nan: must be a finite number >= 0"),
    (["--max-len-a", "inf"], "--max-len-a inf: must be a finite number >= 0"),
    (["--max-len-a", "-1"], "--max-len-a -1.0: must be a finite number >= 0"),
    (["--max-len-b", "-1"], "--max-len-b -1: must be >= 0"),
    (["--show-attention", "0"], "--show-attention 0: must be a line number, 1 or more"),
    (["--beam", "0"], "--beam must be at least 1"),
    (["--chunk-size", "-5"], "--chunk-size must be at least 1"),
    (["--threads", "0"], "--threads 0: give 1 or more CPU threads"),
])
def test_cli_bad_numbers_fail_before_anything_is_read(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:            # neither file exists: check_args comes first
        translate.main(["--ckpt", str(tmp_path / "missing.pt"), "--src", str(tmp_path / "missing.txt")] + flags)
    assert str(e.value) == f"error: {message}"


def test_cli_reference_with_other_line_count_is_refused(ckpt_files, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("ein hund\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="has 1 line but --src"):
        translate.main(["--ckpt", ckpt_files["ckpt"], "--src", ckpt_files["src"], "--ref", str(short)])


def test_cli_a_second_writer_of_an_out_file_is_refused_and_the_lock_released(ckpt_files, capsys):
    f = ckpt_files
    out = os.path.join(f["dir"], "hyp.txt")
    argv = ["--ckpt", f["ckpt"], "--src", f["src"], "--beam", "2", "--no-progress", "--out", out]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live writer
    try:
        with open(out + ".lock", "w") as fh:
            fh.write(f"{other.pid}\n")
        with pytest.raises(SystemExit) as e:
            translate.main(argv)
        assert str(e.value) == (f"error: --out {out} is in use by process {other.pid} (lock file {out}.lock): "
                                "wait for it to end, or stop it")
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    finally:
        other.kill()
        other.wait()
    translate.main(argv)                                   # the lock is stale now: taken over
    assert "taking over the stale lock" in capsys.readouterr().err
    assert os.path.exists(out) and not os.path.exists(out + ".lock")
    with pytest.raises(SystemExit, match="--nbest 3 needs --beam"):     # a UserError: released too
        translate.main(argv + ["--nbest", "3"])
    assert not os.path.exists(out + ".lock")


def test_cli_seq_inter_and_shard(ckpt_files, capsys):
    f = ckpt_files
    base = ["--ckpt", f["ckpt"], "--src", f["src"], "--ref", f["ref"], "--no-progress"]
    inter = os.path.join(f["dir"], "inter.txt")
    translate.main(base + ["--beam", "3", "--nbest", "3", "--select", "sentence-bleu", "--out", inter])
    assert "not a test score" in capsys.readouterr().out
    with open(inter, encoding="utf-8") as fh:
        assert len(fh.read().split("\n")[:-1]) == len(SRC)       # one line per source line
    parts = []
    for i in (1, 2):
        out = os.path.join(f["dir"], f"part{i}.txt")
        translate.main(base + ["--beam", "2", "--shard", f"{i}/2", "--out", out])
        with open(out, encoding="utf-8") as fh:
            parts.append(fh.read())
    m, sv, tv, _ = tiny_lstm()
    assert "".join(parts) == "".join(h + "\n" for h in beam.translate(m, sv, tv, SRC, beam=2))


def test_cli_int8_decodes_with_the_quantised_model(ckpt_files):
    f = ckpt_files
    out = os.path.join(f["dir"], "hyp8.txt")
    translate.main(["--ckpt", f["ckpt"], "--src", f["src"], "--out", out, "--int8", "--beam", "1", "--no-progress"])
    with open(out, encoding="utf-8") as fh:
        hyps = fh.read().split("\n")[:-1]
    m, sv, tv, _ = tiny_lstm()
    assert hyps == beam.translate(seqmodel.int8_model(m.eval()), sv, tv, SRC, beam=1)


def test_cli_bf16_autocast_on_the_cpu_matches_float32_on_most_sentences(ckpt_files):
    if not seqmodel.cpu_runs_bf16():
        pytest.skip("this CPU cannot run an LSTM in bf16 (no AVX-512): test_model's one-line-error test covers it")
    f = ckpt_files
    outs = {}
    for name, flags in (("fp32", []), ("bf16", ["--autocast", "bf16"]), ("bf16 again", ["--autocast", "bf16"])):
        out = os.path.join(f["dir"], f"hyp_{name}.txt")
        translate.main(["--ckpt", f["ckpt"], "--src", f["src"], "--out", out, "--beam", "2", "--device", "cpu",
                        "--no-progress"] + flags)
        with open(out, encoding="utf-8") as fh:
            outs[name] = fh.read().split("\n")[:-1]
    m, sv, tv, _ = tiny_lstm()
    assert outs["fp32"] == beam.translate(m.eval(), sv, tv, SRC, beam=2)
    assert outs["bf16"] == outs["bf16 again"]                     # deterministic
    same = sum(a == b for a, b in zip(outs["fp32"], outs["bf16"]))
    assert same >= len(SRC) - 1, (same, len(SRC))                # bf16 keeps 8 bits of mantissa


# ---------------------------------------------------------------------------------------------
# Standard input, interactive translation, progress lines
# ---------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MORE = SRC + ["a cat sees the dog", "today the cat"]


@pytest.fixture
def talking(tmp_path):
    """A checkpoint of the tiny LSTM without its extra </s> bias: it says something (non-empty, different
    lines for different sources), and the model itself for expected outputs."""
    import torch
    m, sv, tv, cfg = tiny_lstm()
    with torch.no_grad():
        m.generator.bias[data.EOS] -= 1.5
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
            "vocab": {"src": sv.to_dict(), "tgt": tv.to_dict()}, "model": m.state_dict()}
    seqmodel.save_checkpoint(ckpt, tmp_path / "talking.pt")
    (tmp_path / "more.txt").write_text("\n".join(MORE) + "\n", encoding="utf-8")
    return str(tmp_path / "talking.pt"), str(tmp_path / "more.txt"), (m, sv, tv)


def test_stdin_through_a_pipe_gives_the_lines_of_the_file(talking, capsys):
    ckpt, src, _ = talking
    flags = ["--ckpt", ckpt, "--beam", "2", "--batch-size", "3", "--no-progress", "--threads", "1"]
    translate.main(flags + ["--src", src])
    from_file = capsys.readouterr().out.splitlines()
    assert len(from_file) == len(MORE) and len(set(from_file)) >= 3 and "" in from_file   # not all alike
    text = "".join(line + "\n" for line in MORE)
    run = subprocess.run([sys.executable, "translate.py", *flags, "--src", "-", "--out", "-"], input=text,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == from_file
    assert "translated 7 sentences" in run.stderr                     # the summary keeps off stdout


def test_interactive_answers_each_line_before_the_next_is_written(talking, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    ckpt, _, (m, sv, tv) = talking
    sent = ["the cat sees a dog", "", "a dog", "cat"]
    expected = [beam.translate(m, sv, tv, [line], beam=2)[0] for line in sent]
    assert len(set(expected)) >= 3
    with open(tmp_path / "stderr.txt", "w") as err, ThreadPoolExecutor(1) as pool:
        proc = subprocess.Popen([sys.executable, "translate.py", "--ckpt", ckpt, "--interactive", "--beam", "2",
                                 "--threads", "1"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, encoding="utf-8")
        try:
            got = []
            for line in sent:           # the input stays open: an answer cannot wait for the end of it
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
                got.append(pool.submit(proc.stdout.readline).result(timeout=120).rstrip("\n"))
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()
    assert got == expected, (tmp_path / "stderr.txt").read_text()


def test_interactive_nbest_lines_are_numbered_like_a_file():
    import io
    out = io.StringIO()
    count = translate.interactive(TableModel(), VOCAB, VOCAB, io.BytesIO(b"a\n\n\xef\xbb\xbfb b \r\n"), out,
                                  beam=2, nbest=2)
    assert count == 3
    assert out.getvalue().splitlines() == [f"0 ||| b ||| {L(.36):.4f}", f"0 ||| a ||| {L(.2):.4f}",
                                           "1 |||  ||| 0.0000", f"2 |||  ||| {L(.55):.4f}",
                                           f"2 ||| a b ||| {L(.45 * .9 * .9):.4f}"]


def test_progress_lines_count_sentences_and_rate(capsys):
    now = [100.0]
    meter = runs.ProgressLines(total=10, initial=2, every=30, clock=lambda: now[0])  # 2 done before
    for t, n in [(110.0, 3), (130.0, 3), (150.0, 2)]:
        now[0] = t
        meter.update(n)
    # one line, at 130 s: 8 of 10 done, 6 of them in this run's 30 s (0.2/s), 2 left (10 s); at 150 s,
    # 20 s after that line, none
    assert capsys.readouterr().err == ("translating: 8/10 sentences (80%), 0.2 sentences/s, "
                                       "about 0.2 min left\n")


def test_a_file_written_to_a_log_gets_progress_lines(ckpt_files, capsys):
    f = ckpt_files
    out = os.path.join(f["dir"], "hyp.txt")
    argv = ["--ckpt", f["ckpt"], "--src", f["src"], "--out", out, "--batch-size", "2", "--beam", "2"]
    translate.main(argv + ["--progress-every", "0"])             # stderr is captured: not a terminal
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("translating: 5/5 sentences (100%), ") and "sentences/s" in err[-1]
    assert len(err) == 3                                 # batches of 2, 2 of the 4 real lines; the empty one
    translate.main(argv + ["--progress-every", "0", "--no-progress"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, message", [
    (["--interactive", "--out", "x.txt"], "--interactive prints each translation to stdout as its line comes: "
                                          "leave out --out (or give --src FILE instead of --interactive)"),
    (["--interactive", "--ref", "r.txt", "--shard", "1/2"], "leave out --ref, --shard (or give --src FILE"),
    (["--interactive", "--src", "a.txt"], "--interactive reads standard input: leave out --src a.txt"),
    ([], "give --src FILE (or --src - for standard input, or --interactive to translate line by line)"),
    (["--src", "-", "--ref", "-"], "--ref -: only --src can be standard input; give the references as a file"),
    (["--src", "a.txt", "--progress-every", "-1"], "--progress-every -1.0: give 0 or more seconds"),
])
def test_cli_input_flags_fail_before_anything_is_read(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        translate.main(["--ckpt", str(tmp_path / "missing.pt")] + flags)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
