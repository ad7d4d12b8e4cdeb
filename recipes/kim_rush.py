"""
Kim & Rush (2016), "Sequence-Level Knowledge Distillation", Table 1 with one command.

    python recipes/kim_rush.py --builtin                       # built-in corpus, ~10 min on 2 CPU cores
    python recipes/kim_rush.py --corpus ../shared/data/multi30k --src en --tgt de \
        --test-split test_2016_flickr --run-dir runs/kim_rush_multi30k

The recipe is a flat list of steps. Each step calls the same entry points a user would type,
train.main([...flags...]) and beam.main([...flags...]), and writes its outputs under the run
folder; a step whose output already exists is skipped, so after an interrupt (Ctrl-C, a crash, a
reboot) the same command continues where it stopped (a half-finished training resumes with
train.py --resume, a half-finished translation resumes from its OUT.partial file). The settings
are recorded in RUN_DIR/settings.json; other settings need another --run-dir.

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
  step 11  the Table 1 columns of every model on the test set (beam.py --report)
  step 12  the table, and the paper's six claims checked on it (check_claims):
           RUN_DIR/table1.md and RUN_DIR/table1.json

Every student takes the teacher's vocabularies (--vocab-from, or --teacher/--init which imply
it), so Word-KD compares distributions over the same words. Every model is chosen by validation
greedy BLEU (train.py --best-metric bleu), the same rule for every row: a Seq-KD student's
perplexity on the references rises while its BLEU improves (the paper's Table 1), so choosing by
perplexity would penalise exactly the models distillation is about.

The hyper-parameters are fixed below, before any run, and are not tuned toward the paper's claims.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root

import torch  # noqa: E402

import beam  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from data import UserError  # noqa: E402
from model import pick_device  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Hyper-parameters, fixed up front. One dict per setting; the student has about 1/4 of the
# teacher's parameters (as the paper's 2x500 student against its 4x1000 teacher is ~1/4-1/5).
# ---------------------------------------------------------------------------------------------

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
    # The built-in synthetic corpus (data.builtin_splits: 20k training pairs, 500 valid, 500 test),
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
    # Absurdly small: only checks that every step runs (tests/test_recipes.py).
    "smoke": dict(
        tokenizer=["--tokenizer", "word"],
        teacher=["--layers", "1", "--hidden", "16", "--emb-dim", "8", "--dropout", "0.0"],
        student=["--layers", "1", "--hidden", "8", "--emb-dim", "8", "--dropout", "0.0"],
        optim=["--optim", "adam", "--batch-size", "32"],
        lr=1e-2,
        finetune_lr=1e-3,
        teacher_epochs=1,
        student_epochs=1,
        finetune_epochs=1,
        kd_alpha=0.5,
        seqkd_beam=2,
        seqinter_beam=3,
        report_beam=2,
        max_train=200,
        max_eval=50,
    ),
}

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


# ---------------------------------------------------------------------------------------------
# Step helpers: run a step unless its output exists
# ---------------------------------------------------------------------------------------------

def announce(text):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def train_step(title, save_dir, flags):
    """train.main(flags + --save-dir) unless save_dir/done.json says it finished; a run that was
    stopped half-way (last.pt, no done.json) continues with --resume. Returns save_dir/best.pt."""
    save_dir = Path(save_dir)
    done, running = save_dir / "done.json", save_dir / "running"
    while not done.exists() and (pid := other_process(running)):
        print(f"{title}: process {pid} is running it; waiting", flush=True)
        time.sleep(60)
    if done.exists():
        print(f"{title}: done already ({done})")
        return str(save_dir / "best.pt")
    announce(title)
    save_dir.mkdir(parents=True, exist_ok=True)
    running.write_text(str(os.getpid()))      # another process of the recipe waits for this step
    argv = flags + ["--save-dir", str(save_dir)]
    if (save_dir / "last.pt").exists():
        argv.append("--resume")
    print("python train.py " + " ".join(argv), flush=True)
    t0 = time.time()
    metrics = train.main(argv)
    if metrics.get("interrupted"):
        sys.exit("interrupted: run the same command again to continue")
    done.write_text(json.dumps(metrics, indent=1) + "\n")
    running.unlink()
    print(f"({title.split(':')[0]} took {time.time() - t0:.0f} s)")
    return str(save_dir / "best.pt")


def other_process(running):
    """The id of another live process named in the file `running`, else None."""
    try:
        pid = int(running.read_text())
        os.kill(pid, 0)                  # signal 0: no signal, only "does it exist?"
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:              # it exists, under another user
        pass
    return pid if pid != os.getpid() else None


def beam_step(title, out, flags):
    """beam.main(flags + --out) unless `out` exists (beam.py only renames OUT.partial to OUT when
    the whole file is translated, and resumes from OUT.partial itself)."""
    if os.path.exists(out):
        print(f"{title}: done already ({out})")
        return out
    announce(title)
    argv = flags + ["--out", out]
    print("python beam.py " + " ".join(argv), flush=True)
    t0 = time.time()
    beam.main(argv)
    print(f"({title.split(':')[0]} took {time.time() - t0:.0f} s)")
    return out


def report_step(title, ckpt, test_src, test_ref, out_json, k, device):
    """beam.py --report: BLEU greedy and beam K, perplexity, p(t = ŷ), parameters, speed."""
    if os.path.exists(out_json):
        print(f"{title}: done already ({out_json})")
    else:
        announce(title)
        argv = ["--ckpt", ckpt, "--src", test_src, "--ref", test_ref, "--beam", str(k),
                "--report", "--json", out_json, "--device", device]
        print("python beam.py " + " ".join(argv), flush=True)
        beam.main(argv)
    with open(out_json, encoding="utf-8") as f:
        return json.load(f)


def check_same_settings(path, settings):
    """A run folder belongs to one set of hyper-parameters: finished steps are reused, so mixing
    settings would mix models. The first run writes them; a later run must match."""
    settings = json.loads(json.dumps(settings))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise UserError(f"{path.parent} was made with other settings ({', '.join(changed)}): "
                            "give a new --run-dir, or delete that folder to start again")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# The corpus: a folder of {split}.{lang} files, or the built-in corpus written to such a folder
# ---------------------------------------------------------------------------------------------

def corpus_files(corpus, src, tgt, splits):
    """{split: (source path, target path)} for the named splits; UserError naming what is missing."""
    folder = Path(corpus)
    if not folder.is_dir():
        raise UserError(f"--corpus {corpus}: no such folder (expected a folder holding "
                        f"train.{src}, train.{tgt}, val.{src}, ...; is ../shared/data there?)")
    files = {}
    for split in splits:
        pair = (folder / f"{split}.{src}", folder / f"{split}.{tgt}")
        for path in pair:
            if not path.exists():
                found = sorted({p.name.rsplit(".", 1)[0] for p in folder.iterdir() if "." in p.name})
                raise UserError(f"--corpus {corpus}: no {path.name} (splits found: "
                                f"{', '.join(found) or 'none'}); check --src/--tgt, or name the "
                                "split with --valid-split / --test-split")
        files[split] = tuple(str(p) for p in pair)
    return files


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def write_builtin_corpus(folder):
    """The built-in synthetic corpus as files folder/{train,val,test}.{en,de}."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "test.de").exists():
        return
    splits = data.builtin_splits()
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        write_lines(folder / f"{name}.en", [s for s, _ in splits[split]])
        write_lines(folder / f"{name}.de", [t for _, t in splits[split]])   # written last: the marker


