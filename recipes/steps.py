"""The steps the recipes share (kim_rush.py, t5_distill.py, prune_table3.py). A step calls what a
user would type, train.main([...]) or translate.main([...]), prints that command (to replay it by
hand) and writes under the run folder; a step whose output exists is skipped, so after an
interrupt (Ctrl-C, a crash, a reboot) the same recipe command continues where it stopped: a
half-finished training resumes with train.py --resume, a translation from its OUT.partial file.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root

import torch  # noqa: E402

import data  # noqa: E402
import runs  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
import translate  # noqa: E402
from data import UserError  # noqa: E402
from flags import CPU_THREADS  # noqa: E402
from model import pick_device  # noqa: E402


# 1. Steps: run a step unless its output exists -----------------------------------------------

def announce(text):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def train_step(title, save_dir, flags, wait=True):
    """train.main(flags + --save-dir) unless save_dir/done.json says it finished; a run that was
    stopped half-way (last.pt, no done.json) continues with --resume. Returns save_dir/best.pt.
    Another process of the recipe running the same step is waited for (wait=False: returns None)."""
    save_dir = Path(save_dir)
    done = save_dir / "done.json"
    save_dir.mkdir(parents=True, exist_ok=True)
    if not done.exists() and not claim(save_dir / "running", title, wait, done) and not done.exists():
        return None
    if done.exists():
        (save_dir / "running").unlink(missing_ok=True)
        print(f"{title}: done already ({done})")
        return str(save_dir / "best.pt")
    announce(title)
    argv = flags + ["--save-dir", str(save_dir)] + (["--resume"] if (save_dir / "last.pt").exists() else [])
    if "--threads" not in flags:     # the recipe's threads (its --threads)
        argv += ["--threads", str(torch.get_num_threads())]
    print("python train.py " + " ".join(argv), flush=True)
    t0 = time.time()
    metrics = train.main(argv)
    if metrics.get("interrupted"):
        sys.exit("interrupted: run the same command again to continue")
    runs.write_json(metrics, done)
    (save_dir / "running").unlink(missing_ok=True)
    print(f"({title.split(':')[0]} took {time.time() - t0:.0f} s)")
    return str(save_dir / "best.pt")


def claim(lock, title, wait=True, done=None):
    """Make the file `lock` hold this process's id, so that another process of the same recipe command
    leaves the step to it. While another live process holds it: wait (checking every minute) until it
    ends or the file `done` appears (then False), or with wait=False return False at once. Creating
    the file is atomic: two processes never both hold it."""
    while done is None or not Path(done).exists():
        pid = other_process(lock)
        if pid is None:
            lock.unlink(missing_ok=True)            # left by a process that ended (or by this one)
            try:
                with open(lock, "x") as f:          # "x": fails if the file exists
                    f.write(str(os.getpid()))
                return True
            except FileExistsError:                 # another process took it just now
                continue
        if not wait:
            return False
        print(f"{title}: process {pid} is running it; waiting", flush=True)
        time.sleep(60)
    return False


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


def translate_step(title, out, flags, wait=True):
    """translate.main(flags + --out) unless `out` exists (translate.py only renames OUT.partial
    to OUT when the whole file is translated, and resumes from OUT.partial itself). Another process
    translating it is waited for (wait=False: returns None)."""
    out = str(out)
    lock = Path(out + ".running")
    if not os.path.exists(out) and not claim(lock, title, wait, out) and not os.path.exists(out):
        return None
    if os.path.exists(out):
        lock.unlink(missing_ok=True)
        print(f"{title}: done already ({out})")
        return out
    announce(title)
    argv = flags + ["--out", out]
    print("python translate.py " + " ".join(argv), flush=True)
    t0 = time.time()
    translate.main(argv)
    lock.unlink(missing_ok=True)
    print(f"({title.split(':')[0]} took {time.time() - t0:.0f} s)")
    return out


def run_jobs(jobs):
    """jobs: [(needs, run)]: `needs` the files that must exist before the job can start, run(wait) a step
    (train_step or translate_step with wait) that returns None when another process is running it. Runs
    each job once its inputs exist, in order, passing over those another process of the same recipe command
    runs: two processes (each --threads 1) share the jobs. Returns when every job is done, by either."""
    pending = list(jobs)
    while pending:
        ready = [job for job in pending if all(Path(p).exists() for p in job[0])]
        for job in ready:
            if job[1](wait=False) is not None:      # done now (or done before, by another process)
                pending.remove(job)
                break
        else:     # every job left waits for another process: its own step or what it needs
            print(f"{len(pending)} steps left, each running in another process or waiting for one; "
                  "checking again in a minute", flush=True)
            time.sleep(60)


def report_step(title, ckpt, test_src, test_ref, out_json, k, flags=()):
    """translate.py --report (BLEU greedy and beam K, perplexity, p(t = ŷ), parameters, speed)
    into out_json unless it exists; `flags`: more translate.py flags. Returns the report."""
    out_json = str(out_json)
    if os.path.exists(out_json):
        print(f"{title}: done already ({out_json})")
    else:
        announce(title)
        argv = ["--ckpt", str(ckpt), "--src", test_src, "--ref", test_ref, "--beam", str(k),
                "--report", "--json", out_json, *flags]
        print("python translate.py " + " ".join(argv), flush=True)
        translate.main(argv)
    with open(out_json, encoding="utf-8") as f:
        return json.load(f)


# 2. The run folder and its corpus: {split}.{lang} files, or the built-in corpus --------------

# Settings that say which models to train, not how: a later run may add rows or seeds to a run
# folder, and every model already in it stays one the new settings would have trained.
WHICH_MODELS = ("rows", "seeds")


def check_same_settings(path, settings):
    """A run folder belongs to one set of hyper-parameters: finished steps are reused, so mixing
    settings would mix models. The first run writes them; a later run must match, except in
    WHICH_MODELS (the file then records the new ones)."""
    settings = json.loads(json.dumps(settings))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings)
                         if saved.get(k) != settings.get(k) and k not in WHICH_MODELS)
        if changed:
            raise UserError(f"{path.parent} was made with other settings ({', '.join(changed)}): "
                            "give a new --run-dir, or delete that folder to start again")
        if saved == settings:
            return
    runs.write_json(settings, path)


def corpus_files(corpus, src, tgt, splits):
    """{split: (source path, target path)} for the named splits; UserError naming what is missing."""
    folder = Path(corpus)
    if not folder.is_dir():
        raise UserError(f"--corpus {corpus}: no such folder (expected a folder holding train.{src}, "
                        f"train.{tgt}, ..., e.g. from python prepare.py multi30k --out data/multi30k)")
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
    """The file PATH, one line each (written atomically: a file that exists is complete)."""
    runs.write_atomically(path, lambda f: f.write("".join(line + "\n" for line in lines)), mode="w")


def write_builtin_corpus(folder):
    """The built-in synthetic corpus as files folder/{train,val,test}.{en,de}."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "test.de").exists():
        return
    splits = synthetic.builtin_splits()
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


