"""Side-by-side CPU speed of seqkd and OpenNMT-py 3.5.1 on the same LSTM, sentences and batches.

    python peers/side_by_side.py                                  # --rounds 3 --threads 1,2
    python peers/side_by_side.py --rounds 3 --threads 1,2 --only train,greedy,beam --json out.json
    python peers/side_by_side.py --check                          # a few steps: params and lengths equal

What it measures, for each tool and thread count:
  train   target tokens/s of full training steps (forward, NLL summed over non-PAD targets,
          backward, clipping at 5, Adam lr 1e-3), --warmup steps untimed, then --train-steps timed;
          tokens are the non-PAD target tokens, EOS included. For seqkd also GFLOP/s: its
          bench.forward_macs x 2 (FLOPs) x 3 (forward + backward) over the padded shapes.
  greedy  source words/s of greedy decoding of --decode-sentences sentences;
  beam    the same with beam search, beam 5.
The model (this is the spec, the same in both): 2 layers x 500 hidden, 500-dim embeddings, a
unidirectional LSTM encoder, Luong "general" attention, input feeding, dropout 0.2, 500-word
vocabularies, uniform init in [-0.1, 0.1]. seqkd builds lstm.Seq2Seq (peers/seqkd_worker.py);
OpenNMT-py builds its rnn encoder / input-feeding rnn decoder / generator with its own
onmt.model_builder.build_model from its own option parser (peers/onmt_worker.py). The parameter
counts of both are printed; they differ only by the 4H second bias per decoder layer that
nn.LSTMCell (OpenNMT-py) has and seqkd's decoder folds into one (b_ih + b_hh act as one bias).

Fairness:
  * Same sentences: bench.random_examples makes them once, here in the parent (training: 512 pairs
    of 5-20 tokens, seed 1; decoding: the sources of --decode-sentences pairs, seed 2), and both
    workers read them from the same job file (JSON).
  * Same batches: the training batches are data.batches(..., batch_size=64, shuffle=True, seed=0),
    bucketed by length as bench.bench_train does, repeated to warm-up + timed steps, and both
    workers get the same PAD-padded tensors; OpenNMT-py's model is called on them directly (its
    data pipeline is not used) and both compute the loss the same way.
  * Same output lengths: random weights do not end sentences at any sensible point, so every output
    is forced to be exactly as long as its source, L tokens (EOS included), and both tools take L
    decoder steps per sentence. OpenNMT-py forces one length per batch (Translator min_length /
    max_length), so the decoding batches of BOTH tools are bucketed by exact source length: all
    sources of length L, in batches of at most 32. seqkd: beam.greedy / beam.beam_search with
    max_len_a=1, max_len_b=0 (EOS forced at token L), EOS blocked before it; OpenNMT-py:
    GreedySearch (argmax) / BeamSearch, EOS blocked before token L and stopped at L. The generated
    tokens of each tool are counted and printed, and every output's length is checked.
    (bench.bench_decode is not used: it batches sentences of different lengths and does not block
    an early EOS.) Beam search ranks by raw log-probability sums in both (no length penalty).
    Each decoding measurement first decodes one batch untimed.
  * Same threads: each worker is a fresh process with torch.set_num_threads(n) and
    OMP_NUM_THREADS = MKL_NUM_THREADS = n.
  * Interleaved rounds: round 1 runs seqkd then OpenNMT-py, round 2 OpenNMT-py then seqkd, ...,
    so slow drifts of the machine hit both alike; the table gives min / median / max over the
    rounds and the ratio of the medians, seqkd / OpenNMT-py (above 1: seqkd is faster).

The OpenNMT-py venv: made once, outside the repository (default ~/.cache/seqkd-peers/onmt-3.5.1,
--venv), with `python -m venv --system-site-packages` so that it uses the system torch, then
`pip install --no-deps` of ONMT_PACKAGES: OpenNMT-py 3.5.1 and only what importing its model builder
and translator needs that the system lacks (configargparse and pyonmttok, OpenNMT's tokenizer
package whose Vocab onmt uses; numpy and regex come from the system site-packages). --no-deps keeps
pip from touching torch (OpenNMT-py 3.5.1 asks for torch < 2.3). The transforms' imports of spacy,
pyahocorasick, rapidfuzz and fasttext are never used here: onmt_worker.py puts stand-ins for them.
seqkd's worker runs with this python, OpenNMT-py's with the venv's.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = Path(__file__).resolve().parent
ROOT = PEERS.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import torch  # noqa: E402

ONMT_PACKAGES = ["OpenNMT-py==3.5.1", "configargparse==1.9.0", "pyonmttok==1.38.1"]
PIP_NAMES = {"configargparse": "configargparse", "pyonmttok": "pyonmttok", "numpy": "numpy",
             "regex": "regex", "yaml": "pyyaml", "six": "six"}   # import name -> package, if missing
DEFAULT_VENV = Path.home() / ".cache" / "seqkd-peers" / "onmt-3.5.1"
CONFIG = dict(layers=2, hidden=500, emb_dim=500, vocab=500, dropout=0.2, init=0.1, lr=1e-3, clip=5.0)
TOOLS = ["seqkd", "OpenNMT-py"]
MEASUREMENTS = {"train": "train tgt tok/s", "greedy": "greedy src words/s", "beam": "beam 5 src words/s"}
BEAM = 5


# 1. The OpenNMT-py venv ----------------------------------------------------------------------

PROBE = """import sys
sys.path.insert(0, sys.argv[1])
try:
    import onmt_worker
