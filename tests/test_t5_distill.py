"""Smoke test of recipes/t5_distill.py: every step of the T5 distillation recipe runs on a tiny
built-in corpus (--smoke, two seeds and the whole tuning of the relation settings), each model starts from the
checkpoint its row says, the table has every row of every seed, and a rerun redoes nothing. ~30 s on one CPU
thread."""
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


def test_table_has_every_row_of_every_seed_and_students_are_a_quarter(smoke_run):
    recipe, run_dir, result = smoke_run
    table = (run_dir / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split(" | ")[0][2:] for row in rows[1:len(recipe.ROWS) * 2]]
    assert names == ["Teacher baseline"] + [f"{name}, seed {seed}" for seed in (1, 2) for name, _ in recipe.ROWS[1:]]
    saved = json.loads((run_dir / "table.json").read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 1 + 2 * 9
    params = {r["folder"]: r["params"] for r in saved["rows"]}
    assert params["teacher"] > 3 * params["student_s1"]
    assert len(set(params.values())) == 2          # every student has the same size
    for r in saved["rows"]:
        assert 0 <= r["bleu_greedy"] <= 100 and r["ppl"] > 1 and r["words_per_s_beam"] > 0
    assert [c["claim"] for c in saved["claims"]] == [c for c, _, _ in recipe.CLAIMS]
    assert all(c["holds"] in ("holds", "does not hold", "not significant") for c in saved["claims"])


def test_each_row_starts_where_it_says(smoke_run):
    recipe, run_dir, _ = smoke_run
    best = {folder: str(run_dir / folder / "best.pt") for folder in os.listdir(run_dir)}
    seqkd = str(run_dir / "distill" / "train.seqkd.de")
    # the teacher: span corruption of both languages' text, then translation
    pretrain = run_args(run_dir, "teacher_pretrain")
    assert pretrain["span_corruption"] and pretrain["mono"] == str(run_dir / "mono.txt") and pretrain["arch"] == "t5"
    assert run_args(run_dir, "teacher")["init"] == best["teacher_pretrain"]
    # the relation rows: relation KD from the pre-trained teacher on span corruption, chosen by its own loss,
    # with the Q-Q weight and the teacher layer chosen on validation, then gold
    choice = json.loads((run_dir / "tune" / "choice.json").read_text())
    for seed in (1, 2):
        for _, terms, prefix in recipe.RELATION_ROWS:
            stage1 = run_args(run_dir, f"{prefix}_s{seed}")
            assert stage1["span_corruption"] and stage1["kd"] == "relation" and stage1["best_metric"] == "loss"
            assert stage1["relation_terms"] == recipe.relation_spec(terms, choice["qq"], choice["weights"])
            assert stage1["teacher"] == best["teacher_pretrain"]
            assert stage1["relation_teacher_layer"] == choice["teacher_layer"] and stage1["seed"] == seed
            gold_init = run_args(run_dir, f"{prefix}_gold_s{seed}")["init"]
            assert gold_init == str(run_dir / f"{prefix}_s{seed}" / "best.pt") or (seed, terms) == (1, "minilm")
    assert os.path.realpath(run_dir / "student_minilm_gold_s1") == str(run_dir / "tune" / f"{choice['best']}_gold")
    wordkd = run_args(run_dir, "student_wordkd_s1")
    assert wordkd["kd"] == "word" and wordkd["teacher"] == best["teacher"] and wordkd["init"] is None
    # both staged orders
    assert run_args(run_dir, "student_seqkd_s2")["train_tgt"] == seqkd
    seqkd_gold, gold_seqkd = run_args(run_dir, "student_seqkd_gold_s2"), run_args(run_dir, "student_gold_seqkd_s2")
    assert seqkd_gold["init"] == best["student_seqkd_s2"] and seqkd_gold["train_tgt"].endswith("train.de")
    assert gold_seqkd["init"] == best["student_s2"] and gold_seqkd["train_tgt"] == seqkd
    # one vocabulary everywhere: the pre-trained teacher's, joint, with the sentinels
    vocab = load_checkpoint(best["teacher_pretrain"])["vocab"]
    for _, folder in recipe.ROWS[1:]:
        assert load_checkpoint(best[f"{folder}_s2"])["vocab"] == vocab, folder


def test_the_tuning_keeps_drops_or_rescales_q_q_then_tries_the_other_layer_with_the_best(smoke_run):
    recipe, run_dir, _ = smoke_run
    choice = json.loads((run_dir / "tune" / "choice.json").read_text())
    weights = recipe.probe_weights(run_dir / "tune" / "probe")
    assert choice["weights"] == weights and all(w > 0 for w in weights.values())
    first = {qq: run_args(run_dir, f"tune/qq-{qq}_L-1")["relation_terms"] for qq in ("keep", "drop", "rescale")}
    assert first == {"keep": "minilm", "drop": "minilm,enc-qq=0", "rescale": f"minilm,enc-qq={weights['enc-qq']:.6g}"}
    bleu = choice["valid_bleu"]
    best_qq = max(["keep", "drop", "rescale"], key=lambda qq: (bleu[f"qq-{qq}_L-1"], -"keep drop rescale".find(qq)))
    other = run_args(run_dir, "tune/qq-best_L0")
    assert other["relation_terms"] == first[best_qq] and other["relation_teacher_layer"] == 0
    assert choice["qq"] == best_qq
    assert choice["best"] == max([f"qq-{best_qq}_L-1", "qq-best_L0"], key=lambda n: (bleu[n], n.endswith("L-1")))


def test_relation_spec_and_the_claims_rule():
    spec = t5_distill.relation_spec
    w = {"enc-qq": 36.0, "dec-qq": 2.5}
    assert spec("miniend-d", "drop", w) == "miniend-d,dec-qq=0"
    assert spec("miniend-e", "rescale", w) == "miniend-e,enc-qq=36,dec-qq=2.5"
    assert spec("minilm", "keep", w) == "minilm"
    refs = [f"sentence number {i} is here" for i in range(40)]
    good = {"hyps_greedy": refs, "refs": refs, "bleu_greedy": 100.0}
    bad = {"hyps_greedy": ["nothing"] * 40, "refs": refs, "bleu_greedy": 0.0}
    half = {"hyps_greedy": refs[:20] + ["nothing"] * 20, "refs": refs, "bleu_greedy": 60.0}
    assert t5_distill.decide("c", "a", "b", {1: {"a": good, "b": bad}, 2: {"a": good, "b": bad}}, 0.05)[1] == "holds"
    assert t5_distill.decide("c", "a", "b", {1: {"a": bad, "b": good}}, 0.05)[1] == "does not hold"
    mixed = {1: {"a": good, "b": bad}, 2: {"a": half, "b": good}}      # +100 and -40: higher on the mean only
    assert t5_distill.decide("c", "a", "b", mixed, 0.05)[1] == "not significant"
    assert t5_distill.decide("c", "a", "x", mixed, 0.05)[1] == "not run"


def test_teacher_and_students_pretrain_to_their_own_ceilings(tmp_path):
    S = dict(t5_distill.SETTINGS["smoke"], pretrain_epochs=3, student_pretrain_epochs=7)
    files = {"train": ("t.en", "t.de"), "valid": ("v.en", "v.de"), "test": ("s.en", "s.de")}
    recipe = t5_distill.Recipe(S, tmp_path, files, "de", "cpu", seed=1)

    def epochs(job):
        flags = job[1].args[2]                          # partial(train_step, title, folder, flags)
        return flags[flags.index("--epochs") + 1]

    no_teacher, _ = recipe.seed_jobs(2)
    assert epochs(recipe.teacher_jobs()[0]) == "3"      # the teacher's span corruption
    assert epochs(no_teacher[1]) == "7"                 # the control's
    assert epochs(no_teacher[0]) == str(S["student_epochs"]) and "--span-corruption" not in no_teacher[0][1].args[2]


def test_rerun_redoes_nothing(smoke_run, monkeypatch):
    recipe, run_dir, _ = smoke_run

    def nothing(argv=None):
        raise AssertionError(f"a finished step was run again: {argv}")

    monkeypatch.setattr(train, "main", nothing)
    monkeypatch.setattr(translate, "main", nothing)
    assert recipe.main(["--smoke", "--threads", "1", "--run-dir", str(run_dir)])["rows"]
