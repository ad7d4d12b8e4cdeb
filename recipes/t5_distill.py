"""Distilling a T5-like translator: logit KD, MiniLM, MiniEnD-D/E, Seq-KD, and the order of
a staged fine-tuning, over seeds, in one command.

    python recipes/t5_distill.py --builtin                 # the built-in corpus
    python recipes/t5_distill.py --smoke                   # tiny: only checks every step runs
    python prepare.py multi30k --out data/multi30k         # or any folder of {train,valid,test}.{en,de}
    python recipes/t5_distill.py --corpus data/multi30k --valid-split valid --run-dir runs/t5_multi30k

A list of steps, as recipes/kim_rush.py (both use recipes/steps.py): each step calls train.main /
translate.main with the flags a user would type, writes under the run folder, and is skipped when
its output exists, so the same command continues after an interrupt. Two cores: run the same command
twice, each with --threads 1; each process takes the next step whose inputs exist and that the other
is not running (steps.run_jobs).

  step 1   teacher pre-training: T5 span corruption (Raffel et al. 2020) of the training text of
           both languages, read as unlabelled sentences (no pairs)        -> teacher_pretrain/
  step 2   teacher: fine-tune it on translation (--init)                    -> teacher/
  step 3   Seq-KD data: the teacher's beam search on the training source    -> distill/train.seqkd.TGT
  step 4   the Q-Q probe: one step of relation KD that measures the query-query and key-key terms of a
           new student against the pre-trained teacher; "rescaled" Q-Q weighs each Q-Q term by K-K / Q-Q
           (T5's queries carry the 1/sqrt(d_kv) of attention, so their relations are nearly flat)
  step 5   the relation settings, on validation, seed 1 (only where a setting lists several): MiniLM with
           the Q-Q term kept, dropped and rescaled (teacher layer: the last), then the best of those from
           each other teacher layer; the best fine-tuned validation BLEU decides -> tune/choice.json
  step 6   every student row, once per seed (FOLDER_s1, FOLDER_s2, ...); the baseline and the control
           of every seed run first (after steps 1-3, before steps 4-5): they need no teacher:
             student baseline      ~1/10 of the teacher (1/4 on the built-in corpus), from scratch, NLL on
                                   the references
             control               span corruption WITHOUT a teacher, then the references: what pre-training
                                   alone gives the relation rows
             logit KD              Word-KD from the teacher on the references (Kim & Rush 2016, 3.1)
             MiniLM, MiniEnD-D, MiniEnD-E   task-agnostic as in MiniEnD (Zhang et al. 2024): relation KD
                                   from the PRE-TRAINED teacher (step 1) on span corruption, chosen by its
                                   own objective on validation (--best-metric loss), then the references
             Seq-KD                NLL on the teacher's translations, from scratch
             Seq-KD, then gold     the Seq-KD student fine-tuned on the references
             gold, then Seq-KD     the baseline student fine-tuned on the Seq-KD data
  step 7   the test-set report of every model (translate.py --report), the table over seeds with each
           row's paired bootstrap against the baseline, and the claims (QuillBot's order; MiniEnD's
           relations beyond logit KD and beyond MiniLM) decided on them: RUN_DIR/table.md, table.json

All students take the teacher's vocabulary: one joint vocabulary (T5 shares its embedding between
source and target) with 100 sentinel tokens for span corruption, built in step 1. Every
translation model is chosen by validation greedy BLEU (--best-metric bleu); the span-corruption
stages by validation perplexity, the relation stages by their own loss. The hyper-parameters are
fixed below, before any run.
"""
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))          # steps.py, next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root

import data  # noqa: E402
import relation_losses  # noqa: E402
import runs  # noqa: E402
import steps  # noqa: E402
from report import paired_bootstrap  # noqa: E402
from steps import train_step, translate_step, write_lines  # noqa: E402


# Hyper-parameters, fixed up front ------------------------------------------------------------
# The student has about 1/10 of the teacher's parameters (1/4 on the built-in corpus). schedule: every
# translation training; pretrain_schedule: the span-corruption stages (the relation stages by their own loss).