# 3. The table recipes (kim_rush.py, t5_distill.py): flags, step 0, main, the table -----------

def parse_args(argv, description, recipe, extra_flags=None):
    """The flags every table recipe shares, and the recipe's extra_flags: [(flag, add_argument kwargs)]."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--corpus", help="folder of {train,VALID,TEST}.{SRC,TGT} files, e.g. data/multi30k")
    p.add_argument("--src", default="en", help="source language suffix (default: en)")
    p.add_argument("--tgt", default="de", help="target language suffix (default: de)")
    p.add_argument("--valid-split", default="val",
                   help="validation split name (default: val; prepare.py's corpora: valid)")
    p.add_argument("--test-split", default="test", help="test split name, e.g. test_2016_flickr (default: test)")
    p.add_argument("--builtin", action="store_true", help="the built-in synthetic corpus")
    p.add_argument("--smoke", action="store_true", help="a tiny built-in run that only checks every step runs")
    p.add_argument("--run-dir", help=f"where everything goes (default: runs/{recipe}_<corpus>)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ... (default: auto)")
    p.add_argument("--threads", type=int, default=CPU_THREADS,
                   help=f"CPU threads of every step (default: {CPU_THREADS}, as train.py's: the same sums, so the "
                   "same numbers, on every run; two processes of the command share 2 cores)")
    p.add_argument("--seed", type=int, default=1, help="seed of every training (kim_rush.py: of the teacher and "
                   "the distilled data; its students take the setting's seeds) (default: 1)")
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
    runs.set_cpu(args.threads)
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
    runs.write_json(dict(absolute, tgt=tgt), run_dir / "files.json")
    return setting_name, S, run_dir, tgt, files


def main(parse_args, run, argv=None):
    """A recipe's main: run(parse_args(argv)); a UserError exits with its one line."""
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def markdown_table(rows, k):
    """rows: [(name, report)] in the recipe's ROWS order. Δ columns: against the last row above
    whose name ends in "baseline" (Table 1: the teacher baseline for teacher rows, the student
    baseline for student rows), of the same seed where a report has one (report["seed"])."""
    head = (f"| Model | BLEU greedy | Δ | BLEU beam {k} | Δ | chrF greedy | chrF beam {k} | PPL | p(t = ŷ) | "
            f"Params | src words/s greedy | src words/s beam {k} |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baselines = {}                       # {seed or None: the baseline row of that seed}
    for name, r in rows:
        seed = r.get("seed")
        if name.endswith("baseline"):
            baselines[seed] = r
        baseline = baselines.get(seed, baselines.get(None))
        d_greedy = r["bleu_greedy"] - baseline["bleu_greedy"]
        d_beam = r["bleu_beam"] - baseline["bleu_beam"]
        label = name if seed is None else f"{name}, seed {seed}"
        lines.append(f"| {label} | {r['bleu_greedy']:.2f} | {d_greedy:+.2f} | {r['bleu_beam']:.2f} | "
                     f"{d_beam:+.2f} | {r.get('chrf_greedy', math.nan):.2f} | {r.get('chrf_beam', math.nan):.2f} | "
                     f"{r['ppl']:.2f} | {100 * r['p_beam']:.1f}% | {r['params']:,} | "
                     f"{r['words_per_s_greedy']:,.0f} | {r['words_per_s_beam']:,.0f} |")
    return "\n".join(lines)


def mean_tables(tables):
    """{seed: {folder: report}} -> {folder: the mean over seeds of each number of its reports}."""
    folders = {folder for table in tables.values() for folder in table}
    out = {}
    for folder in folders:
        reports = [table[folder] for table in tables.values() if folder in table]
        keys = [k for k, v in reports[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[folder] = {k: statistics.fmean(r[k] for r in reports) for k in keys}
    return out


def seed_summary(tables, rows_spec, p_values):
    """Markdown: each row of rows_spec [(name, folder)] over the seeds of `tables` {seed: {folder:
    report}}: mean ± standard deviation of BLEU greedy and beam, their Δ against the student
    baseline's mean, and p_values {(folder, seed): p} of the paired bootstrap per seed."""
    seeds = sorted(tables)

    def spread(folder, key, among):
        values = [tables[s][folder][key] for s in among]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), f"{statistics.fmean(values):.2f} ± {sd:.2f}"

    lines = [f"Over seeds {', '.join(map(str, seeds))} (mean ± sd; a teacher row is one model). p: sacrebleu's "
             "paired bootstrap (1,000 resamples) of the greedy output against the baseline of the same seed.", "",
             "| Model | BLEU greedy | Δ | p per seed | BLEU beam | Δ | PPL | p(t = ŷ) |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, folder in rows_spec:
        among = [s for s in seeds if folder in tables[s]]     # a row not (yet) trained for every seed:
        if not among:                                        # its seeds, against the baseline's same seeds
            continue
        name += "" if among == seeds else f" (seeds {', '.join(map(str, among))})"
        base = "teacher" if folder.startswith("teacher") else "student"
        (greedy, g), (beam, b) = spread(folder, "bleu_greedy", among), spread(folder, "bleu_beam", among)
        d_greedy = greedy - spread(base, "bleu_greedy", among)[0]
        d_beam = beam - spread(base, "bleu_beam", among)[0]
        ps = ", ".join(f"{p_values[(folder, s)]:.3f}" for s in seeds if (folder, s) in p_values) or "–"
        lines.append(f"| {name} | {g} | {d_greedy:+.2f} | {ps} | {b} | {d_beam:+.2f} | "
                     f"{spread(folder, 'ppl', among)[1]} | {100 * spread(folder, 'p_beam', among)[0]:.1f}% |")
    return "\n".join(lines)


def curve_end(log_path, noise=1.0, key="valid_bleu"):
    """The end of a validation curve (a log.jsonl, one row per epoch) of `key`: {epochs, best, best_epoch,
    last3, converged, minutes}. valid_bleu: higher is better, converged when each of the last three
    evaluations is within `noise` BLEU of the best (a run stopped by --patience 3 has its best just before
    them); valid_ppl, valid_loss: lower is better, converged when each is within `noise` percent of the best."""
    log = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    higher = key == "valid_bleu"
    best = (max if higher else min)(log, key=lambda row: row[key])
    last = [row[key] for row in log[-3:]]
    gap = [best[key] - v if higher else 100 * (v - best[key]) / abs(best[key]) for v in last]
    return {"epochs": log[-1]["epoch"], "best": best[key], "best_epoch": best["epoch"], "last3": last,
            "converged": len(log) >= 3 and all(g <= noise for g in gap),
            "minutes": log[-1].get("elapsed", math.nan) / 60}


def convergence_table(run_dir, folders, noise=1.0, key="valid_bleu"):
    """Markdown: the end of each model's validation curve of `key` (FOLDER/log.jsonl): epochs trained, the
    best value and its epoch, the last three evaluations, and curve_end's verdict."""
    what, unit, digits = {"valid_bleu": ("greedy BLEU", "BLEU", 2), "valid_ppl": ("perplexity", "%", 2),
                          "valid_loss": ("training objective", "%", 4)}[key]
    lines = [f"Validation curves ({what} per evaluation); converged: the last 3 within {noise:g} {unit} of "
             "the best.", "", "| Model | epochs | best (epoch) | last 3 | converged? | minutes |",
             "|---|---:|---:|---|---|---:|"]
    for folder in folders:
        c = curve_end(Path(run_dir) / folder / "log.jsonl", noise, key)
        lines.append(f"| {folder} | {c['epochs']} | {c['best']:.{digits}f} ({c['best_epoch']}) | "
                     f"{' / '.join(f'{b:.{digits}f}' for b in c['last3'])} | {'yes' if c['converged'] else 'no'} | "
                     f"{c['minutes']:.0f} |")
    return "\n".join(lines)


def report_and_table(step, title, stem, run_dir, rows_spec, S, setting_name, test_src, test_ref, device,
                     t_start, delta_note, more=None):
    """Report every model of `rows_spec` [(row name, folder under run_dir[, seed])] on the test set
    (translate.py --report), print the Markdown table and write RUN_DIR/STEM.md and
    RUN_DIR/STEM.json. more(result), if given, may add to the result and returns more Markdown,
    printed and written after the table."""
    rows = []
    for name, folder, *seed in rows_spec:
        report = report_step(f"{step}: report, {folder}", run_dir / folder / "best.pt", test_src, test_ref,
                             run_dir / "reports" / f"{folder}.json", S["report_beam"], ["--device", device])
        rows.append((name, dict(report, seed=seed[0]) if seed else report))
    table = markdown_table(rows, S["report_beam"])
    seconds = time.time() - t_start
    note = (f"Test set: {test_src} ({rows[0][1]['sentences']} sentences). BLEU: sacrebleu "
            f"({rows[0][1].get('bleu_signature', '')}); chrF: sacrebleu ({rows[0][1].get('chrf_signature', '')}). "
            f"{delta_note} PPL: perplexity on the references. "
            f"p(t = ŷ): mean probability of the model's own beam-{S['report_beam']} output. Speed: source "
            f"words/s on device '{pick_device(device)}'. This invocation took {seconds / 60:.1f} min.")
    result = {"setting": setting_name, "settings": S, "run_dir": str(run_dir), "seconds": seconds,
              "test_src": test_src, "test_ref": test_ref,
              "rows": [dict(name=name, folder=spec[1], **report) for spec, (name, report) in zip(rows_spec, rows)]}
    extra = "\n" + more(result) + "\n" if more else ""
    runs.write_atomically(run_dir / f"{stem}.md", lambda f: f.write(table + "\n\n" + note + "\n" + extra), mode="w")
    runs.write_json(result, run_dir / f"{stem}.json")
    announce(title)
    print(table + "\n\n" + note)
    print(f"\nwritten: {run_dir / (stem + '.md')}, {run_dir / (stem + '.json')}")
    print(extra, end="")                     # the claims of Table 1 (kim_rush.py), if any
    return result
