"""Smoke test of recipes/t5_distill.py: every step of the T5 distillation recipe runs on a tiny
built-in corpus (--smoke), each model starts from the checkpoint its row says, the table has every
row, and a rerun redoes nothing. ~10 s on one CPU thread."""
import json
import os

import pytest
import torch

import train
import translate
from model import load_checkpoint
import t5_distill  # recipes/ is on sys.path (tests/conftest.py)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    threads = torch.get_num_threads()  # the recipe's --threads 1 sets it for the process
    run_dir = tmp_path_factory.mktemp("t5_distill_smoke")
    recipe = t5_distill
    result = recipe.main(["--smoke", "--threads", "1", "--run-dir", str(run_dir)])
    yield recipe, run_dir, result
    torch.set_num_threads(threads)


def run_args(run_dir, folder):
    """The train.py flags a model of the run was trained with."""
    return load_checkpoint(run_dir / folder / "last.pt")["args"]


def test_table_has_every_row_and_students_are_a_quarter(smoke_run):
    recipe, run_dir, result = smoke_run
    table = (run_dir / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == [name for name, _ in recipe.ROWS]
    saved = json.loads((run_dir / "table.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 10
    params = {r["folder"]: r["params"] for r in saved["rows"]}
    assert params["teacher"] > 3 * params["student"]
    assert len(set(params.values())) == 2          # every student has the same size
    for r in saved["rows"]:
        assert 0 <= r["bleu_greedy"] <= 100 and r["ppl"] > 1 and r["words_per_s_beam"] > 0


def test_each_row_starts_where_it_says(smoke_run):
    recipe, run_dir, _ = smoke_run
    best = {folder: str(run_dir / folder / "best.pt") for folder in os.listdir(run_dir)}
    seqkd = str(run_dir / "distill" / "train.seqkd.de")
    # the teacher: span corruption of both languages' text, then translation
    pretrain = run_args(run_dir, "teacher_pretrain")
    assert pretrain["span_corruption"] and pretrain["mono"] == str(run_dir / "mono.txt") and pretrain["arch"] == "t5"
    assert run_args(run_dir, "teacher")["init"] == best["teacher_pretrain"]
    # the relation rows: relation KD from the pre-trained teacher on span corruption, then gold
    for _, terms, prefix in recipe.RELATION_ROWS:
        stage1 = run_args(run_dir, prefix)
        assert stage1["span_corruption"] and stage1["kd"] == "relation" and stage1["relation_terms"] == terms
        assert stage1["teacher"] == best["teacher_pretrain"]
        assert run_args(run_dir, prefix + "_gold")["init"] == best[prefix]
    wordkd = run_args(run_dir, "student_wordkd")
    assert wordkd["kd"] == "word" and wordkd["teacher"] == best["teacher"] and wordkd["init"] is None
    # both staged orders
    assert run_args(run_dir, "student_seqkd")["train_tgt"] == seqkd
    seqkd_gold, gold_seqkd = run_args(run_dir, "student_seqkd_gold"), run_args(run_dir, "student_gold_seqkd")
    assert seqkd_gold["init"] == best["student_seqkd"] and seqkd_gold["train_tgt"].endswith("train.de")
    assert gold_seqkd["init"] == best["student"] and gold_seqkd["train_tgt"] == seqkd
    # one vocabulary everywhere: the pre-trained teacher's, joint, with the sentinels
    vocab = load_checkpoint(best["teacher_pretrain"])["vocab"]
    for _, folder in recipe.ROWS:
        assert load_checkpoint(best[folder])["vocab"] == vocab, folder


def test_rerun_redoes_nothing(smoke_run, monkeypatch):
    recipe, run_dir, _ = smoke_run

    def nothing(argv=None):
        raise AssertionError(f"a finished step was run again: {argv}")

    monkeypatch.setattr(train, "main", nothing)
    monkeypatch.setattr(translate, "main", nothing)
    assert recipe.main(["--smoke", "--threads", "1", "--run-dir", str(run_dir)])["rows"]


def test_students_only_runs_the_steps_that_need_no_fine_tuned_teacher(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--students-only: step 1 is not done"):
        t5_distill.main(["--smoke", "--run-dir", str(tmp_path), "--students-only"])
    trained = []

    def fake_train(argv):
        save_dir = argv[argv.index("--save-dir") + 1]
        trained.append(os.path.basename(save_dir))
        return {}

    monkeypatch.setattr(train, "main", fake_train)
    (tmp_path / "teacher_pretrain").mkdir()
    (tmp_path / "teacher_pretrain" / "done.json").write_text("{}")
    assert t5_distill.main(["--smoke", "--run-dir", str(tmp_path), "--students-only"]) is None
    assert trained == ["student", "student_pretrain", "student_pretrain_gold",
                       *[folder for _, _, prefix in t5_distill.RELATION_ROWS for folder in (prefix, prefix + "_gold")]]