def first_lines(files, n, folder):
    """The first n lines of a (source, target) pair of files, as new files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        new = folder / Path(path).name
        if not new.exists():
            write_lines(new, data.read_lines(path)[:n])
        out.append(str(new))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def markdown_table(rows, k):
    """rows: [(name, report)] in ROWS order. Δ columns: against the teacher baseline for teacher
    rows, against the student baseline for student rows (as the paper's Table 1)."""
    head = (f"| Model | BLEU greedy | Δ | BLEU beam {k} | Δ | PPL | p(t = ŷ) | Params | "
            f"src words/s greedy | src words/s beam {k} |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baseline = None
    for name, r in rows:
        if name.endswith("baseline"):
            baseline = r
        d_greedy = r["bleu_greedy"] - baseline["bleu_greedy"]
        d_beam = r["bleu_beam"] - baseline["bleu_beam"]
        lines.append(f"| {name} | {r['bleu_greedy']:.2f} | {d_greedy:+.2f} | {r['bleu_beam']:.2f} | "
                     f"{d_beam:+.2f} | {r['ppl']:.2f} | {100 * r['p_beam']:.1f}% | {r['params']:,} | "
                     f"{r['words_per_s_greedy']:,.0f} | {r['words_per_s_beam']:,.0f} |")
    return "\n".join(lines)


# The paper's claims (issue 3), each a test on the table. The thresholds are ours, fixed with the
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


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None, description="Kim & Rush (2016) Table 1 in one command: teacher, students, "
               "Word-KD, Seq-KD, Seq-Inter, and the table.", recipe="kim_rush", extra_flags=None):
    """The flags every table recipe shares (recipes/t5_distill.py calls this too, with its
    extra_flags: [(flag, add_argument keyword arguments)])."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--corpus", help="folder with {train,val,test}.{SRC,TGT} files, e.g. ../shared/data/multi30k")
    p.add_argument("--src", default="en", help="source language suffix (default: en)")
    p.add_argument("--tgt", default="de", help="target language suffix (default: de)")
    p.add_argument("--valid-split", default="val", help="validation split name (default: val)")
    p.add_argument("--test-split", default="test", help="test split name, e.g. test_2016_flickr (default: test)")
    p.add_argument("--builtin", action="store_true", help="the built-in synthetic corpus")
    p.add_argument("--smoke", action="store_true", help="a tiny built-in run that only checks every step runs")
    p.add_argument("--run-dir", help=f"where everything goes (default: runs/{recipe}_<corpus>)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ... (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1, help="seed of every training (default: 1)")
    for flag, kwargs in extra_flags or []:
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    if sum([bool(args.corpus), args.builtin, args.smoke]) != 1:
        p.error("give exactly one of --corpus FOLDER, --builtin, --smoke")
    return args


def setup_run(args, settings, recipe, title):
    """Step 0 of a table recipe: the setting, the run folder and the corpus files. A missing
    corpus folder fails here, before anything is written. Returns (setting name, its settings,
    run folder, target language suffix, {"train"/"valid"/"test": (source file, reference file)})."""
    setting_name = "smoke" if args.smoke else "builtin" if args.builtin else "corpus"
    S = settings[setting_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    default_run = f"{recipe}_" + (setting_name if setting_name != "corpus" else Path(args.corpus).name)
    run_dir = Path(args.run_dir or Path("runs") / default_run)
    if args.corpus:
        src, tgt, valid_split, test_split = args.src, args.tgt, args.valid_split, args.test_split
        files = corpus_files(args.corpus, src, tgt, ["train", valid_split, test_split])
    else:
        src, tgt, valid_split, test_split = "en", "de", "val", "test"
        write_builtin_corpus(run_dir / "corpus")
        files = corpus_files(run_dir / "corpus", src, tgt, ["train", valid_split, test_split])
    for folder in (run_dir, run_dir / "distill", run_dir / "reports"):
        folder.mkdir(parents=True, exist_ok=True)
    print(f"{title}: setting '{setting_name}', run folder {run_dir}")
    check_same_settings(run_dir / "settings.json", dict(setting=setting_name, seed=args.seed, **S))
    if S["max_train"]:     # a smaller corpus, to fit the time budget of the setting
        files["train"] = first_lines(files["train"], S["max_train"], run_dir / "subset")
    if S["max_eval"]:
        for split in (valid_split, test_split):
            files[split] = first_lines(files[split], S["max_eval"], run_dir / "subset")
    files = {"train": files["train"], "valid": files[valid_split], "test": files[test_split]}
    # the corpus files, for the recipes that continue from this run (recipes/prune_table3.py --table1)
    absolute = {split: [os.path.abspath(path) for path in pair] for split, pair in files.items()}
    (run_dir / "files.json").write_text(json.dumps(dict(absolute, tgt=tgt), indent=1) + "\n")
    return setting_name, S, run_dir, tgt, files


def run(args):
    t_start = time.time()
    # ---- step 0: the setting, the run folder and the corpus ---------------------------------------
    setting_name, S, run_dir, tgt, files = setup_run(args, SETTINGS, "kim_rush", "Kim & Rush (2016) Table 1")
    (train_src, train_ref), (valid_src, valid_ref), (test_src, test_ref) = files["train"], files["valid"], files["test"]
    distill = run_dir / "distill"

    # Flags every training shares: the validation data, the optimiser, seed and device.
    common = ["--valid-src", valid_src, "--valid-tgt", valid_ref, *S["optim"],
              "--best-metric", "bleu", "--seed", str(args.seed), "--device", args.device]

    def train_on(tgt_file, epochs, lr):
        return ["--train-src", train_src, "--train-tgt", tgt_file, *common,
                "--epochs", str(epochs), "--lr", str(lr)]

    # The Word-KD flags: the teacher, alpha (T = 1, as the paper).
    seqkd_tgt = str(distill / f"train.seqkd.{tgt}")
    seqinter_tgt = str(distill / f"train.seqinter.{tgt}")
    teacher_dir = run_dir / "teacher"
    teacher = str(teacher_dir / "best.pt")
    word_kd = ["--teacher", teacher, "--kd-alpha", str(S["kd_alpha"])]

    # ---- step 1: the teacher, NLL on the references -------------------------------------------
    train_step("step 1: train the teacher (NLL on the references)", teacher_dir,
               train_on(train_ref, S["teacher_epochs"], S["lr"]) + S["tokenizer"] + S["teacher"])

    # ---- step 2: Seq-KD data, the teacher's beam search output on the training source ----------
    beam_step(f"step 2: Seq-KD data: the teacher's beam-{S['seqkd_beam']} translation of the training source",
              seqkd_tgt, ["--ckpt", teacher, "--src", train_src, "--beam", str(S["seqkd_beam"]),
                          "--device", args.device])

    # ---- step 3: Seq-Inter data, the K-best entry closest to the reference ----------------------
    K = S["seqinter_beam"]
    beam_step(f"step 3: Seq-Inter data: the teacher's {K}-best list, the entry with the highest "
              "sentence BLEU against the reference", seqinter_tgt,
              ["--ckpt", teacher, "--src", train_src, "--ref", train_ref, "--beam", str(K),
               "--nbest", str(K), "--select", "sentence-bleu", "--device", args.device])

    # ---- step 4: teacher + Seq-Inter: fine-tune the teacher on its Seq-Inter data ---------------
    train_step("step 4: teacher + Seq-Inter (fine-tune the teacher on the Seq-Inter data)",
               run_dir / "teacher_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", teacher])

    # ---- steps 5-8: students trained from scratch, all with the teacher's vocabularies ----------
    student = S["student"] + ["--vocab-from", teacher]
    train_step("step 5: student baseline (NLL on the references)", run_dir / "student",
               train_on(train_ref, S["student_epochs"], S["lr"]) + student)
    train_step("step 6: Word-KD student (on the references)", run_dir / "student_wordkd",
               train_on(train_ref, S["student_epochs"], S["lr"]) + student + word_kd)
    seqkd = train_step("step 7: Seq-KD student (NLL on the teacher's beam output)",
                       run_dir / "student_seqkd",
                       train_on(seqkd_tgt, S["student_epochs"], S["lr"]) + student)

    # ---- step 8: Seq-KD + Seq-Inter, fine-tune the Seq-KD student on the Seq-Inter data --------
    train_step("step 8: Seq-KD + Seq-Inter (fine-tune the Seq-KD student on the Seq-Inter data)",
               run_dir / "student_seqkd_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", seqkd])

    # ---- steps 9-10: Seq-KD + Word-KD, then its Seq-Inter fine-tuning ---------------------------
    seqkd_wordkd = train_step("step 9: Seq-KD + Word-KD student (Word-KD on the Seq-KD data)",
                              run_dir / "student_seqkd_wordkd",
                              train_on(seqkd_tgt, S["student_epochs"], S["lr"]) + student + word_kd)
    train_step("step 10: Seq-KD + Seq-Inter + Word-KD (fine-tune the Seq-KD + Word-KD student on "
               "the Seq-Inter data, with Word-KD)", run_dir / "student_seqkd_wordkd_seqinter",
               train_on(seqinter_tgt, S["finetune_epochs"], S["finetune_lr"]) + ["--init", seqkd_wordkd]
               + word_kd)

    # ---- steps 11 and 12: the Table 1 columns of every model on the test set, the table, and
    # the paper's six claims checked on it --------------------------------------------------------
    result = report_and_table("step 11", "Kim & Rush (2016), Table 1", "table1", run_dir, ROWS, S, setting_name,
                              test_src, test_ref, args.device, t_start,
                              "Δ: teacher rows against the teacher baseline, student rows against the student baseline.")
    claims = check_claims({row["folder"]: row for row in result["rows"]})
    result["claims"] = [dict(claim=c, holds=h, numbers=n) for c, h, n in claims]
    with open(run_dir / "table1.md", "a", encoding="utf-8") as f:
        f.write("\n" + claims_markdown(claims) + "\n")
    (run_dir / "table1.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + claims_markdown(claims))
    return result


def report_and_table(step, title, stem, run_dir, rows_spec, S, setting_name, test_src, test_ref, device,
                     t_start, delta_note):
    """Report every model of `rows_spec` [(row name, folder under run_dir)] on the test set
    (beam.py --report), print the Markdown table and write RUN_DIR/STEM.md and RUN_DIR/STEM.json."""
    rows = []
    for name, folder in rows_spec:
        report = report_step(f"{step}: report, {name}", str(run_dir / folder / "best.pt"), test_src, test_ref,
                             str(run_dir / "reports" / f"{folder}.json"), S["report_beam"], device)
        rows.append((name, report))
    table = markdown_table(rows, S["report_beam"])
    seconds = time.time() - t_start
    note = (f"Test set: {test_src} ({rows[0][1]['sentences']} sentences). BLEU: sacrebleu "
            f"({rows[0][1].get('bleu_signature', '')}). {delta_note} PPL: perplexity on the references. "
            f"p(t = ŷ): mean probability of the model's own beam-{S['report_beam']} output. Speed: source "
            f"words/s on device '{pick_device(device)}'. This invocation took {seconds / 60:.1f} min.")
    (run_dir / f"{stem}.md").write_text(table + "\n\n" + note + "\n")
    result = {"setting": setting_name, "settings": S, "run_dir": str(run_dir), "seconds": seconds,
              "test_src": test_src, "test_ref": test_ref,
              "rows": [dict(name=name, folder=folder, **report)
                       for (name, folder), (_, report) in zip(rows_spec, rows)]}
    (run_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    announce(title)
    print(table + "\n\n" + note)
    print(f"\nwritten: {run_dir / (stem + '.md')}, {run_dir / (stem + '.json')}")
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