SETTINGS = {
    # A real corpus (e.g. Multi30k, 29k pairs), trained to convergence. Adafactor at T5's pre-training
    # rate 1e-2 (1e-3 for a second stage): with Adam at 5e-4 the teacher was at validation ppl 65.5
    # after 600 steps, with Adafactor at 19.3 (BENCHMARKS.md). The first table (5 epochs each, one or two
    # seeds) left the teacher 0.15 greedy BLEU above its student, every curve still rising, and seeds of
    # the student 3.6 BLEU apart at a constant rate; halving it once narrowed that to 1.1. So now every
    # stage halves the rate after 2 evaluations without a new best and stops after 5 (the span-corruption
    # stages: halve when worse, stop after 2), within the epoch ceilings below.
    "corpus": dict(
        tokenizer=["--tokenizer", "spm", "--src-vocab-size", "8000"],
        # 3 + 3 layers, width 256 (~7.6M parameters with the 8k embedding)
        teacher=["--arch", "t5", "--layers", "3", "--d-model", "256", "--heads", "4", "--d-kv", "64",
                 "--d-ff", "1024", "--dropout", "0.1"],
        # 2 + 2 layers, width 64 (~0.74M): a width-128 student (1.9M) reached validation BLEU 37.3, only 2.2
        # below the teacher (BENCHMARKS.md, "Eleventh and twelfth sessions"): no teacher worth distilling
        student=["--arch", "t5", "--layers", "2", "--d-model", "64", "--heads", "4", "--d-kv", "16",
                 "--d-ff", "256", "--dropout", "0.1"],
        optim=["--optim", "adafactor", "--batch-size", "64"],
        schedule=["--decay-on-plateau", "--decay-patience", "2", "--patience", "5"],
        pretrain_schedule=["--decay-on-plateau", "--patience", "2"],
        lr=1e-2,               # T5's pre-training rate; Adafactor's steps are relative to each weight's size
        finetune_lr=1e-3,      # T5's fine-tuning rate: the second stage of a staged order
        # Epoch ceilings:
        pretrain_epochs=10,           # the teacher's span corruption over both sides of the training text
        student_pretrain_epochs=20,   # a student's: the control's and the relation stages' (at 10, a relation
                                      # loss was still falling 0.7-9% an epoch)
        teacher_epochs=40,
        student_epochs=60,
        finetune_epochs=20,           # the second stage of a staged order
        kd_alpha=0.5,          # Word-KD as Kim & Rush
        relation_heads=8,      # divides both inner widths (256, 64)
        teacher_layers=[-1, 1],              # the last, and the upper-middle one (the second of three)
        qq=["keep", "drop", "rescale"],      # the Q-Q terms' weight: 1, 0, or K-K / Q-Q at the start
        seqkd_beam=5,
        report_beam=5,
        max_train=None,
        max_eval=None,
        seeds=[1, 2, 3],
    ),
    # The built-in synthetic corpus (synthetic.builtin_splits), one seed, no tuning.
    "builtin": dict(
        tokenizer=["--tokenizer", "word"],
        teacher=["--arch", "t5", "--preset", "t5-builtin"],          # 2 + 2 layers, width 128
        student=["--arch", "t5", "--layers", "2", "--d-model", "64", "--heads", "4", "--d-kv", "16",
                 "--d-ff", "256", "--dropout", "0.1"],
        optim=["--optim", "adafactor", "--batch-size", "32"],
        schedule=[],          # fixed epochs at one rate
        pretrain_schedule=[],
        lr=1e-2,              # train.py's t5-builtin default: valid BLEU 81.8 after 3 epochs (Adam 5e-4: 40.5)
        finetune_lr=1e-3,
        pretrain_epochs=1,
        student_pretrain_epochs=1,
        teacher_epochs=6,
        student_epochs=6,
        finetune_epochs=1,
        kd_alpha=0.5,
        relation_heads=4,      # divides 128 and 64
        teacher_layers=[-1],
        qq=["keep"],
        seqkd_beam=5,
        report_beam=5,
        max_train=10_000,
        max_eval=None,
        seeds=[1],
    ),
}
# Absurdly small: only checks that every step runs (tests/test_t5_distill.py). The built-in
# setting with tiny models, Adam, one epoch, small beams, a slice of the corpus, two seeds and
# the whole tuning of the relation settings.
SETTINGS["smoke"] = dict(
    SETTINGS["builtin"],
    teacher=["--arch", "t5", "--preset", "t5-tiny"],             # 2 + 2 layers, width 16
    student=["--arch", "t5", "--layers", "1", "--d-model", "8", "--heads", "2", "--d-kv", "4",
             "--d-ff", "16", "--dropout", "0.0"],
    optim=["--optim", "adam", "--batch-size", "32"], teacher_layers=[-1, 0], qq=["keep", "drop", "rescale"],
    teacher_epochs=1, student_epochs=1, relation_heads=2, seqkd_beam=2, report_beam=2,
    max_train=200, max_eval=40, seeds=[1, 2])