except ModuleNotFoundError as e:
    print(e.name)
    sys.exit(3)
print(onmt_worker.onmt.__version__)
"""


def pip_install(python, packages):
    print(f"pip install --no-deps {' '.join(packages)}", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)


def probe(python):
    """(True, onmt version) if the venv imports onmt_worker, else (False, the missing module)."""
    r = subprocess.run([str(python), "-c", PROBE, str(PEERS)], capture_output=True, text=True)
    if r.returncode not in (0, 3):
        sys.exit(f"importing OpenNMT-py in {python} failed:\n{r.stderr}")
    return r.returncode == 0, r.stdout.strip()


def ensure_venv(venv):
    """The venv's python, after making the venv and installing ONMT_PACKAGES if needed."""
    python, marker = venv / "bin" / "python", venv / "seqkd-peers-packages.txt"
    if marker.exists() and marker.read_text().split() == ONMT_PACKAGES and probe(python)[0]:
        return python
    if not python.exists():
        print(f"making the OpenNMT-py venv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip_install(python, ONMT_PACKAGES)
    for _ in range(len(PIP_NAMES)):
        ok, what = probe(python)
        if ok:
            marker.write_text("\n".join(ONMT_PACKAGES) + "\n")
            return python
        if what not in PIP_NAMES:
            sys.exit(f"OpenNMT-py needs the module {what!r}: add its package to ONMT_PACKAGES")
        pip_install(python, [PIP_NAMES[what]])
    sys.exit("could not complete the OpenNMT-py venv")


# 2. The job: sentences and batches, made once here ------------------------------------------

def lstm_config():
    return M.LSTMConfig(src_vocab=CONFIG["vocab"], tgt_vocab=CONFIG["vocab"], emb_dim=CONFIG["emb_dim"],
                        hidden=CONFIG["hidden"], layers=CONFIG["layers"], attention="general",
                        input_feed=True, dropout=CONFIG["dropout"], init_range=CONFIG["init"])


def train_batches(steps, warmup, batch_size=64):
    """The warm-up + timed training batches, as bench.bench_train makes them, as lists of ids."""
    examples = bench.random_examples(batch_size * 8, CONFIG["vocab"], seed=1)
    batches = data.batches(examples, batch_size=batch_size, shuffle=True, seed=0)
    batches = (batches * (1 + (steps + warmup) // len(batches)))[:steps + warmup]
    return [{"src": b.src.tolist(), "tgt_in": b.tgt_in.tolist(), "tgt_out": b.tgt_out.tolist(),
             "ntokens": b.ntokens} for b in batches]


def train_flops(batches, warmup):
    """FLOPs of the timed steps by seqkd's count: bench.forward_macs x 2 x 3, padded shapes."""
    cfg = lstm_config()
    return sum(6 * len(b["src"]) * bench.forward_macs(cfg, len(b["src"][0]), len(b["tgt_in"][0]))
               for b in batches[warmup:])


def decode_batches(n, batch_size=32):
    """The sources of n random pairs, bucketed by exact length (shortest first), at most
    batch_size a batch: every batch holds sources of one length, so needs no padding."""
    sources = [s for s, _ in bench.random_examples(n, CONFIG["vocab"], seed=2)]
    batches = []
    for length in sorted({len(s) for s in sources}):
        same = [s for s in sources if len(s) == length]
        batches += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    return batches


def write_job(folder, threads, measurements, train, decode, warmup):
    path = Path(folder) / f"job-{threads}.json"
    job = {"config": CONFIG, "seed": 0, "threads": threads, "measurements": measurements, "beam": BEAM,
           "warmup": warmup, "train_batches": train, "decode_batches": decode}
    path.write_text(json.dumps(job))
    return path


# 3. Running the workers, interleaved -------------------------------------------------------

def run_worker(tool, python, job, threads):
    worker = PEERS / ("seqkd_worker.py" if tool == "seqkd" else "onmt_worker.py")
    out = job.with_name(f"result-{tool}-{threads}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run([str(python), str(worker), str(job), str(out)], env=env, check=True)
    result = json.loads(out.read_text())
    print(f"  {tool}: {time.perf_counter() - t0:.0f} s, " + ", ".join(
        f"{k} {v:,.0f}" for k, v in result.items() if k.endswith("_s")), flush=True)
    return result


def run_rounds(rounds, threads, jobs, pythons):
    """results[tool][n] = the result of each round; round r runs the tools in TOOLS order when r is
    even (counting from 0), reversed when odd."""
    results = {tool: {n: [] for n in threads} for tool in TOOLS}
    for r in range(rounds):
        for n in threads:
            order = TOOLS if r % 2 == 0 else TOOLS[::-1]
            print(f"round {r + 1}/{rounds}, {n} thread{'s' if n > 1 else ''}: {' then '.join(order)}", flush=True)
            for tool in order:
                results[tool][n].append(run_worker(tool, pythons[tool], jobs[n], n))
    return results


# 4. Checks and the table ---------------------------------------------------------------------

def length_problems(results, measurements, decode):
    """Lines naming every (tool, measurement) whose outputs are not exactly their sources' lengths."""
    expected = [len(s) for batch in decode for s in batch]
    problems = []
    for tool, by_threads in results.items():
        for name in measurements:
            if name == "train":
                continue
            bad = {sum(a != b for a, b in zip(r[f"{name}_lengths"], expected))
                   + abs(len(r[f"{name}_lengths"]) - len(expected))
                   for runs in by_threads.values() for r in runs}
            if bad != {0}:
                problems.append(f"{tool} {name}: up to {max(bad)} outputs not of their source's length")
    return problems


def spread(values):
    return min(values), statistics.median(values), max(values)


def summary_rows(results, measurements, threads, flops):
    rows = []
    for name in measurements:
        key = f"{name}_tok_s" if name == "train" else f"{name}_words_s"
        for n in threads:
            row = {"measurement": name, "threads": n}
            for tool in TOOLS:
                row[tool] = spread([r[key] for r in results[tool][n]])
            row["ratio"] = row["seqkd"][1] / row["OpenNMT-py"][1]
            if name == "train":
                seconds = [sum(b["ntokens"] for b in flops["batches"]) / r[key] for r in results["seqkd"][n]]
                row["seqkd_gflops"] = statistics.median(flops["flops"] / s / 1e9 for s in seconds)
            else:
                row["tokens"] = {tool: sum(results[tool][n][0][f"{name}_lengths"]) for tool in TOOLS}
            rows.append(row)
    return rows


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def seqkd_version():
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def meta(results, args, train, decode):
    first = {tool: next(r for runs in results[tool].values() for r in runs) for tool in TOOLS}
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
            "torch": {tool: first[tool]["torch"] for tool in TOOLS}, "opennmt_py": first["OpenNMT-py"]["version"],
            "seqkd": seqkd_version(), "params": {tool: first[tool]["params"] for tool in TOOLS},
            "measurements": args.only, "rounds": args.rounds, "train_steps": args.train_steps, "warmup": args.warmup,
            "train_batches": len(train), "decode_sentences": sum(len(b) for b in decode),
            "decode_batches": len(decode)}


def fmt(values):
    return " / ".join(f"{v:,.0f}" for v in values)


def print_table(info, rows):
    torch_versions = sorted(set(info["torch"].values()))
    print(f"\n{info['date']}, {info['cpu']}, torch {' / '.join(torch_versions)}, "
          f"OpenNMT-py {info['opennmt_py']}, seqkd {info['seqkd']}")
    print(f"LSTM 2x500, 500-word vocabularies; parameters: seqkd {info['params']['seqkd']:,}, "
          f"OpenNMT-py {info['params']['OpenNMT-py']:,}")
    parts = [f"{info['rounds']} round(s)"]
    if "train" in info["measurements"]:
        parts.append(f"training: {info['warmup']} warm-up + {info['train_steps']} timed steps of 64 sentences")
    if set(info["measurements"]) - {"train"}:
        parts.append(f"decoding: {info['decode_sentences']} sentences in {info['decode_batches']} batches "
                     f"(one source length each, at most 32)")
    print("; ".join(parts) + "\n")
    print("| measurement | threads | seqkd min / median / max | OpenNMT-py min / median / max "
          "| seqkd / OpenNMT-py (medians) | seqkd GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gflops = f"{r['seqkd_gflops']:.1f}" if "seqkd_gflops" in r else "-"
        print(f"| {MEASUREMENTS[r['measurement']]} | {r['threads']} | {fmt(r['seqkd'])} | {fmt(r['OpenNMT-py'])} "
              f"| {r['ratio']:.2f} | {gflops} |")
    print()
    for r in rows:
        if "tokens" in r and r["threads"] == rows[0]["threads"]:
            t = r["tokens"]
            same = "equal" if t["seqkd"] == t["OpenNMT-py"] else "DIFFERENT"
            line = (f"{r['measurement']}: generated tokens (EOS included) seqkd {t['seqkd']:,}, "
                    f"OpenNMT-py {t['OpenNMT-py']:,} ({same})")
            if same != "equal":
                line += "; source words/s per generated token: " + ", ".join(
                    f"{tool} {r[tool][1] / t[tool]:.3f}" for tool in TOOLS)
            print(line)


# 5. The command ------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: both tools, every thread count)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--only", default="train,greedy,beam", help="comma-separated measurements: train, greedy, beam")
    p.add_argument("--json", default=None, help="also write every result and the summary to this JSON file")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the OpenNMT-py venv (made if missing)")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--decode-sentences", type=int, default=200, help="sentences decoded per measurement")
    p.add_argument("--check", action="store_true",
                   help="quick sanity check (1 round, 1 thread, 2 steps, 40 sentences): parameter counts "
                        "equal and every output of its forced length, in both tools")
    args = p.parse_args(argv)
    if args.check:
        args.rounds, args.threads, args.train_steps, args.warmup, args.decode_sentences = 1, "1", 2, 1, 40
    args.threads = [int(n) for n in args.threads.split(",")]
    args.only = [m for m in args.only.split(",") if m]
    unknown = set(args.only) - set(MEASUREMENTS)
    if unknown or not args.only:
        p.error(f"--only: choose from {', '.join(MEASUREMENTS)}")
    if args.rounds < 1 or min(args.threads) < 1 or args.train_steps < 1 or args.warmup < 0 \
            or args.decode_sentences < 1:
        p.error("--rounds, --threads, --train-steps and --decode-sentences must be positive, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    pythons = {"seqkd": Path(sys.executable), "OpenNMT-py": ensure_venv(args.venv.expanduser())}
    train = train_batches(args.train_steps, args.warmup)
    decode = decode_batches(args.decode_sentences)
    with tempfile.TemporaryDirectory(prefix="seqkd-peers-") as folder:
        jobs = {n: write_job(folder, n, args.only, train, decode, args.warmup) for n in args.threads}
        results = run_rounds(args.rounds, args.threads, jobs, pythons)
    info = meta(results, args, train, decode)
    rows = summary_rows(results, args.only, args.threads,
                        {"batches": train[args.warmup:], "flops": train_flops(train, args.warmup)})
    print_table(info, rows)
    problems = length_problems(results, args.only, decode)
    # nn.LSTMCell (OpenNMT-py's decoder) has two bias vectors per layer where seqkd's has one
    redundant_biases = CONFIG["layers"] * 4 * CONFIG["hidden"]
    if info["params"]["OpenNMT-py"] - info["params"]["seqkd"] != redundant_biases:
        problems.append(f"parameter counts differ by more than the decoder's second biases: {info['params']}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print(f"\n(the whole run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": info, "config": CONFIG, "rows": rows, "results": results},
                                              indent=1))
    if args.check:
        print("check " + ("FAILED" if problems else "passed: parameter counts equal but for the second biases, "
                          "every output of its source's length in both tools"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
