"""Smoke test of recipes/kim_rush.py: every step of the Kim & Rush Table 1 recipe runs on a tiny
built-in corpus (--smoke), writes its files, and a rerun redoes nothing. ~10 s on one CPU thread."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
import translate
import kim_rush  # recipes/ is on sys.path (tests/conftest.py)
import steps


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """The recipe's --threads 1 sets torch's thread count for the process: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, restore_threads):
    run_dir = tmp_path_factory.mktemp("kim_rush_smoke")
    recipe = kim_rush
    result = recipe.main(["--smoke", "--threads", "1", "--run-dir", str(run_dir)])
    return recipe, run_dir, result


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_smoke_run_writes_every_step(smoke_run):
    recipe, run_dir, result = smoke_run
    # the distilled corpora are line-aligned with the training source
    n_train = count_lines(run_dir / "subset" / "train.en")
    assert n_train == recipe.SETTINGS["smoke"]["max_train"]
    assert count_lines(run_dir / "distill" / "train.seqkd.de") == n_train
    assert count_lines(run_dir / "distill" / "train.seqinter.de") == n_train
    # files.json names the corpus for the recipes that continue from this run (prune_table3 --table1)
    files = json.loads((run_dir / "files.json").read_text())
    assert files["train"] == [str(run_dir / "subset" / "train.en"), str(run_dir / "subset" / "train.de")]
    assert files["tgt"] == "de"
    # every model trained to the end, and was reported; a student row once per seed
    for folder in model_folders(recipe):
        assert (run_dir / folder / "done.json").exists(), folder
        assert (run_dir / "reports" / f"{folder}.json").exists(), folder
    # the table: the 8 rows in the paper's order for seed 1, then the 6 student rows of seed 2
    names = [name for name, _ in recipe.ROWS]
    expected = [n if n.startswith("Teacher") else f"{n}, seed 1" for n in names] + [
        f"{n}, seed 2" for n in names if not n.startswith("Teacher")]
    table = (run_dir / "table1.md").read_text()
    first_table = table.split("\n\n")[0]
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == expected
    saved = json.loads((run_dir / "table1.json").read_text())
    assert [r["folder"] for r in saved["rows"]] == model_folders(recipe)
    assert saved["rows"] == result["rows"]
    assert len(saved["claims"]) == 6 and "| Claim (Kim & Rush 2016) |" in table
    assert set(saved["p_values"]) == {f for f in model_folders(recipe)
                                     if f.startswith("student") and f.rsplit("_s", 1)[0] != "student"}
    assert all(0 < p <= 1 for p in saved["p_values"].values())
    assert "| Seq-KD | " in table and " ± " in table           # the summary over seeds
    assert table.count(" | yes | ") + table.count(" | no | ") == len(model_folders(recipe))   # the curves' ends
    for r in saved["rows"]:
        assert 0 <= r["p_beam"] <= 1 and r["ppl"] > 1 and r["params"] > 0


def model_folders(recipe):
    """The smoke run's model folders in the table's order: seed 1's rows, then seed 2's students."""
    return [f if f.startswith("teacher") else f"{f}_s1" for _, f in recipe.ROWS] + [
        f"{f}_s2" for _, f in recipe.ROWS if f.startswith("student")]


def test_students_share_the_teacher_vocabulary_and_are_smaller(smoke_run):
    recipe, run_dir, result = smoke_run
    from model import load_checkpoint
    teacher = load_checkpoint(run_dir / "teacher" / "best.pt")
    for folder in model_folders(recipe)[1:]:
        ckpt = load_checkpoint(run_dir / folder / "best.pt")
        assert ckpt["vocab"] == teacher["vocab"], folder
    params = {r["folder"]: r["params"] for r in result["rows"]}
    assert params["student_s1"] == params["student_s2"] < params["teacher"] == params["teacher_seqinter"]


