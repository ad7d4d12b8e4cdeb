"""recipes/prune_table3.py --table1: the inputs of Table 3 read from a Table 1 run folder. The
folder here is hand-made (done.json files with chosen validation BLEU); no model is trained."""
import json
import subprocess
import sys

import pytest

import prune_table3  # recipes/ is on sys.path (tests/conftest.py)


def fake_table1_run(tmp_path, valid_bleu):
    """A run folder as recipes/kim_rush.py leaves it: FOLDER/done.json and FOLDER/best.pt for each
    model, distill/, and files.json naming the corpus."""
    run = tmp_path / "t1"
    for folder, bleu in valid_bleu.items():
        (run / folder).mkdir(parents=True)
        (run / folder / "done.json").write_text(json.dumps({"best_valid_bleu": bleu}))
        (run / folder / "best.pt").write_text("not read")
    (run / "distill").mkdir()
    for name in ("train.seqkd.de", "train.seqinter.de"):
        (run / "distill" / name).write_text("x\n")
    corpus = tmp_path / "c"
    corpus.mkdir()
    files = {split: [str(corpus / f"{split}.en"), str(corpus / f"{split}.de")] for split in ("train", "val", "test")}
    for path in sum(files.values(), []):
        open(path, "w").write("x\n")
    files["valid"] = files.pop("val")
    (run / "files.json").write_text(json.dumps(dict(files, tgt="de")))
    return run


def test_best_student_is_chosen_by_validation_bleu_and_never_the_teacher(tmp_path):
    recipe = prune_table3
    run = fake_table1_run(tmp_path, {"teacher": 40.0, "teacher_seqinter": 41.0, "student": 30.0,
                                     "student_seqkd": 32.5, "student_seqkd_seqinter": 32.4})
    name, scores = recipe.best_student(run)
    assert name == "student_seqkd"
    assert set(scores) == {"student", "student_seqkd", "student_seqkd_seqinter"}


def test_table1_fills_every_input_and_a_given_flag_wins(tmp_path):
    recipe = prune_table3
    run = fake_table1_run(tmp_path, {"teacher": 40.0, "student": 30.0, "student_seqkd_seqinter": 31.0})
    args = recipe.parse_args(["--table1", str(run), "--test-src", "other.en"])
    assert args.student == str(run / "student_seqkd_seqinter" / "best.pt")
    assert args.teacher == str(run / "teacher" / "best.pt")
    c = tmp_path / "c"
    assert (args.kd_src, args.valid_src, args.valid_tgt) == (str(c / "train.en"), str(c / "val.en"), str(c / "val.de"))
    assert args.kd_tgt == str(run / "distill" / "train.seqkd.de")
    assert args.inter_tgt == str(run / "distill" / "train.seqinter.de")
    assert (args.test_src, args.test_tgt) == ("other.en", str(c / "test.de"))