# The task-agnostic relation recipes of step 6: (row name, --relation-terms recipe, folder prefix)
RELATION_ROWS = [("MiniLM, then gold", "minilm", "student_minilm"),
                 ("MiniEnD-D, then gold", "miniend-d", "student_miniend_d"),
                 ("MiniEnD-E, then gold", "miniend-e", "student_miniend_e")]
QQ_TERMS = {"enc-qq": "enc-kk", "dec-qq": "dec-kk"}     # each Q-Q term and the K-K term it is scaled to

# The rows of the table: (name, model folder; a student's folder takes _s{seed}). Δ: against the
# student baseline.
ROWS = [
    ("Teacher baseline", "teacher"),
    ("Student baseline", "student"),
    ("Span-corruption pre-training, then gold (no teacher)", "student_pretrain_gold"),
    ("Logit KD (Word-KD)", "student_wordkd"),
    *[(name, f"{prefix}_gold") for name, _, prefix in RELATION_ROWS],
    ("Seq-KD", "student_seqkd"),
    ("Seq-KD, then gold", "student_seqkd_gold"),
    ("Gold, then Seq-KD", "student_gold_seqkd"),
]
# The claims, each (claim, the row that should be better, the row it should beat).
CLAIMS = [("QuillBot: Seq-KD data first, then gold, beats the reverse", "student_seqkd_gold", "student_gold_seqkd"),
          ("MiniEnD-D beats logit-only KD", "student_miniend_d_gold", "student_wordkd"),
          ("MiniEnD-E beats logit-only KD", "student_miniend_e_gold", "student_wordkd"),
          ("MiniEnD-D beats MiniLM-only", "student_miniend_d_gold", "student_minilm_gold"),
          ("MiniEnD-E beats MiniLM-only", "student_miniend_e_gold", "student_minilm_gold")]


# The relation settings: the Q-Q weight and the teacher layer ---------------------------------

def relation_spec(recipe, qq, weights):
    """--relation-terms of a relation recipe with the Q-Q choice: "keep" (weight 1), "drop" (0) or
    "rescale" (weights[term]: K-K / Q-Q measured by the probe)."""
    present = [t for t in QQ_TERMS if t in relation_losses.RELATION_RECIPES[recipe]]
    if qq == "keep" or not present:
        return recipe
    return ",".join([recipe] + [f"{t}={0 if qq == 'drop' else weights[t]:.6g}" for t in present])


def probe_weights(probe_dir):
    """{Q-Q term: K-K / Q-Q} from the first (and only) evaluation of the probe run: the terms of its
    first batch, a new student against the pre-trained teacher."""
    parts = json.loads((Path(probe_dir) / "log.jsonl").read_text().splitlines()[0])["train_parts"]
    return {qq: parts[kk] / parts[qq] for qq, kk in QQ_TERMS.items()}


