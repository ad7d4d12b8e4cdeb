"""The translation command: translate a file with a checkpoint, score it with BLEU, make
distillation data, or print the reports of report.py; or translate line by line as you type.

  python translate.py --ckpt model.pt --src FILE [--ref FILE] [--out FILE] [--beam K] ...
  python translate.py --ckpt model.pt --src - < FILE          (standard input, to its end)
  python translate.py --ckpt model.pt --interactive           (one line in, its translation out)

Read top to bottom: 1. files (translate_file: n-best lists, Seq-Inter, shards, resume, torchrun,
progress lines), 2. standard input and interactive translation, 3. the command line. The
searches, scores and BLEU, and the scoring convention, are beam.py's.
"""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time

from sacrebleu.metrics import BLEU

import data
import runs
from beam import bleu, decode_ids
from data import UserError
from model import decoding_precision, int8_model, load_checkpoint, model_from_checkpoint, pick_device
from report import format_report, show_attention, table1_report


# 1. Files: line-aligned output, n-best lists, Seq-Inter, shards, resume ----------------------

def parse_shard(text):
    """'I/N' -> (I, N) with 1 <= I <= N: shard I of N takes the I-th contiguous block of lines."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise UserError(f"--shard {text}: write I/N with 1 <= I <= N, e.g. --shard 1/4 ... 4/4")
    return i, n


def shard_range(num_lines, i, n):
    """Lines [start, end) of shard i of n (1-based): contiguous, so `cat` of the parts in order
    gives the unsharded output."""
    return (i - 1) * num_lines // n, i * num_lines // n


def output_lines(index, entries, tgt_vocab, nbest, select_ref=None, tokenize="13a"):
    """The output line(s) for one source sentence: index, its 0-based line number in the whole
    --src file; entries, its (tokens, score) list, best first. Three formats:
      select_ref given (Seq-Inter): the entry closest to that reference by smoothed sentence
        BLEU (kd_losses.select_seq_inter), one line
      nbest > 1: one line per entry, `index ||| translation ||| score` (Moses n-best format)
      otherwise: the best translation, one line (possibly empty)"""
    texts = [tgt_vocab.decode(ids) for ids, _ in entries]
    if select_ref is not None:
        import kd_losses  # only Seq-Inter needs it
        return [texts[kd_losses.select_seq_inter(texts, select_ref, tokenize=tokenize)]]
    if nbest > 1:
        return [f"{index} ||| {text} ||| {s:.4f}" for text, (_, s) in zip(texts, entries)]
    return [texts[0]]


def _resume_point(partial, record, settings):
    """How many sentences an earlier, interrupted run with the same settings has finished."""
    if not (os.path.exists(partial) and os.path.exists(record)):
        return 0
    with open(record, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                         if settings.get(k) != saved.get("settings", {}).get(k))
        raise UserError(f"{partial} is from an interrupted run with other settings "
                        f"({', '.join(changed)}): rerun with the same flags to resume, or "
                        f"delete {partial} and {record} to start again")
    os.truncate(partial, saved["bytes"])   # drop lines written after the last record
    return saved["done"]


def translate_file(model, src_vocab, tgt_vocab, lines, out_path=None, *, beam=5, nbest=1,
                   refs=None, select=False, tokenize="13a", shard=(1, 1), chunk_size=1000,
                   batch_size=64, max_len_a=2.0, max_len_b=10, length_norm=False,
                   run_info=None, progress=True, progress_every=30.0):
    """Translate `lines` (a whole --src file) to out_path, or to stdout when out_path is None.

    This is how Seq-KD data is made (Kim & Rush 2016, sec. 3.2): translate the training source
    with the teacher's beam and train the student on the output. The output is line-aligned
    with the input (an empty source or an empty translation is an empty line, never skipped),
    except n-best lists (nbest > 1 without select), which have up to nbest lines per sentence.

    select=True (Seq-Inter, sec. 3.3): from each nbest list write the entry closest to refs[i].
    shard=(I, N): translate only the I-th of N contiguous blocks of lines.
    Resume: output goes to OUT.partial in chunks of `chunk_size` sentences; after each chunk
    OUT.partial.json records how many sentences are done. A rerun with the same settings skips
    them; at the end OUT.partial becomes OUT. run_info (e.g. checkpoint and source paths) is
    stored with the settings, so a different run never continues someone else's file.
    progress: a bar on a terminal; on a log file a line every `progress_every` seconds.
    Returns {"sentences", "src_words", "seconds"} for what this call translated, and, when
    writing to stdout, "lines": the lines written."""
    start, end = shard_range(len(lines), *shard)
    settings = dict(run_info or {}, lines=len(lines), shard=f"{shard[0]}/{shard[1]}", beam=beam,
                    nbest=nbest, select=f"sentence-bleu/{tokenize}" if select else None,
                    max_len_a=max_len_a, max_len_b=max_len_b, length_norm=length_norm)
    settings = json.loads(json.dumps(settings))         # the form it has when read back
    done = 0
    if out_path is None:
        sink = sys.stdout
    else:
        partial, record = out_path + ".partial", out_path + ".partial.json"
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        done = _resume_point(partial, record, settings)
        sink = open(partial, "a" if done else "w", encoding="utf-8")
        if done:
            print(f"resuming {out_path}: {done} of {end - start} sentences already done",
                  file=sys.stderr)
    bar = runs.progress_meter(end - start, done, progress_every if progress else None)
    stats = {"sentences": 0, "src_words": 0, "seconds": 0.0, "lines": []}
    t0 = time.perf_counter()
    try:
        for lo in range(start + done, end, chunk_size):
            hi = min(lo + chunk_size, end)
            src_seqs = [src_vocab.encode(line) for line in lines[lo:hi]]
            results = decode_ids(model, src_seqs, beam=beam, nbest=nbest, batch_size=batch_size,
                                 max_len_a=max_len_a, max_len_b=max_len_b,
                                 length_norm=length_norm, progress=bar)
            for i, entries in zip(range(lo, hi), results):
                ref = refs[i] if select else None
                for text in output_lines(i, entries, tgt_vocab, nbest, ref, tokenize):
                    sink.write(text + "\n")
                    if out_path is None:
                        stats["lines"].append(text)
            stats["sentences"] += hi - lo
            stats["src_words"] += sum(len(line.split()) for line in lines[lo:hi])
            if out_path is not None:                     # commit the chunk, then record it
                sink.flush()
                os.fsync(sink.fileno())
                runs.write_json({"settings": settings, "done": hi - start,
                                 "bytes": sink.tell()}, record)
    finally:
        if bar is not None:
            bar.close()
        if out_path is not None:
            sink.close()
    stats["seconds"] = time.perf_counter() - t0
    if out_path is not None:
        os.replace(partial, out_path)
        os.remove(record)
    return stats


def first_best(out_lines, nbest):
    """The 1-best translation per sentence from translate_file's output lines."""
    if nbest == 1:
        return out_lines
    best = {}
    for line in out_lines:
        index, rest = line.split(" ||| ", 1)
        best.setdefault(int(index), rest.rsplit(" ||| ", 1)[0])
    return [best[i] for i in sorted(best)]


