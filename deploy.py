"""The deployment table: a teacher, its distilled student and a pruned student, each decoded in
float32 and in int8, side by side on one test set and one machine.

    python deploy.py --teacher T.pt --student S.pt --pruned P.pt --src test.en --ref test.de \\
        --threads 2 --rounds 3 --out deploy.md

Every model and precision is decoded by `python translate.py --report` (greedy and beam search,
`--int8` for int8) in a process of its own, so that each row's peak memory is its own (the
process's largest resident set, from the operating system: it includes Python and torch, about
the same for every row). The rounds are interleaved (every configuration once, then again), and
the table gives the median source words/s of the rounds beside their min and max; BLEU is the
same in every round (decoding is deterministic). --pruned may be a sparse file of
`prune.py --export`: its size is the size of the non-zeros and their positions.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from data import UserError

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="CKPT", help="the teacher checkpoint")
    p.add_argument("--student", required=True, metavar="CKPT", help="the distilled student checkpoint")
    p.add_argument("--pruned", metavar="CKPT", help="the pruned, retrained student (a checkpoint or a sparse export)")
    p.add_argument("--src", required=True, metavar="FILE", help="test source")
    p.add_argument("--ref", required=True, metavar="FILE", help="test references")
    p.add_argument("--beam", type=int, default=5, help="beam size (default: 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every decoding (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration (default: 3)")
    p.add_argument("--out", metavar="FILE", help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    for flag in ("teacher", "student", "pruned", "src", "ref"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            p.error(f"--{flag} {path}: no such file")
    if args.rounds < 1 or args.threads < 1 or args.beam < 1:
        p.error("--rounds, --threads and --beam must be at least 1")
    return args


def measure(ckpt, int8, args, workdir):
    """One `translate.py --report` process: its report (BLEU and words/s of greedy and beam) and
    its peak resident memory in MiB."""
    out, log_path = Path(workdir) / "report.json", Path(workdir) / "log.txt"
    cmd = [sys.executable, str(HERE / "translate.py"), "--ckpt", ckpt, "--src", args.src, "--ref", args.ref,
           "--report", "--beam", str(args.beam), "--threads", str(args.threads), "--device", "cpu",
           "--json", str(out)] + (["--int8"] if int8 else [])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)         # the resource usage of this child alone
    if os.waitstatus_to_exitcode(status) != 0:
        raise UserError(f"{' '.join(cmd)} failed: {log_path.read_text().strip().splitlines()[-1]}")
    return json.loads(out.read_text()), usage.ru_maxrss / 1024          # Linux: ru_maxrss in KiB


def run(args):
    """Every configuration once per round; returns the table rows."""
    models = [("teacher", args.teacher), ("student", args.student)] + ([("pruned", args.pruned)] if args.pruned else [])
    configs = [(name, ckpt, int8) for name, ckpt in models for int8 in (False, True)]
    results = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for name, ckpt, int8 in configs:
                print(f"round {r + 1}/{args.rounds}: {name} {'int8' if int8 else 'fp32'}", flush=True)
                results[name, ckpt, int8].append(measure(ckpt, int8, args, workdir))
    rows = []
    for (name, ckpt, int8), runs_ in results.items():
        first = runs_[0][0]
        for search in ("greedy", "beam"):
            speeds = [report[f"words_per_s_{search}"] for report, _ in runs_]
            rows.append(dict(model=name, precision="int8" if int8 else "fp32",
                             search="greedy" if search == "greedy" else f"beam {args.beam}",
                             bleu=first[f"bleu_{search}"], words_per_s=statistics.median(speeds),
                             words_per_s_min=min(speeds), words_per_s_max=max(speeds),
                             same_output=all(rep[f"hyps_{search}"] == first[f"hyps_{search}"] for rep, _ in runs_),
                             file_mib=os.path.getsize(ckpt) / 2 ** 20, params=first["params"],
                             peak_mib=max(mem for _, mem in runs_)))
    return rows


def format_table(rows, args):
    teacher_beam = next(r["words_per_s"] for r in rows if r["model"] == "teacher" and r["precision"] == "fp32"
                        and r["search"] != "greedy")
    lines = ["| model | precision | search | BLEU | source words/s (median; min-max) | vs teacher fp32 beam "
             "| file MiB | peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['search']} | {r['bleu']:.2f} "
                     f"| {r['words_per_s']:,.0f} ({r['words_per_s_min']:,.0f}-{r['words_per_s_max']:,.0f}) "
                     f"| {r['words_per_s'] / teacher_beam:.1f}x | {r['file_mib']:.2f} | {r['peak_mib']:.0f} |")
    lines.append(f"{args.rounds} interleaved rounds, {args.threads} CPU threads, test set {args.src}. Peak MiB: the "
                 "decoding process's largest resident set, Python and torch included.")
    changed = [f"{r['model']} {r['precision']} {r['search']}" for r in rows if not r["same_output"]]
    if changed:      # decoding should be deterministic: say so where a round's translations differ
        lines.append("Translations differed between rounds for: " + ", ".join(changed) + " (BLEU: the first round's).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        rows = run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    table = format_table(rows, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