def test_rerun_redoes_nothing_but_what_is_missing(smoke_run, monkeypatch):
    recipe, run_dir, _ = smoke_run
    (run_dir / "reports" / "student_seqkd_s2.json").unlink()
    (run_dir / "table1.md").unlink()

    def no_training(argv=None):
        raise AssertionError(f"train.main called again: {argv}")

    calls = []
    real_translate_main = translate.main

    def translate_main(argv=None):
        assert "--report" in argv, f"a finished translation was redone: {argv}"
        calls.append(argv)
        return real_translate_main(argv)

    monkeypatch.setattr(train, "main", no_training)
    monkeypatch.setattr(translate, "main", translate_main)
    recipe.main(["--smoke", "--threads", "1", "--run-dir", str(run_dir)])
    assert len(calls) == 1 and str(run_dir / "student_seqkd_s2" / "best.pt") in calls[0]
    assert (run_dir / "table1.md").exists()


def test_a_step_another_live_process_runs_is_waited_for_not_run_twice(tmp_path, monkeypatch):
    """Two processes of a recipe (the same command twice, each --threads 1) never
    train one folder together: a live process's `running` marker makes the other wait for its
    done.json; a dead process's marker is ignored and the step resumes from its last.pt."""
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or {})
    step = tmp_path / "step"
    step.mkdir()
    (step / "running").write_text(str(os.getppid()))      # the process that started pytest

    def sleep(seconds):                  # the other process finishes while we wait
        (step / "done.json").write_text("{}")

    monkeypatch.setattr(steps.time, "sleep", sleep)
    assert steps.train_step("step", step, ["--x"]) == str(step / "best.pt")
    assert calls == []                                               # waited, did not train

    (step / "done.json").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (step / "running").write_text(dead.stdout.strip())               # a process that has ended
    (step / "last.pt").write_text("")
    steps.train_step("step", step, ["--x"])
    assert calls == [["--x", "--save-dir", str(step), "--resume", "--threads", str(torch.get_num_threads())]]
    assert (step / "done.json").exists() and not (step / "running").exists()