def shard_part(out_path, i, n):
    """The file shard i of n (1-based) is written to under torchrun. With N processes,
    `translate.py ... --out F` is `--shard 1/N` .. `--shard N/N` plus `cat`, in one command:
    process r translates shard r+1 into F.shard<r+1>of<N> (resumable like any --out file)."""
    return f"{out_path}.shard{i}of{n}"


def join_parts(out_path, rank, world):
    """After every process has written its part (a barrier), process 0 concatenates the parts
    in shard order into out_path (the unsharded output, line for line) and deletes them."""
    runs.leave_together(world)
    if rank == 0:
        parts = [shard_part(out_path, i, world) for i in range(1, world + 1)]

        def write(out):
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        runs.write_atomically(out_path, write)
        for part in parts:
            os.remove(part)
    runs.leave_together(world)       # no process ends before the joined file exists


# 2. Standard input and interactive translation ----------------------------------------------

def read_source(path):
    """The lines of --src: data.read_lines of the file, or for "-" of standard input, read to its end."""
    if path != "-":
        return data.read_lines(path)
    try:
        return data.read_lines("/dev/stdin")
    except UserError as e:
        raise UserError(str(e).replace("/dev/stdin", "--src - (standard input)")) from None


def interactive(model, src_vocab, tgt_vocab, inp, out, *, beam=5, nbest=1, **search):
    """Translate each line of `inp` (a binary stream: sys.stdin.buffer) as soon as it is read and write
    its translation to `out` (with nbest > 1 its n-best lines, numbered from 0 as in a file), flushed,
    until the end of the input: no batching, so no line waits for the next. An empty line gives an
    empty one. Returns the number of lines translated."""
    count = 0
    for raw in iter(inp.readline, b""):
        line = raw.decode("utf-8", errors="replace").removeprefix("\ufeff").strip()
        entries = decode_ids(model, [src_vocab.encode(line)], beam=beam, nbest=nbest, **search)[0]
        out.write("".join(text + "\n" for text in output_lines(count, entries, tgt_vocab, nbest)))
        out.flush()
        count += 1
    return count


