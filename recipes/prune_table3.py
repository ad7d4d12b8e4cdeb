"""Kim & Rush (2016), Table 3: prune the best distilled student, retrain it, and measure.

    python recipes/prune_table3.py --table1 runs/kim_rush_multi30k --run-dir runs/table3

--table1 takes every input from the run folder of recipes/kim_rush.py (Table 1): the student
with the highest validation BLEU, the teacher, the Seq-KD and Seq-Inter data it made, and its
validation and test files. Or name them one by one:

    T1=runs/kim_rush_multi30k C=data/multi30k
    python recipes/prune_table3.py --student $T1/student_seqkd_seqinter/best.pt \\
        --teacher $T1/teacher/best.pt --kd-src $C/train.en \\
        --kd-tgt $T1/distill/train.seqkd.de --inter-tgt $T1/distill/train.seqinter.de \\
        --valid-src $C/valid.en --valid-tgt $C/valid.de --test-src $C/test.en --test-tgt $C/test.de \\
        --run-dir runs/table3 [--train-args "--device cuda --batch-size 128"]

    python recipes/prune_table3.py --across runs/table3_s1 runs/table3_s2 runs/table3_s3
                                              # one table over three students: mean ± sd, p-values
    python recipes/prune_table3.py --demo     # the whole pipeline on a slice of the built-in
                                              # corpus, ~1.5 CPU minutes (numbers mean nothing)

In the paper the pruned student is Seq-KD + Seq-Inter. Every row runs the same five steps, with
the command-line tools a user would run by hand:

    1. prune.py   --ckpt STUDENT --amount A --scheme S              -> ROW/pruned.pt
    2. translate.py --report: greedy and beam-5 BLEU, before retraining -> ROW/before.json
    3. train.py   --init ROW/pruned.pt on the Seq-KD data             -> ROW/retrain/
    4. train.py   --init ROW/retrain/best.pt on the Seq-Inter data,
                  with a lower learning rate (as Kim & Rush)          -> ROW/finetune/
                  (skipped when there is no Seq-Inter data)

Each training runs until its validation BLEU has not improved for --patience evaluations (at most
--epochs), halving the rate when it falls: the 0% row is the control that gets the same retraining.
    5. translate.py --report of ROW/finetune/best.pt                  -> ROW/after.json

Rows: 0, 50, 80, 85 and 90% class-blind (Kim & Rush, Table 3), then class-uniform and
class-distribution at 80% (See et al. 2016, who find class-blind best). The masks travel in the
checkpoints, and train.py puts the pruned weights back to exactly 0 after every step.

Restartable (recipes/steps.py): a step whose output exists is skipped. Everything lives under
--run-dir; the table is printed at the end and written to RUN_DIR/table3.md. Two cores: run the
same command twice, each with --threads 1; each process takes the next row the other is not
running, and both print the table once every row is done.
"""
import argparse
import json
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))          # steps.py, next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root

import data  # noqa: E402
import prune  # noqa: E402
import runs  # noqa: E402
import steps  # noqa: E402
import synthetic  # noqa: E402
from report import paired_bootstrap  # noqa: E402
from model import count_params, load_checkpoint, model_from_checkpoint  # noqa: E402
from steps import train_step, translate_step, write_lines  # noqa: E402

