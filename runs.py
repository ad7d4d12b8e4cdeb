"""What a long run needs besides the model, shared by train.py and translate.py: 1. files written
atomically, and locked against a second run, 2. resuming (train.py's Progress, random-number state,
Ctrl-C), 3. several processes: `torchrun --nproc_per_node N script.py ...` starts N copies of the
script (one per GPU; on a CPU, N processes) with WORLD_SIZE=N, RANK and LOCAL_RANK set;
setup_processes joins them into one process group, and each script splits its work by rank
(train.py: a share of every batch; translate.py: one shard of the lines each), 4. train.py's run
folders: the checkpoints a run starts from, a free folder beside a taken one, the epoch checkpoints
(--keep-epochs), and SAVE_DIR/run.json, the record of how it was started, 5. the progress lines of
long decodings (translate.py, train.py's evaluations).
"""
import contextlib
import ctypes
import datetime
import importlib
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm


# 1. Files ------------------------------------------------------------------------------------

def write_atomically(path, write, mode="wb"):
    """Write the file PATH through `write(f)`, f a new temporary file in PATH's folder (opened with
    `mode`), flushed, fsync'ed and renamed onto PATH: a crash at any moment leaves the old file or
    the complete new one, and two writers never share a temporary file. Creates the folder."""
    path = str(path)
    os.makedirs(folder := os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path):
    """write_atomically a JSON file (indented, one trailing newline)."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"), mode="w")


def append_line(path, line: str) -> None:
    """Append one line to a text file, flushed and fsync'ed (a log that a crash must not lose)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def restore_log(path, rows: int | None, last_row: dict | None) -> int:
    """Make the JSON-lines log PATH what a checkpoint knows of it, when a run resumes: its first `rows` rows
    (None: all), `last_row` (the checkpoint's copy of row `rows`) appended if a crash came before it was
    completely written. Rewritten atomically; returns the number of rows."""
    lines = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.readlines()[:rows] if line.endswith("\n")]  # not a half-written one
    if len(lines) < (rows or 0) and last_row:
        lines.append(json.dumps(last_row) + "\n")
    write_atomically(path, lambda f: f.writelines(lines), mode="w")
    return len(lines)