def test_table1_without_files_json_is_a_one_line_error(tmp_path, capsys):
    recipe = prune_table3
    with pytest.raises(SystemExit):
        recipe.parse_args(["--table1", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "files.json" in err and str(tmp_path) in err


def test_table1_without_a_finished_student_is_a_one_line_error(tmp_path, capsys):
    recipe = prune_table3
    run = fake_table1_run(tmp_path, {"teacher": 40.0})
    with pytest.raises(SystemExit):
        recipe.parse_args(["--table1", str(run)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished student" in err


def test_a_student_named_with_student_needs_no_finished_student_folder(tmp_path):
    recipe = prune_table3
    run = fake_table1_run(tmp_path, {"teacher": 40.0})
    args = recipe.parse_args(["--table1", str(run), "--student", "mine.pt"])
    assert args.student == "mine.pt" and args.teacher == str(run / "teacher" / "best.pt")


def test_a_table1_run_without_seq_inter_data_retrains_on_seq_kd_only(tmp_path, capsys):
    recipe = prune_table3
    run = fake_table1_run(tmp_path, {"teacher": 40.0, "student_seqkd": 32.0})
    (run / "distill" / "train.seqinter.de").unlink()
    args = recipe.parse_args(["--table1", str(run)])
    assert args.inter_tgt is None and args.kd_tgt == str(run / "distill" / "train.seqkd.de")
    assert "Seq-KD data only" in capsys.readouterr().out
    rows = [dict(scheme="class-blind", amount=0.5, nonzero=10, greedy_before=1.0, beam_before=2.0,
                 greedy_after=3.0, beam_after=4.0)]
    assert "fine-tuned" not in recipe.format_table(rows, 20, None, 5, inter=False)
    assert "then fine-tuned on Seq-Inter data" in recipe.format_table(rows, 20, None, 5)


def test_every_row_is_tested_against_the_0_percent_control():
    refs = ["a b c d e", "f g h i j", "k l m n o", "p q r s t"]
    row = dict(nonzero=10, greedy_before=0.0, beam_before=0.0, beam_after=0.0)
    rows = [dict(row, scheme="class-blind", amount=0.0, greedy_after=40.0, hyps_greedy=refs, refs=refs),
            dict(row, scheme="class-blind", amount=0.8, greedy_after=12.5, hyps_greedy=refs, refs=refs),
            dict(row, scheme="class-uniform", amount=0.8, greedy_after=41.0, hyps_greedy=["x"] * 4, refs=refs)]
    prune_table3.against_control(rows)
    assert [r["delta"] for r in rows] == [0.0, -27.5, 1.0]
    assert rows[0]["p"] == rows[1]["p"] == 1.0          # the same output as the control: no difference
    assert rows[2]["p"] < 0.05                          # every sentence wrong against every one right
    table = prune_table3.format_table(rows, 20, None, 5)
    assert "| -27.50 | 1.000 |" in table and "Δ greedy vs 0%" in table
    no_control = [dict(rows[1])]
    no_control[0].pop("p"), no_control[0].pop("delta")
    prune_table3.against_control(no_control)
    assert "p" not in no_control[0] and "| - | - |" in prune_table3.format_table(no_control, 20, None, 5)


def test_table_rows_class_blind_at_every_amount_then_the_schemes():
    rows = prune_table3.table_rows([0.0, 0.5, 0.8], 0.8, ["class-blind", "class-uniform", "class-distribution"])
    assert rows == [(0.0, "class-blind"), (0.5, "class-blind"), (0.8, "class-blind"),
                    (0.8, "class-uniform"), (0.8, "class-distribution")]
    assert prune_table3.table_rows([0.0], 0.8, ["class-blind"]) == [(0.0, "class-blind"), (0.8, "class-blind")]
    with pytest.raises(prune_table3.data.UserError, match="unknown class-wide"):
        prune_table3.table_rows([0.0], 0.8, ["class-wide"])


def test_row_job_passes_over_a_row_another_process_runs_and_runs_a_free_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(prune_table3, "run_row", lambda name, *rest: calls.append(name) or {"name": name})
    busy = tmp_path / "rows" / "class-blind-80"
    busy.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (busy / "row.running").write_text(str(other.pid))
        assert prune_table3.row_job("class-blind-80", 0.8, "class-blind", None, tmp_path, wait=False) is None
        assert calls == []                                             # left to the other process
        row = prune_table3.row_job("class-blind-50", 0.5, "class-blind", None, tmp_path, wait=False)
        assert row == {"name": "class-blind-50"} and calls == ["class-blind-50"]
        assert not (tmp_path / "rows" / "class-blind-50" / "row.running").exists()   # the lock is let go
        (busy / "after.json").write_text("{}")                          # the other process finished it
        assert prune_table3.row_job("class-blind-80", 0.8, "class-blind", None, tmp_path, wait=False)
    finally:
        other.kill()
        other.wait()


def fake_row(run_dir, name, greedy, beam, hyps, refs, curve):
    """RUN_DIR/rows/NAME as run_row leaves it: before.json (greedy BLEU 10 below after), after.json and
    the retraining's log.jsonl."""
    row = run_dir / "rows" / name
    (row / "retrain").mkdir(parents=True)
    (row / "before.json").write_text(json.dumps({"bleu_greedy": greedy - 10, "bleu_beam": beam - 10}))
    (row / "after.json").write_text(json.dumps({"bleu_greedy": greedy, "bleu_beam": beam,
                                                "hyps_greedy": hyps, "refs": refs}))
    (row / "retrain" / "log.jsonl").write_text("".join(
        json.dumps({"epoch": e + 1, "valid_bleu": b, "elapsed": 60.0 * (e + 1)}) + "\n" for e, b in enumerate(curve)))


def test_across_students_means_deltas_and_paired_tests_against_each_students_own_reference(tmp_path):
    refs = ["a b c d e", "f g h i j", "k l m n o", "p q r s t"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    flat, rising = [30.0, 31.0, 30.5, 30.8], [10.0, 20.0, 30.0, 40.0]      # converged / still rising
    fake_row(s1, "class-blind-00", 40.0, 41.0, refs, refs, flat)
    fake_row(s2, "class-blind-00", 42.0, 43.0, refs, refs, flat)
    fake_row(s1, "class-blind-80", 36.0, 37.0, refs, refs, flat)          # same output as its control
    fake_row(s2, "class-blind-80", 40.0, 41.0, refs, refs, rising)
    fake_row(s1, "class-uniform-80", 30.0, 31.0, ["x"] * 4, refs, flat)   # only one student has it
    table = prune_table3.across_students([s1, s2]).splitlines()
    rows = [line for line in table if line.startswith("| class-")]
    # 0%: mean 41, sd of (40, 42) = 1.41; 80%: (36, 40) -> 38 ± 2.83, Δ = mean(-4, -2) = -3
    assert rows[0] == "| class-blind | 0% | 2 | 31.00 ± 1.41 | 41.00 ± 1.41 | 42.00 ± 1.41 | – | – | – | 2/2 | 4 |"
    assert rows[1] == ("| class-blind | 80% | 2 | 28.00 ± 2.83 | 38.00 ± 2.83 | 39.00 ± 2.83 | class-blind-00 | -3.00 "
                       "| 1.000, 1.000 | 1/2 | 4 |")
    # the other scheme against class-blind at its amount, for the one student that has both
    assert rows[2].startswith("| class-uniform | 80% | 1 | 20.00 ± 0.00 | 30.00 ± 0.00 | 31.00 ± 0.00 "
                              "| class-blind-80 | -6.00 | 0.0")
    assert float(rows[2].split("|")[9].strip()) < 0.05


def test_across_without_run_folders_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "recipes/prune_table3.py", "--across", str(tmp_path)],
                         capture_output=True, text=True, cwd=prune_table3.Path(prune_table3.__file__).parent.parent)
    assert out.returncode != 0 and "--across" in out.stderr and "Traceback" not in out.stderr