AMOUNTS = [0.0, 0.5, 0.8, 0.85, 0.9]   # class-blind rows of Kim & Rush, Table 3
COMPARE_AT = 0.8                        # every scheme at this amount (See et al. 2016)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("inputs (all from the Table 1 recipe; not needed with --table1 or --demo)")
    g.add_argument("--table1", metavar="RUN_DIR",
                   help="the run folder of recipes/kim_rush.py: fills in every input below")
    g.add_argument("--student", help="the best distilled student checkpoint")
    g.add_argument("--teacher", help="the teacher checkpoint: the 'size vs teacher' column")
    g.add_argument("--kd-src", help="source side of the Seq-KD (and Seq-Inter) training data")
    g.add_argument("--kd-tgt", help="Seq-KD targets: the teacher's beam output on --kd-src")
    g.add_argument("--inter-tgt", help="Seq-Inter targets: the teacher's n-best closest to the reference "
                   "(optional: without them step 4 is skipped)")
    g.add_argument("--valid-src", help="validation source")
    g.add_argument("--valid-tgt", help="validation references")
    g.add_argument("--test-src", help="test source: the BLEU of the table")
    g.add_argument("--test-tgt", help="test references")
    g = ap.add_argument_group("recipe")
    g.add_argument("--run-dir", default="runs/table3", help="where everything goes (default: runs/table3)")
    g.add_argument("--amounts", default=",".join(map(str, AMOUNTS)),
                   help="class-blind pruning amounts (default: %(default)s)")
    g.add_argument("--compare-at", type=float, default=COMPARE_AT,
                   help="also prune with every scheme at this amount (default: %(default)s)")
    g.add_argument("--schemes", default=",".join(prune.SCHEMES),
                   help="the schemes pruned at --compare-at (default: all three); with --amounts, a part of the "
                   "table for another process: e.g. --amounts 0 --schemes class-blind")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="passed to prune.py: leave these weight classes unpruned")
    g.add_argument("--optim", default="sgd", help="retraining optimizer (default: sgd, as Kim & Rush)")
    g.add_argument("--lr", type=float, default=0.5,
                   help="retraining rate on Seq-KD data, below the from-scratch rate (default: 0.5)")
    g.add_argument("--epochs", type=int, default=20,
                   help="at most this many retraining epochs on Seq-KD data (default: 20)")
    g.add_argument("--patience", type=int, default=3, help="every training stops after this many epochs "
                   "without a better validation BLEU (default: 3)")
    g.add_argument("--inter-lr", type=float, default=0.1,
                   help="the lower fine-tuning rate on Seq-Inter data (default: 0.1)")
    g.add_argument("--inter-epochs", type=int, default=10,
                   help="at most this many fine-tuning epochs on Seq-Inter data (default: 10)")
    g.add_argument("--beam", type=int, default=5, help="beam size of the BLEU columns (default: 5)")
    g.add_argument("--train-args", default="",
                   help="more train.py flags for every training, as one string, "
                   "e.g. \"--device cuda --batch-size 128\"")
    g.add_argument("--device", help="passed to translate.py (default: translate.py's, auto)")
    g.add_argument("--threads", type=int, help="CPU threads of every training and translation (two processes "
                   "on 2 cores: 1 each)")
    g.add_argument("--demo", action="store_true",
                   help="make every input from the built-in corpus, with tiny models and few steps")
    g.add_argument("--across", nargs="+", metavar="RUN_DIR",
                   help="train nothing: print the table over these run folders of this recipe (one per student): "
                   "mean ± sd of every row they have finished, paired tests, convergence")
    args = ap.parse_args(argv)
    if args.demo or args.across:
        return args
    if args.table1:
        try:
            from_table1(args)
        except data.UserError as e:
            ap.exit(2, f"error: {e}\n")
    missing = [f"--{k.replace('_', '-')}" for k in ("student", "kd_src", "kd_tgt", "valid_src",
                                                    "valid_tgt", "test_src", "test_tgt")
               if getattr(args, k) is None]
    if missing:
        ap.error(f"missing {', '.join(missing)} (or pass --demo)")
    return args


def best_student(run_dir):
    """The student folder of a Table 1 run with the highest validation BLEU (the test set is not
    looked at), read from each training's done.json. Teacher rows are not candidates."""
    scores = {done.parent.name: json.loads(done.read_text())["best_valid_bleu"]
              for done in sorted(Path(run_dir).glob("student*/done.json"))}
    if not scores:
        raise data.UserError(f"--table1 {run_dir}: no finished student (student*/done.json); "
                             "run recipes/kim_rush.py to the end first")
    return max(scores, key=scores.get), scores