# 3. Command line -----------------------------------------------------------------------------

EXAMPLES = """examples:
  translate and score:  python translate.py --ckpt best.pt --src test.en --ref test.de --out test.hyp
  Seq-KD data:          python translate.py --ckpt teacher.pt --src train.en --beam 5 --out train.kd.de
    on 4 GPUs:          torchrun --nproc_per_node 4 translate.py ... --out train.kd.de (one shard each)
                        (or --shard 1/4 ... 4/4 with --out part1 ... part4, then cat part1 .. part4)
  Seq-Inter data:       python translate.py --ckpt teacher.pt --src train.en --ref train.de \\
                          --beam 35 --nbest 35 --select sentence-bleu --out train.inter.de
  Table 1 columns:      python translate.py --ckpt best.pt --src test.en --ref test.de --report --json r.json
  attention heat map:   python translate.py --ckpt best.pt --src test.en --show-attention 3
  in a pipe:            cat test.en | python translate.py --ckpt best.pt --src - --beam 1 | less
  as you type:          python translate.py --ckpt best.pt --interactive   (one line in, one out; Ctrl-D ends)
  a long job's log:     nohup python translate.py ... --out train.kd.de 2> log   (a progress line every 30 s)"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Translate a file with a seqkd checkpoint (greedy or beam search), score it "
                    "with BLEU,\nmake Seq-KD / Seq-Inter distillation data, or report the "
                    "Kim & Rush Table 1 columns.",
        epilog=EXAMPLES)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (holds the vocabularies)")
    p.add_argument("--src", help="source text, one sentence per line; - reads standard input to its end "
                                 "(then translates it in batches, as a file)")
    p.add_argument("--interactive", action="store_true",
                   help="read standard input one line at a time and print each translation at once "
                        "(flushed), until end of input (Ctrl-D): for typing, or a program that sends a "
                        "line and waits for its translation. No --src needed")
    p.add_argument("--ref", help="reference translations, line-aligned with --src: prints BLEU")
    p.add_argument("--out", help="output file (default, or -: stdout). Written as OUT.partial in chunks; "
                                 "an interrupted run resumes when rerun with the same flags")
    p.add_argument("--beam", type=int, default=5, help="beam size K; 1 = greedy search (default 5)")
    p.add_argument("--nbest", type=int, default=1, help="write the K best per sentence as "
                   "'line ||| translation ||| score' (line 0-based); needs --beam >= K")
    p.add_argument("--select", choices=["sentence-bleu"], help="Seq-Inter: with --nbest K and --ref, "
                   "write per line the n-best entry of highest smoothed sentence BLEU against the reference")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--length-norm", action="store_true", help="rank hypotheses by score / length "
                   "(default: raw sum of log-probs, as the reference seq2seq-attn code)")
    p.add_argument("--max-len-a", type=float, default=2.0,
                   help="max output length = a * source length + b (default a=2.0)")
    p.add_argument("--max-len-b", type=int, default=10, help="see --max-len-a (default b=10)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--int8", action="store_true", help="decode with int8 weights (CPU; model.int8_model)")
    p.add_argument("--autocast", choices=["tf32", "bf16", "fp16"], help="decode in reduced precision: TF32 "
                   "matrix products (CUDA), or torch.autocast in bf16 (CUDA or CPU) or fp16 (CUDA); "
                   "model.decoding_precision")
    p.add_argument("--bleu-tokenize", help="sacrebleu tokenizer: 13a for raw text, none for "
                                           "pre-tokenized text (default: the one training used, else 13a)")
    p.add_argument("--shard", default="1/1",
                   help="I/N: translate only the I-th of N contiguous blocks of lines; `cat` the N outputs "
                        "in order to join them (under torchrun: automatic, one shard per process)")
    p.add_argument("--chunk-size", type=int, default=1000,
                   help="sentences per resumable chunk of --out (default 1000)")
    p.add_argument("--show-attention", type=int, metavar="N",
                   help="translate line N of --src (1 = first) and print its attention heat map")
    p.add_argument("--report", action="store_true", help="with --ref: BLEU greedy and beam, perplexity "
                   "on the references and p(t = ŷ) (Kim & Rush 2016, Table 1)")
    p.add_argument("--json", help="with --report: also write the report to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, no progress lines")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="when stderr is not a terminal (a log file), a progress line instead of the bar "
                        "at most every SECONDS: sentences done / total, sentences/s (default 30)")
    args = p.parse_args(argv)
    if args.out == "-":
        args.out = None                   # stdout, as without --out
    return args


def check_input_args(args):
    """Where the source comes from: --src FILE, --src - (standard input) or --interactive."""
    if args.interactive:
        if args.src not in (None, "-"):
            raise UserError(f"--interactive reads standard input: leave out --src {args.src}")
        used = [flag for flag, value in (("--out", args.out), ("--ref", args.ref), ("--report", args.report),
                                         ("--select", args.select), ("--show-attention", args.show_attention),
                                         ("--shard", args.shard != "1/1")) if value]
        if used:
            raise UserError(f"--interactive prints each translation to stdout as its line comes: leave out "
                            f"{', '.join(used)} (or give --src FILE instead of --interactive)")
    elif args.src is None:
        raise UserError("give --src FILE (or --src - for standard input, or --interactive to translate "
                        "line by line)")
    if args.ref == "-":
        raise UserError("--ref -: only --src can be standard input; give the references as a file")
    if args.progress_every < 0:
        raise UserError(f"--progress-every {args.progress_every}: give 0 or more seconds")


def check_args(args):
    """Flag combinations that cannot work -> UserError naming the flag and the fix."""
    check_input_args(args)
    for name in ("beam", "nbest", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give 1 or more CPU threads")
    if args.nbest > args.beam:
        raise UserError(f"--nbest {args.nbest} needs --beam {args.nbest} or more (now {args.beam})")
    if args.select and (args.ref is None or args.nbest < 2):
        raise UserError("--select sentence-bleu needs --ref FILE and --nbest K (K >= 2)")
    if args.report and args.ref is None:
        raise UserError("--report needs --ref FILE (the references of --src)")
    if args.report and (args.out or args.nbest > 1 or args.select):
        raise UserError("--report prints a report: leave out --out, --nbest and --select")
    if args.json and not args.report:
        raise UserError("--json writes the --report: add --report")
    if args.bleu_tokenize is not None:
        try:
            BLEU(tokenize=args.bleu_tokenize)
        except Exception:
            raise UserError(f"--bleu-tokenize {args.bleu_tokenize}: not a sacrebleu tokenizer; use "
                            "13a (raw text), none (pre-tokenized), intl, char, zh ...") from None
    if not 0 <= args.max_len_a < float("inf"):
        raise UserError(f"--max-len-a {args.max_len_a}: must be a finite number >= 0")
    if args.max_len_b < 0:
        raise UserError(f"--max-len-b {args.max_len_b}: must be >= 0")
    if args.show_attention is not None and args.show_attention < 1:
        raise UserError(f"--show-attention {args.show_attention}: must be a line number, 1 or more")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:        # started by torchrun
        if args.out is None or args.src in (None, "-") or args.report or args.show_attention is not None:
            raise UserError("under torchrun translate.py only makes files: give --out FILE and --src FILE, "
                            "not - (and no --report / --show-attention / --interactive: they run in one process)")
        if args.shard != "1/1":
            raise UserError(f"--shard {args.shard}: under torchrun each process takes one shard "
                            "already; leave out --shard")
    return parse_shard(args.shard)


def load_translator(args, device):
    """The checkpoint of --ckpt, its model on `device` (int8 with --int8) and its vocabularies."""
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, device)
    if args.int8 and args.autocast:
        raise UserError(f"--int8 and --autocast {args.autocast}: give one precision")
    if args.int8:
        if device.type != "cpu":
            raise UserError(f"--int8 decodes on the CPU, not {device}: add --device cpu")
        model = int8_model(model)
    return (ckpt, model, *data.vocabs_from_checkpoint(ckpt))


def run(args):
    """Translate, report or show attention as the flags say, in the precision of --autocast."""
    shard = check_args(args)
    runs.set_cpu(args.threads)
    log = sys.stderr if args.out is None else sys.stdout      # keep stdout for translations
    # (taken before setup_processes silences stdout in processes > 0: each reports its shard)
    rank, world, device = runs.setup_processes(pick_device(args.device), timeout_hours=48)
    ckpt, model, src_vocab, tgt_vocab = load_translator(args, device)
    with decoding_precision(args.autocast, device):
        return decode(args, ckpt, model, src_vocab, tgt_vocab, log, (rank, world, device, shard))


def decode(args, ckpt, model, src_vocab, tgt_vocab, log, where):
    """run's work once the model is loaded; where = (rank, world, device, shard)."""
    rank, world, device, shard = where
    search = dict(max_len_a=args.max_len_a, max_len_b=args.max_len_b, length_norm=args.length_norm)
    if args.interactive:
        if sys.stdin.isatty():
            print("translate.py: type a sentence and Enter; Ctrl-D ends", file=sys.stderr)
        return interactive(model, src_vocab, tgt_vocab, sys.stdin.buffer, sys.stdout,
                           beam=args.beam, nbest=args.nbest, **search)
    if args.src == "-" and sys.stdin.isatty():
        print("translate.py: reading --src - to its end (Ctrl-D); --interactive translates line by line",
              file=sys.stderr)
    lines = read_source(args.src)
    refs = data.read_lines(args.ref) if args.ref else None
    if refs is not None and len(refs) != len(lines):
        raise UserError(f"--ref {args.ref} has {data.plural(len(refs), 'line')} but --src {args.src} has "
                        f"{len(lines):,}: give line-aligned files")
    tokenize = args.bleu_tokenize or (ckpt.get("args") or {}).get("bleu_tokenize") or "13a"

    if args.show_attention is not None:
        if not 1 <= args.show_attention <= len(lines):
            raise UserError(f"--show-attention {args.show_attention}: --src has lines 1 to {len(lines)}")
        print(show_attention(model, src_vocab, tgt_vocab, lines[args.show_attention - 1],
                             args.beam, **search))
        return None

    if args.report:
        report = table1_report(model, src_vocab, tgt_vocab, lines, refs, args.beam,
                               args.batch_size, tokenize=tokenize, **search)
        report.update(ckpt=args.ckpt, src=args.src, ref=args.ref)
        print(format_report(report))
        if args.json:
            runs.write_json(report, args.json)
        return report

    src = (os.path.abspath(args.src) if args.src != "-" else      # standard input: known by its text
           "stdin sha256:" + hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest())
    run_info = {"ckpt": os.path.abspath(args.ckpt), "src": src}
    out_path, show_progress = args.out, not args.no_progress
    if world > 1:                            # this process: shard rank+1 of N, to its own part
        shard = (rank + 1, world)
        out_path = shard_part(args.out, *shard)
        show_progress = show_progress and rank == 0         # one progress bar: process 0's
    stats = translate_file(model, src_vocab, tgt_vocab, lines, out_path, beam=args.beam, nbest=args.nbest,
                           refs=refs, select=bool(args.select), tokenize=tokenize, shard=shard,
                           chunk_size=args.chunk_size, batch_size=args.batch_size, run_info=run_info,
                           progress=show_progress, progress_every=args.progress_every, **search)
    if stats["sentences"]:
        print(f"translated {stats['sentences']} sentences, {stats['src_words']} source words in "
              f"{stats['seconds']:.1f}s: {stats['src_words'] / max(stats['seconds'], 1e-9):.0f} "
              f"source words/s ({device}, beam {args.beam}"
              + (f", shard {shard[0]}/{shard[1]})" if world > 1 else ")"), file=log)
    if world > 1:
        join_parts(args.out, rank, world)
        runs.end_processes()
        if rank != 0:
            return stats
        shard = (1, 1)                       # the joined file holds every line
    if refs is not None:
        start, end = shard_range(len(lines), *shard)
        return print_bleu(args, stats, refs[start:end], tokenize, log)
    return stats


def print_bleu(args, stats, refs, tokenize, log):
    """BLEU of what translate_file wrote (--out, else stats["lines"]) against `refs`, its lines' references;
    the 1-best of n-best lists, the selected line with --select. Printed to `log`, returned."""
    if args.out is None:
        out_lines = stats["lines"]
    else:
        with open(args.out, encoding="utf-8") as f:
            out_lines = [line.rstrip("\n") for line in f]
    hyps = first_best(out_lines, 1 if args.select else args.nbest)   # select: 1 per line
    result = bleu(hyps, refs, tokenize)
    note = " (Seq-Inter picked each line with the reference: not a test score)" if args.select else ""
    print(result.format(signature=result.signature) + note, file=log)
    return result


def main(argv=None):
    args = parse_args(argv)
    try:  # a second translate.py writing the same --out stops at once (torchrun: process 0 locks the joined file)
        with runs.lock(args.out + ".lock", f"--out {args.out}") if args.out else contextlib.nullcontext():
            return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted" + (": rerun the same command to resume" if args.out else ""))


if __name__ == "__main__":
    main()
