"""Kim & Rush (2016), "Sequence-Level Knowledge Distillation", Table 1 with one command.

    python recipes/kim_rush.py --builtin                 # built-in corpus, ~10 min on 2 CPU cores
    python prepare.py multi30k --out data/multi30k       # or any folder of {train,valid,test}.{en,de}
    python recipes/kim_rush.py --corpus data/multi30k --valid-split valid   # -> runs/kim_rush_multi30k

A flat list of steps (recipes/steps.py: each calls train.main or translate.main with the flags a
user would type, and is skipped when its output exists, so the same command continues after an
interrupt). The settings are in RUN_DIR/settings.json; other settings need another --run-dir.

  step 1   train the teacher                                     -> teacher/best.pt
  step 2   Seq-KD data: the teacher's beam-5 translation of the training source (section 3.2)
                                                                 -> distill/train.seqkd.TGT
  step 3   Seq-Inter data: the teacher's K-best list of each training sentence, keeping the
           entry closest to the reference by smoothed sentence BLEU (section 3.3)
                                                                 -> distill/train.seqinter.TGT
  step 4   teacher + Seq-Inter: fine-tune the teacher on the Seq-Inter data (smaller lr)
  step 5   student baseline: NLL on the reference translations
  step 6   Word-KD: the student matches the teacher's word distributions on the references (3.1)
  step 7   Seq-KD: NLL on the Seq-KD data
  step 8   Seq-KD + Seq-Inter: fine-tune the Seq-KD student on the Seq-Inter data (smaller lr);
           the student Table 3 prunes (recipes/prune_table3.py can start once it exists)
  step 9   Seq-KD + Word-KD: Word-KD on the Seq-KD data
  step 10  Seq-KD + Seq-Inter + Word-KD: fine-tune the Seq-KD + Word-KD student on the Seq-Inter
           data with Word-KD (our reading of the paper's last row)
  step 11  the Table 1 columns of every model on the test set (translate.py --report)
  step 12  the table, and the paper's six claims checked on it (check_claims):
           RUN_DIR/table1.md and RUN_DIR/table1.json

Every student takes the teacher's vocabularies (--vocab-from, or --teacher/--init which imply
it), so Word-KD compares distributions over the same words. Every model is chosen by validation
greedy BLEU (train.py --best-metric bleu), the same rule for every row: a Seq-KD student's
perplexity on the references rises while its BLEU improves (the paper's Table 1), so choosing by
perplexity would penalise exactly the models distillation is about.

The hyper-parameters are fixed below, before any run, and are not tuned toward the paper's claims.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # steps.py, next to this file

import steps  # noqa: E402
from steps import train_step, translate_step  # noqa: E402


# Hyper-parameters, fixed up front, one dict per setting --------------------------------------
# The student has about 1/4 of the teacher's parameters (the paper's 2x500 student against its
# 4x1000 teacher is ~1/4-1/5).

SETTINGS = {
    # A real corpus (e.g. Multi30k, 29k pairs) on 2 CPU cores in about 1.5-2 hours. A joint
    # 8k-piece sentencepiece vocabulary; teacher 2x256 (8.5M parameters with an 8k vocabulary),
    # student 2x128 with 64-dim embeddings (2.6M, about 0.3 of the teacher).
    "corpus": dict(
        tokenizer=["--tokenizer", "spm", "--joint-vocab", "--src-vocab-size", "8000",
                   "--tgt-vocab-size", "8000"],
        # Bidirectional encoders: a first run with unidirectional ones had the teacher at 11.9
        # validation BLEU after 5 epochs, where the bidirectional 2x384 model of BENCHMARKS.md had 31.3.
        teacher=["--layers", "2", "--hidden", "256", "--emb-dim", "256", "--bidirectional", "--dropout", "0.3"],
        student=["--layers", "2", "--hidden", "128", "--emb-dim", "64", "--bidirectional", "--dropout", "0.2"],
        optim=["--optim", "adam", "--batch-size", "64", "--decay-after", "7"],
        lr=1e-3,              # Adam, teacher and students
        finetune_lr=1e-4,     # Seq-Inter fine-tuning: 10x smaller (the paper fine-tunes with a smaller rate)
        teacher_epochs=10,
        student_epochs=10,
        finetune_epochs=2,
        kd_alpha=0.5,         # the paper's alpha, T = 1
        seqkd_beam=5,         # the paper's K for Seq-KD data
        seqinter_beam=12,     # the paper used K = 35; 12 keeps the 29k-sentence pass to ~15 min on 2 CPU cores
        report_beam=5,
        max_train=None,       # use every training pair
        max_eval=None,        # and every validation and test pair
    ),
    # The built-in synthetic corpus (synthetic.builtin_splits: 20k training pairs, 500 valid, 500 test),
    # the whole table in about 10-15 minutes on 2 CPU cores. The training settings are those of
    # the default `python train.py` run (bidirectional encoder, Adam 5e-3, 32 sentences a batch),
    # with which a 1x128 model reaches ~80 validation BLEU in 3 epochs. Teacher 1x128 with 64-dim
    # embeddings (302k parameters), student 1x64 with 32-dim embeddings (82k, 0.27 of the teacher).
    "builtin": dict(
        tokenizer=["--tokenizer", "word"],
        teacher=["--layers", "1", "--hidden", "128", "--emb-dim", "64", "--bidirectional", "--dropout", "0.1"],
        student=["--layers", "1", "--hidden", "64", "--emb-dim", "32", "--bidirectional", "--dropout", "0.1"],
        optim=["--optim", "adam", "--batch-size", "32"],
        lr=5e-3,
        finetune_lr=5e-4,
        teacher_epochs=4,
        student_epochs=5,
        finetune_epochs=1,
        kd_alpha=0.5,
        seqkd_beam=5,
        seqinter_beam=10,     # the paper's K = 35 would take several minutes more here
        report_beam=5,
        max_train=None,
        max_eval=None,
    ),
}
# Absurdly small: only checks that every step runs (tests/test_recipes.py). The built-in setting
# with tiny models, one student epoch (ten for the teacher, so that its beam output is more than
# </s>: the Seq-KD step refuses an empty corpus), small beams and a slice of the corpus.
SETTINGS["smoke"] = dict(
    SETTINGS["builtin"],
    teacher=["--layers", "1", "--hidden", "16", "--emb-dim", "8", "--dropout", "0.0"],
    student=["--layers", "1", "--hidden", "8", "--emb-dim", "8", "--dropout", "0.0"],
    lr=1e-2, finetune_lr=1e-3, teacher_epochs=10, student_epochs=1,
    seqkd_beam=2, seqinter_beam=3, report_beam=2, max_train=200, max_eval=50)

# The rows of Table 1: (name, model folder under the run folder).
ROWS = [
    ("Teacher baseline", "teacher"),
    ("Teacher + Seq-Inter", "teacher_seqinter"),
    ("Student baseline", "student"),
    ("Word-KD", "student_wordkd"),
    ("Seq-KD", "student_seqkd"),
    ("Seq-KD + Word-KD", "student_seqkd_wordkd"),
    ("Seq-KD + Seq-Inter", "student_seqkd_seqinter"),
    ("Seq-KD + Seq-Inter + Word-KD", "student_seqkd_wordkd_seqinter"),
]


# The paper's claims, each a test on the table. The thresholds are ours, fixed with the
# recipe: "several times" is at least 2x, "about the teacher's beam BLEU" is within 1 BLEU, and
# "greedy ≈ beam" is at least the beam BLEU minus 0.5.
def check_claims(r):
    """r: {model folder: report}. Returns [(claim, holds, the numbers)] for the six claims."""
    t, tsi, base = r["teacher"], r["teacher_seqinter"], r["student"]
    wkd, skd = r["student_wordkd"], r["student_seqkd"]
    # BLEU differences at the table's precision, so that a "+0.00" never counts as a gain
    d_skd = round(skd["bleu_greedy"] - base["bleu_greedy"], 2)
    d_wkd = round(wkd["bleu_greedy"] - base["bleu_greedy"], 2)
    gain_skd = round(skd["bleu_beam"] - skd["bleu_greedy"], 2)
    gain_base = round(base["bleu_beam"] - base["bleu_greedy"], 2)
    p_ratio = skd["p_beam"] / max(base["p_beam"], 1e-12)
    speedup = skd["words_per_s_greedy"] / t["words_per_s_beam"]
    return [
        ("1. Seq-KD student greedy BLEU > student baseline (paper: +4.2)",
         d_skd > 0, f"{d_skd:+.2f}"),
        ("2. Word-KD improves on the baseline, less than Seq-KD (paper: +0.7)",
         0 < d_wkd < d_skd, f"Word-KD {d_wkd:+.2f}, Seq-KD {d_skd:+.2f}"),
        ("3. Seq-KD gains less from beam search than the baseline (paper: +0.1 vs +2.9)",
         gain_skd < gain_base, f"{gain_skd:+.2f} vs {gain_base:+.2f}"),
        ("4. p(t = ŷ) of Seq-KD ≥ 2x the baseline's, perplexity higher (paper: 16.9% vs 0.9%; 22.7 vs 8.2)",
         p_ratio >= 2 and skd["ppl"] > base["ppl"],
         f"{100 * skd['p_beam']:.1f}% vs {100 * base['p_beam']:.1f}% ({p_ratio:.1f}x); "
         f"PPL {skd['ppl']:.2f} vs {base['ppl']:.2f}"),
        ("5. Teacher + Seq-Inter greedy ≥ teacher beam − 0.5 (paper: 19.6 vs 19.5)",
         tsi["bleu_greedy"] >= t["bleu_beam"] - 0.5, f"{tsi['bleu_greedy']:.2f} vs {t['bleu_beam']:.2f}"),
        ("6. Seq-KD greedy ≥ 5x faster than teacher beam, within 1 BLEU of it",
         speedup >= 5 and skd["bleu_greedy"] >= t["bleu_beam"] - 1,
         f"{speedup:.1f}x; {skd['bleu_greedy']:.2f} vs {t['bleu_beam']:.2f}"),
    ]


def claims_markdown(claims):
    lines = ["| Claim (Kim & Rush 2016) | Holds here? | Numbers |", "|---|---|---|"]
    lines += [f"| {claim} | {'holds' if holds else 'does not hold'} | {numbers} |"
              for claim, holds, numbers in claims]
    return "\n".join(lines)


def add_claims(result):
    """Step 12: the six claims checked on the table, into result["claims"]; their Markdown table."""
    claims = check_claims({row["folder"]: row for row in result["rows"]})
    result["claims"] = [dict(claim=c, holds=h, numbers=n) for c, h, n in claims]
    return claims_markdown(claims)


# The recipe ----------------------------------------------------------------------------------

def parse_args(argv=None):
    return steps.parse_args(argv, "Kim & Rush (2016) Table 1 in one command: teacher, students, "
                            "Word-KD, Seq-KD, Seq-Inter, and the table.", "kim_rush")


def run(args):
    t_start = time.time()
    setting_name, S, run_dir, tgt, files = steps.setup_run(args, SETTINGS, "kim_rush", "Kim & Rush (2016) Table 1")
    (train_src, train_ref), (valid_src, valid_ref), (test_src, test_ref) = files["train"], files["valid"], files["test"]
    # Flags every training shares: the validation data, the optimiser, seed and device.
    common = ["--valid-src", valid_src, "--valid-tgt", valid_ref, *S["optim"],
              "--best-metric", "bleu", "--seed", str(args.seed), "--device", args.device]

    def train_on(tgt_file, epochs, lr):
        return ["--train-src", train_src, "--train-tgt", tgt_file, *common,
                "--epochs", str(epochs), "--lr", str(lr)]

    seqkd_tgt = str(run_dir / "distill" / f"train.seqkd.{tgt}")
    seqinter_tgt = str(run_dir / "distill" / f"train.seqinter.{tgt}")

    teacher = train_step("step 1: train the teacher (NLL on the references)", run_dir / "teacher",
                         train_on(train_ref, S["teacher_epochs"], S["lr"]) + S["tokenizer"] + S["teacher"])
    word_kd = ["--teacher", teacher, "--kd-alpha", str(S["kd_alpha"])]     # Word-KD: T = 1, as the paper

    translate_step(f"step 2: Seq-KD data: the teacher's beam-{S['seqkd_beam']} translation of the training "
                   "source", seqkd_tgt, ["--ckpt", teacher, "--src", train_src, "--beam", str(S["seqkd_beam"]),
                                         "--device", args.device])

    K = S["seqinter_beam"]
    translate_step(f"step 3: Seq-Inter data: the teacher's {K}-best list, the entry with the highest "
                   "sentence BLEU against the reference", seqinter_tgt,
                   ["--ckpt", teacher, "--src", train_src, "--ref", train_ref, "--beam", str(K),
                    "--nbest", str(K), "--select", "sentence-bleu", "--device", args.device])

    train_step("step 4: teacher + Seq-Inter (fine-tune the teacher on the Seq-Inter data)",
               run_dir / "teacher_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", teacher])

    student = S["student"] + ["--vocab-from", teacher]        # the teacher's vocabularies
    train_step("step 5: student baseline (NLL on the references)", run_dir / "student",
               train_on(train_ref, S["student_epochs"], S["lr"]) + student)
    train_step("step 6: Word-KD student (on the references)", run_dir / "student_wordkd",
               train_on(train_ref, S["student_epochs"], S["lr"]) + student + word_kd)
    seqkd = train_step("step 7: Seq-KD student (NLL on the teacher's beam output)", run_dir / "student_seqkd",
                       train_on(seqkd_tgt, S["student_epochs"], S["lr"]) + student)

    train_step("step 8: Seq-KD + Seq-Inter (fine-tune the Seq-KD student on the Seq-Inter data)",
               run_dir / "student_seqkd_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", seqkd])

    seqkd_wordkd = train_step("step 9: Seq-KD + Word-KD student (Word-KD on the Seq-KD data)",
                              run_dir / "student_seqkd_wordkd",
                              train_on(seqkd_tgt, S["student_epochs"], S["lr"]) + student + word_kd)
    train_step("step 10: Seq-KD + Seq-Inter + Word-KD (fine-tune the Seq-KD + Word-KD student on "
               "the Seq-Inter data, with Word-KD)", run_dir / "student_seqkd_wordkd_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", seqkd_wordkd]
               + word_kd)

    # steps 11 and 12: the Table 1 columns of every model on the test set, the table, the claims
    return steps.report_and_table("step 11", "Kim & Rush (2016), Table 1", "table1", run_dir, ROWS, S,
                                  setting_name, test_src, test_ref, args.device, t_start,
                                  "Δ: teacher rows against the teacher baseline, student rows against the "
                                  "student baseline.", more=add_claims)


def main(argv=None):
    return steps.main(parse_args, run, argv)


if __name__ == "__main__":
    main()