def from_table1(args):
    """Fill ARGS's input flags from the run folder of recipes/kim_rush.py (its files.json and
    distill/ folder); a flag given on the command line wins."""
    run_dir = Path(args.table1)
    files_json = run_dir / "files.json"
    if not files_json.exists():
        raise data.UserError(f"--table1 {run_dir}: no files.json; is this the run folder of recipes/kim_rush.py? "
                             "(rerun that recipe's command: it writes files.json and redoes nothing)")
    files = json.loads(files_json.read_text())
    found = {"teacher": run_dir / "teacher" / "best.pt",
             "kd_src": files["train"][0], "kd_tgt": run_dir / "distill" / f"train.seqkd.{files['tgt']}",
             "inter_tgt": run_dir / "distill" / f"train.seqinter.{files['tgt']}",
             "valid_src": files["valid"][0], "valid_tgt": files["valid"][1],
             "test_src": files["test"][0], "test_tgt": files["test"][1]}
    if args.student is None:
        name, scores = best_student(run_dir)
        print("--table1: validation BLEU of the students: " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1])) + f"; pruning {name}")
        found["student"] = run_dir / name / "best.pt"
    if args.inter_tgt is None and not Path(found["inter_tgt"]).exists():
        print(f"--table1: no Seq-Inter data in {run_dir} (that Table 1 setting has no Seq-Inter rows): "
              "each row is retrained on the Seq-KD data only")
        del found["inter_tgt"]
    for key, path in found.items():
        if getattr(args, key) is None:
            if not Path(path).exists():
                raise data.UserError(f"--table1 {run_dir}: {path} is missing; finish recipes/kim_rush.py first")
            setattr(args, key, str(path))


# A row: each step is skipped when its output exists -----------------------------------------

def nonzero_params(ckpt_path):
    return prune.count_nonzero(model_from_checkpoint(load_checkpoint(str(ckpt_path))))


def run_row(name, amount, scheme, args, run_dir):
    """Prune, measure, retrain on Seq-KD, fine-tune on Seq-Inter, measure. Returns the table row."""
    row_dir = run_dir / "rows" / name
    row_dir.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    report_flags = ["--no-progress"] + (["--device", args.device] if args.device else []) + threads

    def report(when, ckpt):      # translate.py --report on the test set: BLEU of greedy and of beam search
        return steps.report_step(f"{name}: report {when} retraining", ckpt, args.test_src, args.test_tgt,
                                 row_dir / f"{when}.json", args.beam, report_flags)

    pruned = row_dir / "pruned.pt"
    if not pruned.exists():
        argv = ["--ckpt", args.student, "--amount", str(amount), "--scheme", scheme, "--out", str(pruned)]
        argv += [flag for pattern in args.exclude for flag in ("--exclude", pattern)]
        argv += ["--teacher", args.teacher] if args.teacher else []
        steps.announce(f"{name}: prune")
        print(f"python prune.py {' '.join(argv)}", flush=True)
        prune.main(argv)
    before = report("before", pruned)

    extra = shlex.split(args.train_args) + threads
    data_flags = ["--valid-src", args.valid_src, "--valid-tgt", args.valid_tgt, "--optim", args.optim,
                  "--best-metric", "bleu",  # Seq-KD students: their reference perplexity misleads
                  "--patience", str(args.patience), "--decay-on-plateau"]
    retrained = train_step(f"{name}: retrain on the Seq-KD data", row_dir / "retrain",
                           ["--init", str(pruned), "--train-src", args.kd_src, "--train-tgt", args.kd_tgt,
                            "--lr", str(args.lr), "--epochs", str(args.epochs)] + data_flags + extra)
    final = retrained if args.inter_tgt is None else train_step(
        f"{name}: fine-tune on the Seq-Inter data", row_dir / "finetune",
        ["--init", retrained, "--train-src", args.kd_src, "--train-tgt", args.inter_tgt,
         "--lr", str(args.inter_lr), "--epochs", str(args.inter_epochs)] + data_flags + extra)
    after = report("after", final)
    return {"name": name, "scheme": scheme, "amount": amount,
            "nonzero_pruned": nonzero_params(pruned), "nonzero": nonzero_params(final),
            "greedy_before": before["bleu_greedy"], "beam_before": before["bleu_beam"],
            "greedy_after": after["bleu_greedy"], "beam_after": after["bleu_beam"],
            "hyps_greedy": after["hyps_greedy"], "refs": after["refs"]}