def candidates(S):
    """The tuning runs, in order: (name, Q-Q choice or None for "the best of the first group", teacher layer)."""
    first = [(f"qq-{qq}_L{S['teacher_layers'][0]}", qq, S["teacher_layers"][0]) for qq in S["qq"]]
    return first, [(f"qq-best_L{layer}", None, layer) for layer in S["teacher_layers"][1:]]


def valid_bleu(run_dir, names):
    """{name: the best validation BLEU of the tuning run tune/NAME_gold}."""
    return {n: json.loads((run_dir / "tune" / f"{n}_gold" / "done.json").read_text())["best_valid_bleu"]
            for n in names}


def best_of(scores):
    """The first name with the highest score ({name: score}, in the candidates' order)."""
    return max(scores, key=lambda n: (scores[n], -list(scores).index(n)))


def qq_of(name):
    return name.split("_")[0].removeprefix("qq-")          # "qq-drop_L-1" -> "drop"


# The recipe ----------------------------------------------------------------------------------

def parse_args(argv=None):
    return steps.parse_args(argv, "Distil a T5-like translator: logit KD, MiniLM, MiniEnD-D/E, Seq-KD and "
                            "both staged orders over seeds, and the table.", "t5_distill")


class Recipe:
    """The flags and the jobs of one run folder (steps 1-6); run() puts the jobs in order. A job is
    (the files it needs, a function of `wait` that runs it): steps.run_jobs."""

    def __init__(self, S, run_dir, files, tgt, device, seed):
        self.S, self.run_dir, self.device, self.seed = S, run_dir, device, seed      # seed: the teacher's
        (self.train_src, self.train_ref), (self.valid_src, self.valid_ref) = files["train"], files["valid"]
        self.mono = run_dir / "mono.txt"     # span corruption's unlabelled text: the training text of both sides
        self.common = [*S["optim"], "--device", device]
        self.pre_dir, self.teacher_dir = run_dir / "teacher_pretrain", run_dir / "teacher"
        self.pretrained, self.teacher = str(self.pre_dir / "best.pt"), str(self.teacher_dir / "best.pt")
        self.seqkd_tgt = str(run_dir / "distill" / f"train.seqkd.{tgt}")
        self.student = S["student"] + ["--vocab-from", str(self.pre_dir / "last.pt")]  # the joint vocabulary
        self.probe, self.choice = run_dir / "tune" / "probe", run_dir / "tune" / "choice.json"
        self.first, self.second = candidates(S)

    def translation(self, tgt_file, epochs, lr, seed):
        """Flags of a translation training on (train_src, tgt_file), chosen by validation BLEU."""
        return ["--train-src", self.train_src, "--train-tgt", tgt_file, "--valid-src", self.valid_src,
                "--valid-tgt", self.valid_ref, *self.common, "--seed", str(seed), "--best-metric", "bleu",
                "--epochs", str(epochs), "--lr", str(lr), *self.S["schedule"]]

    def span_corruption(self, seed, metric="ppl", epochs_key="student_pretrain_epochs"):
        """Flags of a span-corruption stage (unlabelled text), chosen by `metric` on validation."""
        S = self.S
        return ["--span-corruption", "--mono", str(self.mono), "--valid-src", self.valid_src, *self.common,
                "--seed", str(seed), "--best-metric", metric, "--epochs", str(S[epochs_key]),
                "--lr", str(S["lr"]), *S["pretrain_schedule"]]

    def teacher_jobs(self):
        """Steps 1-3: pre-train the teacher, fine-tune it, translate the training source with it."""
        S, pre_done = self.S, self.pre_dir / "done.json"
        pretrain = self.span_corruption(self.seed, epochs_key="pretrain_epochs") + S["tokenizer"] + S["teacher"]
        return [([], partial(train_step, "step 1: teacher pre-training (T5 span corruption of the training text)",
                             self.pre_dir, pretrain)),
                ([pre_done], partial(train_step, "step 2: teacher (fine-tuned on the references)", self.teacher_dir,
                                     self.translation(self.train_ref, S["teacher_epochs"], S["lr"], self.seed)
                                     + ["--init", self.pretrained])),
                ([self.teacher_dir / "done.json"], partial(
                    translate_step, f"step 3: Seq-KD data: the teacher's beam-{S['seqkd_beam']} translation of the "
                    "training source", self.seqkd_tgt, ["--ckpt", self.teacher, "--src", self.train_src,
                                                        "--beam", str(S["seqkd_beam"]), "--device", self.device]))]

    def relation_row(self, title, folder, gold_folder, recipe, seed, qq, layer, wait):
        """A relation stage (its own loss on validation chooses it) in `folder`, then gold in `gold_folder`."""
        S = self.S
        stage = train_step(f"{title}: relation KD from the pre-trained teacher on span corruption", folder,
                           self.span_corruption(seed, "loss") + self.student + [
                               "--teacher", self.pretrained, "--kd", "relation", "--relation-terms",
                               relation_spec(recipe, qq, probe_weights(self.probe)),
                               "--relation-heads", str(S["relation_heads"]), "--relation-teacher-layer", str(layer)],
                           wait)
        return stage and train_step(f"{title}: fine-tuned on the references", gold_folder,
                                    self.translation(self.train_ref, S["student_epochs"], S["lr"], seed)
                                    + ["--init", stage], wait)

    def tuning_jobs(self):
        """Steps 4 and 5: the probe, the tuning runs (MiniLM, seed 1), the choice."""
        S, first = self.S, [n for n, _, _ in self.first]
        probe_flags = self.span_corruption(S["seeds"][0]) + self.student + [
            "--teacher", self.pretrained, "--kd", "relation",
            "--relation-terms", ",".join([*QQ_TERMS, *QQ_TERMS.values()]),
            "--relation-heads", str(S["relation_heads"]), "--max-steps", "1", "--eval-every", "1"]
        jobs = [([self.pre_dir / "done.json"], partial(train_step, "step 4: the Q-Q probe", self.probe, probe_flags))]
        for name, qq, layer in self.first + self.second:
            needs = [self.probe / "done.json"] + ([self.gold_done(n) for n in first] if qq is None else [])
            jobs.append((needs, partial(self.tuning_run, name, qq, layer)))
        return jobs + [([self.gold_done(n) for n, _, _ in self.first + self.second], self.choose)]

    def gold_done(self, name):
        return self.run_dir / "tune" / f"{name}_gold" / "done.json"

    def tuning_run(self, name, qq, layer, wait):
        qq = qq or qq_of(best_of(valid_bleu(self.run_dir, [n for n, _, _ in self.first])))
        folder = self.run_dir / "tune" / name
        return self.relation_row(f"step 5: MiniLM, {name}", folder, f"{folder}_gold", "minilm", self.S["seeds"][0],
                                 qq, layer, wait)

    def choose(self, wait):
        first, second = [n for n, _, _ in self.first], [n for n, _, _ in self.second]
        scores = valid_bleu(self.run_dir, first + second)
        best_first = best_of({n: scores[n] for n in first})
        best = best_of({n: scores[n] for n in [best_first] + second})
        layer = {n: lay for n, _, lay in self.first + self.second}[best]
        runs.write_json(dict(best=best, qq=qq_of(best_first), teacher_layer=layer, valid_bleu=scores,
                             weights=probe_weights(self.probe)), self.choice)
        return str(self.choice)

    def chosen_row(self, title, prefix, recipe, seed, wait):
        """A relation row with the chosen settings; seed 1's MiniLM row is the chosen tuning run."""
        c = json.loads(self.choice.read_text())
        folder, gold_folder = self.run_dir / f"{prefix}_s{seed}", self.run_dir / f"{prefix}_gold_s{seed}"
        if recipe == "minilm" and seed == self.S["seeds"][0]:
            for link, end in ((folder, ""), (gold_folder, "_gold")):
                if not link.is_symlink():
                    link.symlink_to(Path("tune") / f"{c['best']}{end}")
            return str(gold_folder)
        return self.relation_row(title, folder, gold_folder, recipe, seed, c["qq"], c["teacher_layer"], wait)

    def seed_jobs(self, seed):
        """Step 6 for one seed: (the jobs that need no teacher: baseline and control; the others)."""
        S, r, s, seqkd = self.S, self.run_dir, f"_s{seed}", self.seqkd_tgt
        gold = self.translation(self.train_ref, S["student_epochs"], S["lr"], seed)
        vocab, teacher_done = self.pre_dir / "last.pt", self.teacher_dir / "done.json"
        then = partial(self.translation, epochs=S["finetune_epochs"], lr=S["finetune_lr"], seed=seed)
        rows = [([vocab], "student baseline", "student", gold + self.student),
                ([vocab], "control: span corruption, no teacher", "student_pretrain",
                 self.span_corruption(seed) + self.student),
                ([r / f"student_pretrain{s}" / "done.json"], "control: then the references", "student_pretrain_gold",
                 gold + ["--init", str(r / f"student_pretrain{s}" / "best.pt")]),
                ([teacher_done], "logit KD", "student_wordkd",
                 gold + self.student + ["--teacher", self.teacher, "--kd", "word", "--kd-alpha", str(S["kd_alpha"])]),
                ([seqkd], "Seq-KD", "student_seqkd",
                 self.translation(seqkd, S["student_epochs"], S["lr"], seed) + self.student),
                ([r / f"student_seqkd{s}" / "done.json"], "Seq-KD, then gold", "student_seqkd_gold",
                 then(self.train_ref) + ["--init", str(r / f"student_seqkd{s}" / "best.pt")]),
                ([r / f"student{s}" / "done.json", seqkd], "gold, then Seq-KD", "student_gold_seqkd",
                 then(seqkd) + ["--init", str(r / f"student{s}" / "best.pt")])]
        jobs = [(needs, partial(train_step, f"step 6: {title}, seed {seed}", r / f"{folder}{s}", flags))
                for needs, title, folder, flags in rows]
        jobs += [([self.choice], partial(self.chosen_row, f"step 6: {name.split(',')[0]}, seed {seed}", prefix,
                                         recipe, seed)) for name, recipe, prefix in RELATION_ROWS]
        return jobs[:3], jobs[3:]