@contextlib.contextmanager
def lock(path, name: str):
    """Hold the lock file PATH while the block runs, so that two live runs never write one NAME (a run
    folder, an output file): PATH is created exclusively (O_CREAT | O_EXCL) and holds this process's id;
    it is removed on leaving the block, also on an error or Ctrl-C. A lock whose process is gone (killed)
    is taken over. Under torchrun only process 0 takes it."""
    from data import UserError  # imported here, so that data may import runs
    if int(os.environ.get("RANK", "0")) > 0:
        yield
        return
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = lock_pid(path)
            if pid is not None and is_alive(pid):
                raise UserError(f"{name} is in use by process {pid} (lock file {path}): wait for it to end, "
                                "or stop it") from None
            print(f"{name}: taking over the stale lock {path} (process {pid} is no longer running)",
                  file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    with open(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def lock_pid(path) -> int | None:
    """The process id in a lock file, or None (gone, or not written yet)."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                    # signal 0: no signal, only "does it exist?"
    except ProcessLookupError:
        return False
    except PermissionError:                # it exists, under another user
        pass
    return True


# 2. Resume: progress, random-number state and Ctrl-C ------------------------------------------

@dataclass
class Progress:
    """Where a train.py run stands: everything besides weights and optimizer that --resume needs."""
    epoch: int = 1                 # the current epoch, counted from 1
    batch_in_epoch: int = 0        # batches of this epoch already trained on
    step: int = 0                  # optimizer steps so far
    lr: float = 1.0
    best_valid_ppl: float = math.inf
    best_valid_bleu: float = -1.0
    best_valid_loss: float = math.inf  # --best-metric loss: the training objective on the validation data
    prev_valid_ppl: float = math.inf   # for --decay-on-plateau: the last evaluation's figures
    prev_valid_bleu: float = -1.0
    prev_valid_loss: float = math.inf
    evals_since_best: int = 0      # for --patience and --decay-patience
    elapsed: float = 0.0           # seconds of this run, over all its resumptions

    def improves(self, record: dict, metric: str) -> bool:
        """Whether an evaluation's row beats the best so far on metric ("ppl", "loss": lower is better; "bleu")."""
        return better(record[f"valid_{metric}"], getattr(self, f"best_valid_{metric}"), metric)

    def worse_than_last(self, record: dict, metric: str) -> bool:
        """Whether an evaluation's row is worse on metric than the evaluation before it."""
        return better(getattr(self, f"prev_valid_{metric}"), record[f"valid_{metric}"], metric)

    def add_evaluation(self, record: dict, metric: str) -> bool:
        """Count an evaluation's row in the best figures (a row without a validation loss has none); returns
        whether it improves on metric."""
        improves = self.improves(record, metric)
        self.best_valid_ppl = min(self.best_valid_ppl, record["valid_ppl"])
        self.best_valid_bleu = max(self.best_valid_bleu, record["valid_bleu"])
        self.best_valid_loss = min(self.best_valid_loss, record.get("valid_loss", math.inf))
        self.evals_since_best = 0 if improves else self.evals_since_best + 1
        return improves

    def remember(self, record: dict) -> None:
        """The last evaluation's figures, for worse_than_last."""
        self.prev_valid_ppl, self.prev_valid_bleu = record["valid_ppl"], record["valid_bleu"]
        self.prev_valid_loss = record.get("valid_loss", math.inf)


def better(new: float, old: float, metric: str) -> bool:
    """new beats old on metric: higher BLEU, lower perplexity or loss."""
    return new > old if metric == "bleu" else new < old


def rng_states() -> dict:
    """Every random stream training draws from (torch CPU and CUDA, Python's), for a checkpoint."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


class StopOnCtrlC:
    """First Ctrl-C: .requested (the loop finishes its step, saves, stops); a second: KeyboardInterrupt."""
    message = "\nCtrl-C: stopping after this step and saving last.pt (press again to stop at once)"

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(self.message, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# 3. Processes: the CPU's settings, and several processes under torchrun ------------------------

def set_cpu(threads: int | None) -> bool:
    """torch's thread count (when given), and glibc's heap kept for reuse. Every training step
    allocates and frees tensors the size of its logits (tokens x vocabulary: megabytes); glibc
    returns freed blocks that large to the OS, and the next step faults every page of them in
    again. Fixed thresholds keep blocks up to 32 MiB in the heap, and freed memory there: a 2x64
    LSTM step with a 3,000-piece softmax ran 1.25-1.4x faster (BENCHMARKS.md, "Sixth session").
    Without glibc (macOS, Windows) only the thread count is set. Returns whether the heap's were."""
    if threads:
        torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return (libc.mallopt(-3, 32 << 20) == 1       # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
            and libc.mallopt(-1, 1 << 30) == 1)   # M_TRIM_THRESHOLD: and stay there when freed (up to 1 GiB)


def setup_processes(device, timeout_hours=2.0) -> tuple[int, int, torch.device]:
    """(rank, number of processes, device): (0, 1, device), or under torchrun (WORLD_SIZE > 1) join
    the process group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA, gloo on CPU; processes
    other than 0 print nothing (stdout to /dev/null; errors still reach stderr). The timeout is how
    long a process may wait at a barrier for the others (process 0 evaluating, or a slower shard)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=timeout_hours))
    rank = torch.distributed.get_rank()
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world, device


def from_process_0(value, world: int):
    """`value` as process 0 has it, in every process (unchanged with one process)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def share_of_batch(examples, mine, whole, normalize: str) -> float:
    """This process's part `mine` of the `whole` step (example indices: its batch, or its --accum batches),
    in what --normalize divides by: target tokens (with EOS) or sentences."""
    def size(idxs):
        return sum(len(examples[i][1]) + 1 for i in idxs) if normalize == "tokens" else len(idxs)
    return size(mine) / size(whole)


def sum_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of a tensor over all processes (unchanged with one process)."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def leave_together(world: int) -> None:
    """Wait until every process is here: one that exits early closes its connections under the others,
    which then abort; and process 0 often has the last work (saving, joining files)."""
    if world > 1:
        torch.distributed.barrier()


def exit_script(code: int) -> None:
    """Exit with `code`; under torchrun at once, skipping Python's shutdown (call it when all is saved and every
    process is past the last barrier): DDP keeps gloo's threads alive after destroy_process_group (torch 2.13),
    and an interpreter shutting down beside them can abort, which torchrun reports as a failure."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def end_processes() -> None:
    """Leave the process group, if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# 4. Run folders: the checkpoints a run starts from, the run record ---------------------------
# (data, flags and model import this module: what this part needs of them is imported where it is used)

def starting_checkpoints(args, last_path) -> tuple:
    """The checkpoints a run starts from, each None if not given: (resume: SAVE_DIR/last.pt with --resume,
    start: the weights and config to start from (resume or --init), teacher, vocab: the vocabularies to
    take (else new ones are built), vocab_source: where they come from). --resume gives everything; --init
    weights, config, masks and vocabularies; --vocab-from and --teacher vocabularies. With a checkpoint to
    start from, args.arch becomes its architecture. A SAVE_DIR holding a run needs --resume, --overwrite or
    another --save-dir (the error names a free one, free_folder)."""
    from data import UserError
    from flags import check_model_flags
    from model import load_checkpoint
    if not args.resume and os.path.exists(last_path) and not args.overwrite:
        raise UserError(f"{args.save_dir} already holds a run: add --resume to continue it, --overwrite to "
                        f"replace it, or --save-dir {free_folder(args.save_dir)} (free)")
    resume = load_checkpoint(last_path) if args.resume else None
    init = load_checkpoint(args.init) if args.init and not resume else None
    teacher = load_checkpoint(args.teacher) if args.teacher else None
    if resume:
        vocab, vocab_source = resume, str(last_path)
    elif init:
        vocab, vocab_source = init, f"--init {args.init}"
    elif args.vocab_from:
        vocab, vocab_source = load_checkpoint(args.vocab_from), f"--vocab-from {args.vocab_from}"
    elif teacher:
        vocab, vocab_source = teacher, f"the teacher {args.teacher} (distillation needs the same words)"
    else:
        vocab, vocab_source = None, None
    start = resume or init                    # the model's weights and config, else a new model
    source = (str(last_path) if resume else f"--init {args.init}") if start else None
    if start:
        if args.arch and args.arch != start["arch"]:
            raise UserError(f"--arch {args.arch}, but {source} is a {start['arch']} model: drop --arch (fine-tuning "
                            "keeps the checkpoint's architecture), or drop --init to train a new model")
        args.arch = start["arch"]
    check_model_flags(args, args.arch, start["config"] if start else None, source)
    return resume, start, teacher, vocab, vocab_source


def free_folder(folder) -> str:
    """The first of FOLDER-2, FOLDER-3, ... that does not exist (after NAME-k: NAME-(k+1), ...), a --save-dir for
    a new run beside FOLDER's."""
    folder, k = os.path.normpath(folder), 2
    if numbered := re.fullmatch(r"(.+)-(\d+)", folder):
        folder, k = numbered[1], int(numbered[2]) + 1
    while os.path.exists(f"{folder}-{k}"):
        k += 1
    return f"{folder}-{k}"


def epoch_checkpoints(folder) -> list:
    """The epoch checkpoints SAVE_DIR/epoch{E}.pt of train.py --keep-epochs, oldest first (by E, not by name)."""
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        found = [(int(m[1]), name) for name in os.listdir(folder) if (m := re.fullmatch(r"epoch(\d+)\.pt", name))]
    return [os.path.join(folder, name) for _, name in sorted(found)]


def code_version(folder) -> dict:
    """The code in `folder`: {"commit": its git commit (40 hex digits), "dirty": whether tracked or new files
    differ from it}, both None when it is not a git checkout (or git is not installed)."""
    def git(*argv):
        try:
            done = subprocess.run(["git", "-C", str(folder), *argv], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": None if status is None else status != ""}


def package_versions() -> dict:
    """The versions of Python and of the packages a result depends on (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in ["torch", "numpy", "sacrebleu", "sentencepiece"]:
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU's model, e.g. "AMD EPYC": a run repeats to the last digit only on the same CPU (and
    library builds), since another one rounds differently and the training curves drift apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:     # Linux
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def write_run_record(path, settings: dict, device, processes: int, resumed_at: int | None = None) -> dict:
    """Write PATH (SAVE_DIR/run.json, atomically): how the run was started, to repeat or explain it. A new run:
    {"started" (local time), "command" (the argument list), "settings" (every resolved flag, the model
    config), "code" (code_version of this folder), "versions" (package_versions), "device", "step": 0,
    "resumptions": []}; the device: {"device" (e.g. cuda:0), its "name", "processes" (torchrun's), CPU
    "threads"}. A run resumed at step `resumed_at` keeps the record and appends {"started", "command",
    "code", "versions", "device", "step", "changed": the settings that differ from the record's} to its
    "resumptions" (a run from before records began gets a new record, at its step). Returns the record."""
    settings = json.loads(json.dumps(settings, default=str))      # what JSON holds of it (paths as text)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    device = {"device": str(device), "name": name, "processes": processes, "threads": torch.get_num_threads()}
    now = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": [sys.executable, *sys.argv], "code": code_version(os.path.dirname(os.path.abspath(__file__))),
           "versions": package_versions(), "device": device, "step": resumed_at or 0}
    if resumed_at is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        changed = {flag: value for flag, value in settings.items() if record["settings"].get(flag) != value}
        record["resumptions"].append({**now, "changed": changed})
    else:
        record = {**now, "settings": settings, "resumptions": []}
    write_json(record, path)
    return record


# 5. Progress of long decodings --------------------------------------------------------------

class ProgressLines:
    """Progress for a log file, where a tqdm bar would stay silent (stderr not a terminal): update(n)
    as a tqdm bar's (beam.decode_ids calls it after each batch) prints, at most once every `every`
    seconds, `translating: DONE/TOTAL sentences (P%), R sentences/s, about M min left` to stderr,
    R counted over the sentences of this run (not those a resumed run skipped); `desc` names the job."""

    def __init__(self, total, initial=0, every=30.0, clock=time.monotonic, desc="translating"):
        self.total, self.done, self.skipped, self.every, self.clock = total, initial, initial, every, clock
        self.desc = desc
        self.t0 = self.last = clock()

    def update(self, n):
        self.done += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (self.done - self.skipped) / max(now - self.t0, 1e-9)
        left = f", about {(self.total - self.done) / rate / 60:.1f} min left" if rate > 0 else ""
        print(f"{self.desc}: {self.done}/{self.total} sentences ({100 * self.done / max(self.total, 1):.0f}%), "
              f"{rate:.1f} sentences/s{left}", file=sys.stderr, flush=True)

    def close(self):
        pass


def progress_meter(total, initial, every, desc="translating", delay=0):
    """What shows the progress of a long decoding (translate_file's, train.py's evaluations): a tqdm
    bar on a terminal (shown after `delay` seconds), else ProgressLines every `every` seconds; None
    (nothing) when every is None."""
    if every is None:
        return None
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, unit="sent", desc=desc, smoothing=0.1, delay=delay,
                    leave=delay == 0)
    return ProgressLines(total, initial, every, desc=desc)