def test_missing_corpus_folder_is_a_one_line_error(tmp_path, capsys):
    recipe = kim_rush
    with pytest.raises(SystemExit) as e:
        recipe.main(["--corpus", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")])
    assert str(e.value).startswith("error: --corpus") and "no such folder" in str(e.value)


def test_missing_split_names_the_splits_found(tmp_path):
    recipe = kim_rush
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("train.en", "train.de", "val.en", "val.de", "test_2016_flickr.en", "test_2016_flickr.de"):
        (corpus / name).write_text("a b\n")
    with pytest.raises(SystemExit) as e:
        recipe.main(["--corpus", str(corpus), "--run-dir", str(tmp_path / "run")])
    message = str(e.value)
    assert "no test.en" in message and "test_2016_flickr" in message and "--test-split" in message


def test_run_folder_refuses_other_settings(smoke_run):
    recipe, run_dir, _ = smoke_run
    with pytest.raises(SystemExit) as e:
        recipe.main(["--smoke", "--seed", "2", "--run-dir", str(run_dir)])
    assert str(e.value).startswith("error: ") and "other settings (seed)" in str(e.value)


def test_run_folder_takes_more_rows_and_seeds_but_no_other_hyperparameter(tmp_path):
    path = tmp_path / "settings.json"
    first = dict(lr=5e-3, rows=["teacher", "student"], seeds=[1, 2, 3])
    steps.check_same_settings(path, first)
    more = dict(first, rows=["teacher", "student", "student_wordkd"], seeds=[1, 2, 3, 4])
    steps.check_same_settings(path, more)                     # which models to train: allowed
    assert json.loads(path.read_text()) == more               # and recorded
    with pytest.raises(steps.UserError, match=r"other settings \(lr\)"):
        steps.check_same_settings(path, dict(more, lr=1e-3))   # how to train them: refused
    assert json.loads(path.read_text()) == more


def paper_table1():
    """The paper's Table 1 numbers (4x1000 teacher, 2x500 students), as reports."""
    def report(greedy, beam=0.0, ppl=1.0, p=0.0, greedy_speed=0.0, beam_speed=0.0):
        return dict(bleu_greedy=greedy, bleu_beam=beam, ppl=ppl, p_beam=p,
                    words_per_s_greedy=greedy_speed, words_per_s_beam=beam_speed)
    return {"teacher": report(17.7, 19.5, beam_speed=100.0), "teacher_seqinter": report(19.6),
            "student": report(14.7, 17.6, ppl=8.2, p=0.009), "student_wordkd": report(15.4),
            "student_seqkd": report(18.9, 19.0, ppl=22.7, p=0.169, greedy_speed=1051.0)}


def test_the_paper_own_numbers_pass_every_claim():
    recipe = kim_rush
    claims = recipe.check_claims(paper_table1())
    assert [holds for _, holds, _ in claims] == [True] * 6
    assert claims[0][2] == "+4.20"                      # 18.9 - 14.7
    assert claims[2][2] == "+0.10 vs +2.90"             # beam gains: 19.0 - 18.9, 17.6 - 14.7
    assert "(18.8x)" in claims[3][2]                    # 16.9% / 0.9%
    assert claims[5][2].startswith("10.5x")             # 1051 / 100 words/s


def test_a_seqkd_student_below_the_baseline_fails_claims_1_2_3_6():
    recipe = kim_rush
    table = paper_table1()
    table["student_seqkd"]["bleu_greedy"] = 14.0          # 0.7 below the baseline
    claims = recipe.check_claims(table)
    assert [holds for _, holds, _ in claims] == [False, False, False, True, True, False]
    markdown = recipe.claims_markdown(claims)
    assert markdown.count("| does not hold |") == 4 and markdown.count("| holds |") == 2


def seeded_tables(seqkd_greedy, base_greedy=(14.0, 15.0, 16.0)):
    """The paper's Table 1 for three seeds, the students' greedy BLEU replaced by the given ones."""
    tables = {}
    for seed, (skd, base) in enumerate(zip(seqkd_greedy, base_greedy), start=1):
        table = paper_table1()
        table["student_seqkd"]["bleu_greedy"], table["student"]["bleu_greedy"] = skd, base
        table["student_wordkd"]["bleu_greedy"] = base + 0.5
        tables[seed] = table
    return tables


def test_seed_claims_need_the_mean_every_seed_and_every_p_value():
    recipe = kim_rush
    gains = seeded_tables([19.0, 19.5, 20.0])                       # Seq-KD +5, +4.5, +4
    significant = {(f, s): 0.001 for f in ("student_seqkd", "student_wordkd") for s in (1, 2, 3)}
    claims = recipe.seed_claims(gains, significant)
    assert [verdict for _, verdict, _ in claims] == ["holds"] * 6
    assert claims[0][2].startswith("mean +4.50 (seed 1: +5.00, p = 0.001; seed 2: +4.50")
    assert claims[4][2] == "19.60 vs 19.50 (one model of each)"   # the teachers: no per-seed list
    one_weak = {**significant, ("student_seqkd", 2): 0.2}
    assert recipe.seed_claims(gains, one_weak)[0][1] == "not significant"
    # the mean gains (+1.67) but seed 3 loses: not significant, even with every p < 0.05; the
    # beam gains of claim 3 (Seq-KD 2.00, 1.00, 4.00 against 3.60, 2.60, 1.60) hold on the mean
    mixed = seeded_tables([17.0, 18.0, 15.0])
    claims = recipe.seed_claims(mixed, significant)
    assert claims[0][1] == "not significant" and claims[0][2].startswith("mean +1.67")
    assert claims[2][1] == "holds on 2 of 3 seeds"
    assert recipe.seed_claims(seeded_tables([13.0, 14.0, 15.0]), significant)[0][1] == "does not hold"


def test_a_missing_row_makes_its_claims_not_run():
    recipe = kim_rush
    tables = seeded_tables([19.0, 19.5, 20.0])
    for table in tables.values():
        del table["teacher_seqinter"], table["student_wordkd"]
    claims = recipe.seed_claims(tables, {("student_seqkd", s): 0.001 for s in (1, 2, 3)})
    assert [verdict for _, verdict, _ in claims] == ["holds", None, "holds", "holds", None, "holds"]
    assert recipe.claims_markdown(claims).count("| not run | not run |") == 2


def test_a_row_missing_for_one_seed_is_decided_on_the_others_and_cannot_hold():
    tables = seeded_tables([19.0, 19.5, 20.0])                     # Word-KD +0.5 on every seed
    del tables[3]["student_wordkd"]                                # not (yet) trained for seed 3
    p_values = {(f, s): 0.001 for f in ("student_seqkd", "student_wordkd") for s in (1, 2, 3)
                if (f, s) != ("student_wordkd", 3)}
    claims = kim_rush.seed_claims(tables, p_values)
    assert claims[1][1] == "not significant"                       # held on seeds 1 and 2 only
    assert "seed 2: Word-KD +0.50, Seq-KD +4.50, p = 0.001; seed 3: not run" in claims[1][2]
    assert claims[0][1] == "holds"                                 # Seq-KD has every seed
    text = steps.seed_summary(tables, kim_rush.ROWS, p_values)
    # its mean against the baseline of the same seeds (14 and 15): +0.50, not against all three
    assert "| Word-KD (seeds 1, 2) | 15.00 ± 0.71 | +0.50 | 0.001, 0.001 |" in text


def test_seed_summary_gives_mean_and_sd_and_the_p_values():
    tables = seeded_tables([19.0, 19.5, 20.0])                       # mean 19.5, sd 0.5; baseline 15
    p_values = {("student_seqkd", 1): 0.001, ("student_seqkd", 2): 0.004, ("student_seqkd", 3): 0.03}
    text = steps.seed_summary(tables, kim_rush.ROWS, p_values)
    row = next(line for line in text.splitlines() if line.startswith("| Seq-KD |"))
    assert row.startswith("| Seq-KD | 19.50 ± 0.50 | +4.50 | 0.001, 0.004, 0.030 | 19.00 ± 0.00 | +1.40 |")
    assert "| Student baseline | 15.00 ± 1.00 | +0.00 | – |" in text
    assert steps.mean_tables(tables)["student"]["bleu_greedy"] == 15.0


def test_markdown_table_compares_each_seed_with_its_own_baseline():
    r = paper_table1()
    for report in r.values():
        report.update(chrf_greedy=0.0, chrf_beam=0.0, params=1)
    rows = [("Teacher baseline", r["teacher"]),
            ("Student baseline", dict(r["student"], seed=1)), ("Seq-KD", dict(r["student_seqkd"], seed=1)),
            ("Student baseline", dict(r["student"], seed=2, bleu_greedy=10.0)),
            ("Seq-KD", dict(r["student_seqkd"], seed=2))]
    lines = steps.markdown_table(rows, 5).splitlines()[2:]
    assert lines[2].startswith("| Seq-KD, seed 1 | 18.90 | +4.20 |")
    assert lines[4].startswith("| Seq-KD, seed 2 | 18.90 | +8.90 |")
    assert lines[0].startswith("| Teacher baseline | 17.70 | +0.00 |")


def test_claim_is_refused_while_another_live_process_holds_the_step(tmp_path):
    lock = tmp_path / "running"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(other.pid))
        assert not steps.claim(lock, "a step", wait=False)
        assert lock.read_text() == str(other.pid)                # left to it
    finally:
        other.kill()
        other.wait()
    assert steps.claim(lock, "a step", wait=False)               # its process ended: the step is free
    assert lock.read_text() == str(os.getpid())


def test_run_jobs_runs_each_job_once_its_inputs_exist_and_passes_over_busy_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(steps.time, "sleep", lambda s: None)
    made, order, busy = tmp_path / "made", [], {"b": 2}        # job b is another process's for 2 looks

    def job(name, makes=None):
        def run(wait):
            if busy.get(name):
                busy[name] -= 1
                return None
            order.append(name)
            if makes:
                makes.write_text("x")
            return name
        return run

    steps.run_jobs([([made], job("needs a")), ([], job("b")), ([], job("a", makes=made))])
    assert order == ["a", "needs a", "b"]


def test_convergence_table_reads_the_end_of_each_curve(tmp_path):
    bleus = {"a": [10.0, 20.0, 30.0, 29.5, 29.2, 30.0], "b": [5.0, 10.0, 15.0, 20.0]}   # b still rising
    for folder, values in bleus.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "log.jsonl").write_text("".join(
            json.dumps({"epoch": i + 1, "valid_bleu": v, "elapsed": 60.0 * (i + 1)}) + "\n"
            for i, v in enumerate(values)))
    lines = steps.convergence_table(tmp_path, ["a", "b"]).splitlines()
    assert lines[-2] == "| a | 6 | 30.00 (3) | 29.50 / 29.20 / 30.00 | yes | 6 |"   # within 1 BLEU of 30.00
    assert lines[-1] == "| b | 4 | 20.00 (4) | 10.00 / 15.00 / 20.00 | no | 4 |"    # 10.00 is 10 below the best