def run(args):
    t_start = time.time()
    setting_name, S, run_dir, tgt, files = steps.setup_run(args, SETTINGS, "t5_distill", "T5 distillation")
    recipe = Recipe(S, run_dir, files, tgt, args.device, args.seed)
    if not recipe.mono.exists():
        write_lines(recipe.mono, data.read_lines(recipe.train_src) + data.read_lines(recipe.train_ref))
    # The rows that need no teacher (the baseline and the control) of every seed come right after the
    # teacher's steps: they stay valid if the teacher is changed.
    per_seed = [recipe.seed_jobs(seed) for seed in S["seeds"]]
    steps.run_jobs(recipe.teacher_jobs() + [j for no_teacher, _ in per_seed for j in no_teacher]
                   + recipe.tuning_jobs() + [j for _, rest in per_seed for j in rest])
    if not steps.claim(run_dir / "table.running", "step 7", wait=False):
        print("another process of this command is writing the table: it ends this one")
        return None
    test_src, test_ref = files["test"]
    spec = [(name, folder) if folder == "teacher" else (name, f"{folder}_s{seed}", seed)
            for seed in S["seeds"] for name, folder in ROWS if seed == S["seeds"][0] or folder != "teacher"]
    return steps.report_and_table("step 7", "Distilling a T5-like translator", "table", run_dir, spec, S,
                                  setting_name, test_src, test_ref, args.device, t_start,
                                  "Δ: against the student baseline of the same seed.", more=add_claims)