def row_job(name, amount, scheme, args, run_dir, wait):
    """run_row, unless another process of the same command is running this row (then: wait for it,
    or with wait=False return None at once). A row is done when its after.json exists."""
    row_dir = run_dir / "rows" / name
    row_dir.mkdir(parents=True, exist_ok=True)
    done = row_dir / "after.json"
    if not done.exists() and not steps.claim(row_dir / "row.running", name, wait, done) and not done.exists():
        return None
    row = run_row(name, amount, scheme, args, run_dir)
    (row_dir / "row.running").unlink(missing_ok=True)
    return row


def against_control(rows):
    """Each row's greedy BLEU after retraining against the 0% row's (the control, retrained the
    same way): "delta" and sacrebleu's paired bootstrap p (1,000 resamples), in every row, when
    the table has a 0% class-blind row. The control's own p is 1."""
    control = next((r for r in rows if r["amount"] == 0 and r["scheme"] == "class-blind"), None)
    for r in rows if control else []:
        r["delta"] = round(r["greedy_after"] - control["greedy_after"], 2)
        r["p"] = paired_bootstrap(control["hyps_greedy"], r["hyps_greedy"], control["refs"])[2]


def across_students(run_dirs, noise=1.0):
    """Markdown: Table 3 over several run folders of this recipe (one per student, each pruned and
    retrained the same way), from the rows they have finished. Per row: mean ± sd of the test BLEU
    before and after retraining; Δ greedy (mean over students) against a reference row of the same student,
    with sacrebleu's paired bootstrap p per student: class-blind rows against the 0% control, the
    other schemes against class-blind at the same amount; and how many retraining curves
    (ROW/retrain and ROW/finetune) converged by steps.curve_end."""
    found = {}                                                    # {row name: {student index: after.json}}
    before = {}                                                   # the same for before.json (pruned, not retrained)
    for i, run_dir in enumerate(run_dirs):
        for after in sorted(Path(run_dir).glob("rows/*/after.json")):
            found.setdefault(after.parent.name, {})[i] = json.loads(after.read_text())
            before.setdefault(after.parent.name, {})[i] = json.loads(after.with_name("before.json").read_text())

    def key(name):                                                # table_rows' order: class-blind first
        scheme, pct = name.rsplit("-", 1)
        return scheme != "class-blind", int(pct), scheme

    def spread(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {sd:.2f}"

    lines = ["| scheme | pruned | students | greedy before | greedy after | beam after | against | Δ greedy "
             "| p per student | curves converged | minutes |", "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
    for name in sorted(found, key=key):
        scheme, pct = name.rsplit("-", 1)
        ref = "class-blind-00" if scheme == "class-blind" else f"class-blind-{pct}"
        rows = found[name]
        paired = [i for i in rows if i in found.get(ref, {})]
        deltas = [rows[i]["bleu_greedy"] - found[ref][i]["bleu_greedy"] for i in paired]
        ps = [paired_bootstrap(found[ref][i]["hyps_greedy"], rows[i]["hyps_greedy"], rows[i]["refs"])[2]
              for i in paired] if name != ref else []
        curves = [steps.curve_end(log, noise) for i in rows
                  for log in sorted((Path(run_dirs[i]) / "rows" / name).glob("*/log.jsonl"))]
        delta = f"{statistics.fmean(deltas):+.2f}" if deltas and name != ref else "–"
        greedy_before = [r["bleu_greedy"] for r in before[name].values()]
        lines.append(f"| {scheme} | {int(pct)}% | {len(rows)} | {spread(greedy_before)} "
                     f"| {spread([r['bleu_greedy'] for r in rows.values()])} "
                     f"| {spread([r['bleu_beam'] for r in rows.values()])} | {'–' if name == ref else ref} | "
                     f"{delta} | {', '.join(f'{p:.3f}' for p in ps) or '–'} | "
                     f"{sum(c['converged'] for c in curves)}/{len(curves)} | "
                     f"{sum(c['minutes'] for c in curves) / len(rows):.0f} |")
    lines.append(f"Run folders: {', '.join(map(str, run_dirs))}. Test-set BLEU of the pruned student before and "
                 "after retraining, mean ± sd over "
                 "the students; p: sacrebleu's paired bootstrap (1,000 resamples) of the greedy output against "
                 f"'against' of the same student; a curve converged: its last 3 validation BLEU within {noise:g} "
                 "of its best; minutes: retraining and fine-tuning, per student.")
    return "\n".join(lines)


# The demo: every input made from a slice of the built-in corpus -----------------------------

def prepare_demo(args, run_dir):
    """A teacher, its Seq-KD and Seq-Inter data, and a student trained on them: a miniature Table 1
    recipe, just enough for the pipeline to run. Fills in the input flags of ARGS."""
    d = run_dir / "demo-data"
    d.mkdir(parents=True, exist_ok=True)
    splits = synthetic.builtin_splits()
    for split, n in (("train", 500), ("valid", 50), ("test", 50)):
        for side, i in (("src", 0), ("tgt", 1)):
            path = d / f"{split}.{side}"
            if not path.exists():
                write_lines(path, [pair[i] for pair in splits[split][:n]])
    files = ["--valid-src", str(d / "valid.src"), "--valid-tgt", str(d / "valid.tgt"), "--device", "cpu",
             "--batch-size", "32", "--eval-every", "40"]
    teacher = train_step("demo: teacher", d / "teacher",
                         ["--train-src", str(d / "train.src"), "--train-tgt", str(d / "train.tgt"),
                          "--preset", "builtin", "--optim", "adam", "--lr", "0.003", "--max-steps", "120"] + files)
    flags = ["--ckpt", teacher, "--src", str(d / "train.src"), "--device", "cpu", "--no-progress"]
    translate_step("demo: Seq-KD data, the teacher's beam-5 output", d / "train.kd", flags + ["--beam", "5"])
    translate_step("demo: Seq-Inter data, the n-best entry closest to the reference", d / "train.inter",
                   flags + ["--ref", str(d / "train.tgt"), "--beam", "5", "--nbest", "5", "--select", "sentence-bleu"])
    args.student = train_step("demo: student", d / "student",
                              ["--train-src", str(d / "train.src"), "--train-tgt", str(d / "train.kd"),
                               "--vocab-from", teacher, "--preset", "builtin", "--hidden", "64",
                               "--optim", "adam", "--lr", "0.003", "--max-steps", "80"] + files)
    args.teacher = teacher
    args.kd_src, args.kd_tgt, args.inter_tgt = str(d / "train.src"), str(d / "train.kd"), str(d / "train.inter")
    args.valid_src, args.valid_tgt = str(d / "valid.src"), str(d / "valid.tgt")
    args.test_src, args.test_tgt = str(d / "test.src"), str(d / "test.tgt")
    args.optim, args.lr, args.inter_lr, args.device = "adam", 0.001, 0.0003, "cpu"
    args.train_args = "--device cpu --batch-size 32 --max-steps 12 " + args.train_args
    return args


# The table ----------------------------------------------------------------------------------

def format_table(rows, student_params, teacher_params, beam_size, inter=True):
    b = f"beam {beam_size}"
    lines = [f"| scheme | pruned | non-zero params | size vs teacher | greedy before | {b} before "
             f"| greedy after | {b} after | Δ greedy vs 0% | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{teacher_params / r['nonzero']:.1f}x fewer" if teacher_params else "-"
        versus = f"{r['delta']:+.2f} | {r['p']:.3f}" if "p" in r else "- | -"
        lines.append(f"| {r['scheme']} | {r['amount']:.0%} | {r['nonzero']:,} | {ratio} "
                     f"| {r['greedy_before']:.2f} | {r['beam_before']:.2f} "
                     f"| {r['greedy_after']:.2f} | {r['beam_after']:.2f} | {versus} |")
    after = "retrained on Seq-KD data" + (", then fine-tuned on Seq-Inter data" if inter else "")
    lines.append(f"student: {student_params:,} parameters" +
                 (f"; teacher: {teacher_params:,}" if teacher_params else "") + f". 'after' = {after}; test-set BLEU. "
                 "Δ and p: greedy BLEU after against the 0% row, the control retrained the same way "
                 "(sacrebleu's paired bootstrap, 1,000 resamples).")
    return "\n".join(lines)


def table_rows(amounts, compare_at, schemes):
    """The rows [(amount, scheme)]: class-blind at every amount, then each scheme at compare_at."""
    unknown = [s for s in schemes if s not in prune.SCHEMES]
    if unknown:
        raise data.UserError(f"--schemes: unknown {', '.join(unknown)} (known: {', '.join(prune.SCHEMES)})")
    rows = [(a, "class-blind") for a in amounts]
    return rows + [(compare_at, s) for s in schemes if (compare_at, s) not in rows]


def main(argv=None):
    return steps.main(parse_args, run, argv)


def run(args):
    if args.across:
        missing = [d for d in args.across if not Path(d, "rows").is_dir()]
        if missing:
            raise data.UserError(f"--across: {', '.join(missing)} holds no rows/ folder; give run folders "
                                 "of this recipe (its --run-dir)")
        print(across_students([Path(d) for d in args.across]))
        return None
    try:
        amounts = [float(a) for a in args.amounts.split(",")]
    except ValueError:
        raise data.UserError(f"--amounts {args.amounts}: give comma-separated fractions, e.g. 0,0.5,0.8") from None
    for amount in amounts + [args.compare_at]:
        if not 0.0 <= amount < 1.0:
            raise data.UserError(f"--amounts / --compare-at: {amount} is outside [0, 1); give fractions, e.g. 0.8")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        args = prepare_demo(args, run_dir)
    settings = table_rows(amounts, args.compare_at, args.schemes.split(","))

    names = [f"{scheme}-{round(amount * 100):02d}" for amount, scheme in settings]
    # two processes of the same command (each --threads 1) share the rows; then every row is read back
    steps.run_jobs([((), partial(row_job, name, amount, scheme, args, run_dir))
                    for name, (amount, scheme) in zip(names, settings)])
    rows = [run_row(name, amount, scheme, args, run_dir) for name, (amount, scheme) in zip(names, settings)]
    for row in rows:     # the masks held through both trainings: no pruned weight came back
        if row["nonzero"] > row["nonzero_pruned"]:
            print(f"warning: {row['name']} has more non-zero weights after retraining than after pruning")

    student_params = count_params(model_from_checkpoint(load_checkpoint(args.student)))
    teacher_params = count_params(model_from_checkpoint(load_checkpoint(args.teacher))) if args.teacher else None
    against_control(rows)
    table = format_table(rows, student_params, teacher_params, args.beam, inter=args.inter_tgt is not None)
    runs.write_atomically(run_dir / "table3.md", lambda f: f.write(table + "\n"), mode="w")
    runs.write_json([{k: v for k, v in r.items() if k not in ("hyps_greedy", "refs")} for r in rows],
                    run_dir / "table3.json")
    print("\n" + table)
    if args.demo:
        print("(--demo: tiny models trained for a few steps; the numbers only show that the pipeline runs)")
    return rows


if __name__ == "__main__":
    main()