# Step 7: the seeds, the claims, the curves ------------------------------------------------------

def add_claims(result, alpha=0.05):
    """The summary over seeds, each row's p against the baseline, the claims decided on paired
    bootstraps, the teacher's margin, the tuning and the curves (Markdown); the claims into result."""
    tables = {}
    for row in result["rows"]:
        seed = row.get("seed")
        folder = row["folder"].removesuffix(f"_s{seed}") if seed else row["folder"]
        for s in [seed] if seed else result["settings"]["seeds"]:
            tables.setdefault(s, {})[folder] = row
    p_values = {(folder, s): paired_bootstrap(t["student"]["hyps_greedy"], row["hyps_greedy"], t["student"]["refs"])[2]
                for s, t in tables.items() for folder, row in t.items() if folder.startswith("student_")}
    claims = [decide(claim, better, worse, tables, alpha) for claim, better, worse in CLAIMS]
    result["claims"] = [dict(claim=c, holds=v, numbers=n) for c, v, n in claims]
    result["p_values"] = {f"{folder}_s{s}": p for (folder, s), p in p_values.items()}
    student_mean = statistics.fmean(t["student"]["bleu_greedy"] for t in tables.values())
    margin = tables[min(tables)]["teacher"]["bleu_greedy"] - student_mean
    lines = [steps.seed_summary(tables, ROWS, p_values), "",
             f"Teacher greedy BLEU minus the student baseline's mean: {margin:+.2f}.", "",
             "| Claim | Verdict | Numbers |", "|---|---|---|", *[f"| {c} | {v} | {n} |" for c, v, n in claims]]
    run_dir = Path(result["run_dir"])
    if (run_dir / "tune" / "choice.json").exists():
        c = json.loads((run_dir / "tune" / "choice.json").read_text())
        lines += ["", f"Relation settings chosen on validation (seed 1): Q-Q {c['qq']}, teacher layer "
                  f"{c['teacher_layer']}. Validation BLEU of MiniLM, then gold: " + ", ".join(
                      f"{name} {bleu:.2f}" for name, bleu in c["valid_bleu"].items()) + "; rescaled Q-Q weights "
                  "(K-K / Q-Q at the start): " + ", ".join(f"{t} {w:.3g}" for t, w in c["weights"].items()) + "."]
    folders = [r["folder"] for r in result["rows"]]
    stages = [f"{prefix}_s{s}" for s in sorted(tables) for _, _, prefix in RELATION_ROWS]   # the relation stages
    lines += ["", steps.convergence_table(run_dir, folders), "",
              steps.convergence_table(run_dir, stages, key="valid_loss"), "",
              steps.convergence_table(run_dir, [f"student_pretrain_s{s}" for s in sorted(tables)], key="valid_ppl")]
    return "\n".join(lines)


def decide(claim, better, worse, tables, alpha):
    """One claim: `better`'s greedy BLEU above `worse`'s. Holds: higher on the mean and on every seed,
    each seed's paired bootstrap p < alpha; does not hold: not higher on the mean; else not significant."""
    seeds = [s for s, t in tables.items() if better in t and worse in t]
    if not seeds:
        return claim, "not run", ""
    diffs = {s: tables[s][better]["bleu_greedy"] - tables[s][worse]["bleu_greedy"] for s in seeds}
    ps = {s: paired_bootstrap(tables[s][worse]["hyps_greedy"], tables[s][better]["hyps_greedy"],
                              tables[s][worse]["refs"])[2] for s in seeds}
    mean = statistics.fmean(diffs.values())
    if mean <= 0:
        verdict = "does not hold"
    elif all(diffs[s] > 0 and ps[s] < alpha for s in seeds):
        verdict = "holds"
    else:
        verdict = "not significant"
    per_seed = "; ".join(f"seed {s}: {diffs[s]:+.2f}, p = {ps[s]:.3f}" for s in seeds)
    return claim, verdict, f"mean {mean:+.2f} ({per_seed})"


def main(argv=None):
    return steps.main(parse_args, run, argv)


if __name__ == "__main__":
    main()
