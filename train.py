"""Train a sequence-to-sequence translator: one training loop for every recipe.

    python train.py                     # the built-in synthetic corpus, minutes on a CPU
    python train.py --help              # every flag, one step of the loop, and how the recipes use them

Where things are: the flags and their defaults in flags.py; the text and vocabularies they name in
data.py; the distillation and the loss of a batch in kd_losses.py; random-number state, Ctrl-C, torchrun,
the checkpoints a run starts from and its record (SAVE_DIR/run.json) in runs.py. This file reads top to
bottom: batches, evaluation, checkpoints, several processes, and the run: setup, train_loop (its steps:
train_step) and finish, plain functions of a Run, the run's state.
"""
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from sacrebleu.metrics import CHRF
from tqdm import tqdm

import beam
import data
import prune
import span_corruption
from data import UserError, get_vocabs, load_splits, plural, span_corruption_data
from flags import CPU_THREADS, OPTIMIZERS, make_model_config, parse_args
from kd_losses import (DivergenceCheck, check_teacher_vocabs, compute_loss, make_distillation, mean_loss, nll_sum,
                       warn_unknown_words)
from model import (build_model, count_params, eval_mode, load_checkpoint, model_from_checkpoint, pick_device,
                   save_checkpoint)
from runs import (Progress, StopOnCtrlC, append_line, end_processes, epoch_checkpoints, exit_script, from_process_0,
                  leave_together, lock, progress_meter, restore_log, rng_states, set_cpu, set_rng_states,
                  setup_processes, share_of_batch, starting_checkpoints, sum_over_processes, write_run_record)


# Batches ----------------------------------------------------------------------

def make_batches(examples, args, shuffle: bool, epoch: int = 0) -> list[list[int]]:
    """Example indices of each batch; with shuffle, a deterministic function of (--seed, epoch)."""
    return data.batch_indices([(len(src), len(tgt)) for src, tgt in examples], batch_tokens=args.batch_tokens,
                              batch_size=args.batch_size, shuffle=shuffle, seed=args.seed, epoch=epoch)


# Evaluation -------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, examples, args, device) -> float:
    """exp(total NLL / number of real target tokens incl. EOS) with teacher forcing, in eval mode."""
    total, ntokens = torch.zeros((), device=device), 0
    with eval_mode(model):
        for idxs in make_batches(examples, args, shuffle=False):
            batch = data.collate(examples, idxs).to(device)
            with autocast(device):
                logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
            loss_sum, n = nll_sum(logits, batch.tgt_out)
            total, ntokens = total + loss_sum, ntokens + n
    mean = total.item() / ntokens
    return math.inf if mean > 709 else math.exp(mean)   # (exp overflows a float past 709.78; NaN stays NaN)


def greedy_scores(model, pairs, src_vocab, tgt_vocab, args):
    """sacrebleu BLEU and chrF (character 6-grams, β = 2), each with .signature, of one greedy translation of the
    pairs' sources against their targets; its progress: a bar after 5 s on a terminal, else a line a minute."""
    bar = progress_meter(len(pairs), 0, every=60.0, desc="greedy decoding", delay=5)
    with contextlib.closing(bar):
        hyps = beam.translate(model, src_vocab, tgt_vocab, [src for src, _ in pairs], beam=1, progress=bar)
    refs, metric = [tgt for _, tgt in pairs], CHRF()
    chrf = metric.corpus_score(hyps, [refs])
    chrf.signature = str(metric.get_signature())
    return beam.bleu(hyps, refs, tokenize=args.bleu_tokenize), chrf


def autocast(device):
    """bf16 autocast on CUDA (the loss is computed in float32 anyway); a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# Checkpoints ------------------------------------------------------------------

def save(run, path: Path, with_optimizer=True, **extra) -> None:
    """Write a checkpoint (process 0 alone): only tensors and plain Python values, so that
    weights_only=True loads it; best.pt has no optimizer state (it is for decoding and --init)."""
    if run.rank == 0:
        save_checkpoint({"format": "seqkd", "arch": run.arch, "config": run.config,
                         "vocab": {"src": run.src_vocab.to_dict(), "tgt": run.tgt_vocab.to_dict()},
                         "model": run.model.state_dict(),
                         "optimizer": run.optimizer.state_dict() if with_optimizer else None,
                         **asdict(run.progress), "rng": rng_states(), "args": vars(run.args),
                         **({"masks": run.masks} if run.masks else {}), **extra}, path)


# Several processes: torchrun and DistributedDataParallel ----------------------

# Under torchrun (runs.py) every process builds the same batches (a function of --seed and the epoch) and
# takes sentences r, r+N, r+2N, ... of each (process r; a batch of fewer than N sentences is skipped). DDP
# averages the N gradients in backward(); each share's loss is weighted by its part of the batch (as
# --normalize counts; with --accum, of the step's batches: the last backward() averages, no_sync before), so
# the average is the whole step's gradient and every process clips and steps identically. Process 0 alone
# evaluates, prints and saves; the others wait for its figures (the lr schedule needs them). Processes 1..N-1
# draw dropout from their own streams, reseeded at the start of a run, so a resumed run under torchrun
# repeats the uninterrupted one except for those masks. (Each share's weight: runs.share_of_batch.)


# The run: setup, train_loop, finish -------------------------------------------

class Run:
    """The state of a training run: made by setup, changed by train_loop, read by finish.

    args (the resolved flags); rank, world, device (runs.setup_processes); save_dir and its files.
    read_data: splits, src_vocab, tgt_vocab, train/valid_examples [(src_ids, tgt_ids)], valid_pairs
      (texts, for BLEU); --span-corruption: train_sentences and sentinels, for each epoch's examples.
    make_models: arch, config, model (evaluated and saved), train_model (the same, in DDP under
      torchrun), masks ({name: bool tensor, True = kept}, a pruned model's), n_params, kd.
    make_optimizer: optimizer, progress. Since the last evaluation: part_sums ({part: Σ per-token value x
      ntokens}), tokens, train_time; last_eval_step, last_record (its log.jsonl line); log_rows (log.jsonl's
      rows), saved_at (run.elapsed() at the last write of last.pt); divergence (kd_losses.DivergenceCheck)."""

    def __init__(self, args, rank: int, world: int, device: torch.device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.save_dir = Path(args.save_dir)
        self.last_path, self.best_path = self.save_dir / "last.pt", self.save_dir / "best.pt"
        self.log_path = self.save_dir / "log.jsonl"
        self.train_sentences = self.sentinels = self.masks = self.last_eval_step = self.last_record = None
        self.part_sums, self.tokens, self.train_time, self.log_rows = {}, 0, 0.0, 0

    def elapsed(self) -> float:
        """Seconds of training, over all the runs --resume continued."""
        return self.elapsed_before + time.time() - self.run_start


def setup(args) -> Run:
    """Everything before the first step (processes, checkpoints, data, models, optimizer); returns the Run."""
    rank, world, device = setup_processes(pick_device(args.device))   # one process, or one of torchrun's N
    if args.threads or device.type == "cpu":   # on the CPU, flags.CPU_THREADS unless --threads
        set_cpu(args.threads or CPU_THREADS)
        print(f"CPU threads: {torch.get_num_threads()}" + ("" if args.threads else " (--threads N to change)"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run = Run(args, rank, world, device)
    resume, start, teacher_ckpt, vocab_ckpt, vocab_source = starting_checkpoints(args, run.last_path)
    read_data(run, vocab_ckpt, vocab_source, teacher_ckpt)
    make_models(run, start, teacher_ckpt)
    make_optimizer(run, resume)
    if rank == 0:  # SAVE_DIR/run.json
        write_run_record(run.save_dir / "run.json", {**vars(args), "model": run.config}, device, world,
                         run.progress.step if resume else None)
    return run


def read_data(run: Run, vocab_ckpt, vocab_source, teacher_ckpt) -> None:
    """The vocabularies (process 0's, in every process) and the training and validation examples."""
    args = run.args
    run.splits = load_splits(args)
    src_vocab, tgt_vocab = (get_vocabs(args, run.splits["train"], vocab_ckpt, vocab_source) if run.rank == 0
                            else (None, None))
    if run.world > 1:  # every process takes process 0's vocabularies (threaded sentencepiece need not repeat itself)
        vocabs = {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()} if run.rank == 0 else None
        src_vocab, tgt_vocab = data.vocabs_from_checkpoint({"vocab": from_process_0(vocabs, run.world)})
    if teacher_ckpt:
        check_teacher_vocabs(teacher_ckpt, args.teacher, src_vocab, tgt_vocab)
    run.src_vocab, run.tgt_vocab = src_vocab, tgt_vocab
    train_pairs, _ = data.clean_pairs(run.splits["train"], max_len=args.max_len, src_vocab=src_vocab,
                                      tgt_vocab=tgt_vocab, name="train")
    valid_pairs, _ = data.clean_pairs(run.splits["valid"], name="valid")
    if not args.span_corruption:
        run.train_examples = data.encode_pairs(train_pairs, src_vocab, tgt_vocab)  # [(src_ids, tgt_ids), ...]
        warn_unknown_words(args, run.train_examples, vocab_source)
        run.valid_examples = data.encode_pairs(valid_pairs, src_vocab, tgt_vocab)
        run.valid_pairs = valid_pairs
        return
    # span corruption: the training examples are made afresh every epoch (train_loop), the validation ones once
    run.sentinels, run.train_sentences, run.valid_examples, run.valid_pairs = span_corruption_data(
        args, src_vocab, tgt_vocab, train_pairs, valid_pairs, vocab_source)
    warn_unknown_words(args, [(ids, ids) for ids in run.train_sentences], vocab_source)


def make_models(run: Run, start, teacher_ckpt) -> None:
    """The model (new, or `start`'s with its pruning masks), the teacher and the distillation."""
    args, device = run.args, run.device
    run.arch = args.arch
    run.config = start["config"] if start else make_model_config(args, run.src_vocab, run.tgt_vocab)
    run.model = model_from_checkpoint(start, device=device) if start else build_model(run.arch, run.config).to(device)
    if start and start.get("masks"):
        run.masks = {name: keep.to(device) for name, keep in start["masks"].items()}
        prune.apply_masks(run.model, run.masks)
    run.n_params = count_params(run.model)
    print(f"model: {run.arch} {run.config}\n       {run.n_params:,} parameters" +
          (f", {prune.count_nonzero(run.model):,} non-zero (pruned; the masks are kept)" if run.masks else ""))
    with torch.random.fork_rng(devices=[]):  # its initialisation draws leave the student's dropout as without it
        teacher = model_from_checkpoint(teacher_ckpt, device=device).requires_grad_(False) if teacher_ckpt else None
    run.kd = make_distillation(args, run.model, teacher)  # the teacher in eval mode, without gradients
    run.train_model = run.model
    if run.world > 1:  # a relation loss may leave parameters out (MiniLM: the decoder): DDP must look for them
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=run.kd is not None and run.kd.kind == "relation")


def make_optimizer(run: Run, resume: dict | None) -> None:
    """The optimizer and the progress: fresh (and a fresh SAVE_DIR/log.jsonl), or those of last.pt with its
    random-number state, the training figures since its last evaluation and its log rows (--resume)."""
    args = run.args
    run.optimizer = OPTIMIZERS[args.optim](run.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run.progress, run.divergence = Progress(lr=args.lr), DivergenceCheck(len(run.tgt_vocab), run.kd)
    if resume:
        if resume["args"]["optim"] != args.optim:
            raise UserError(f"--optim {args.optim}: the run in {run.last_path} uses {resume['args']['optim']}; "
                            f"drop --optim to continue it")
        run.optimizer.load_state_dict(resume["optimizer"])
        run.progress = Progress(**{name: resume[name] for name in asdict(run.progress) if name in resume})
        set_rng_states(resume["rng"])
        running, first = resume.get("running") or {"part_sums": {}, "tokens": 0, "train_time": 0.0}, run.rank == 0
        run.part_sums = {name: (value if first else torch.zeros_like(value)).to(run.device)  # 0 in the others:
                         for name, value in running["part_sums"].items()}           # validate sums them
        run.tokens, run.train_time = (running["tokens"], running["train_time"]) if first else (0, 0.0)
        run.divergence = DivergenceCheck(len(run.tgt_vocab), run.kd, running.get("divergence"))
        run.last_record = resume.get("last_record")
        run.last_eval_step = run.last_record["step"] if run.last_record else None
        print(f"resuming {run.last_path}: epoch {run.progress.epoch}, batch {run.progress.batch_in_epoch}, "
              f"step {run.progress.step}, lr {run.progress.lr:g}")
    elif run.rank == 0:  # a new run: no best.pt or epoch checkpoints of the run it replaces (--overwrite)
        for path in [run.best_path, *epoch_checkpoints(run.save_dir)]:
            Path(path).unlink(missing_ok=True)
    if run.rank == 0:  # an empty log.jsonl, or the rows last.pt counts (save_checkpoints)
        run.log_rows = restore_log(run.log_path, resume.get("log_rows") if resume else 0, run.last_record)
    if run.rank > 0:  # dropout: each process its own random stream
        torch.manual_seed(args.seed + 1000 * run.rank + run.progress.step)
    set_lr(run, run.progress.lr, "resumed" if resume else f"--lr, {args.optim}")
    run.run_start, run.elapsed_before = time.time(), run.progress.elapsed
    run.saved_at = run.elapsed_before   # last.pt's time (a new run: 0)


def set_lr(run: Run, lr: float, reason: str) -> None:
    run.progress.lr = lr
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    print(f"learning rate -> {lr:g} ({reason})")


def train_loop(run: Run) -> str | None:
    """Epochs of steps from where run.progress stands, evaluating and saving on the way. Returns
    why training stopped early (Ctrl-C, --max-steps, --time-limit, --patience), or None after the last epoch."""
    args, progress = run.args, run.progress
    run.model.train()
    with StopOnCtrlC() as ctrl_c:
        stop = from_process_0(stop_reason(run, ctrl_c), run.world)  # a resumed run may have nothing to do
        while progress.epoch <= (args.epochs or math.inf) and stop is None:
            if args.span_corruption:  # fresh noise every epoch, as T5; a function of (--seed, epoch)
                run.train_examples = span_corruption.span_corruption_examples(
                    run.train_sentences, run.sentinels, args.seed, progress.epoch, args.noise_density,
                    args.mean_span_length)
            order = make_batches(run.train_examples, args, shuffle=True, epoch=progress.epoch)  # same when resumed
            if run.world > 1:  # every process needs a sentence of each batch
                order = [idxs for idxs in order if len(idxs) >= run.world]
            bar = tqdm(total=len(order), initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
                       unit="batch", file=sys.stderr, disable=run.rank > 0, leave=False,
                       mininterval=1.0 if sys.stderr.isatty() else 60.0)  # a log file: a line a minute
            for first in range(progress.batch_in_epoch, len(order), args.accum):  # --accum batches a step
                parts = train_step(run, order[first:first + args.accum])
                bar.update(min(args.accum, len(order) - first))
                if not bar.disable and progress.step % 10 == 0:  # .item() waits for the GPU: not every step
                    bar.set_postfix(loss=f"{parts['loss'].item():.3f}",
                                    tgt_tok_s=f"{run.tokens / run.train_time:.0f}", refresh=False)
                if args.eval_every and progress.step % args.eval_every == 0:
                    record = validate(run)
                    schedule_lr(run, record, epoch_ended=False)
                    save_checkpoints(run, record)
                due = args.save_every and run.elapsed() - run.saved_at >= 60 * args.save_every  # --save-every
                diverged = run.divergence.check(progress.step)  # all processes alike:
                stop, save_now, diverged = from_process_0((stop_reason(run, ctrl_c), due, diverged), run.world)
                if diverged:
                    bar.close()
                    raise UserError(diverged)
                if save_now and not stop:  # (a stop saves anyway, in finish)
                    save_last(run)
                if stop:
                    break
            bar.close()
            if progress.batch_in_epoch == len(order) and stop != "Ctrl-C":  # the epoch is complete
                record = None if args.eval_every else validate(run)
                schedule_lr(run, record, epoch_ended=True)
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                save_epoch(run, progress.epoch - 1)  # before last.pt: a crash between them repeats the epoch
                if record:
                    save_checkpoints(run, record)
                    stop = from_process_0(stop_reason(run, ctrl_c), run.world)   # --patience
    return stop


def train_step(run: Run, batches: list[list[int]]) -> dict:
    """One optimizer step on the batches (example indices: one, or --accum of them, fewer at the end of an
    epoch), of which this process takes its share. Their gradients add up, each loss weighted by its part of
    them all (share_of_batch): the step of one batch of them all. Returns the parts of the loss of the last
    batch (detached, per token)."""
    args, progress, optimizer = run.args, run.progress, run.optimizer
    t0 = time.time()
    whole = [i for idxs in batches for i in idxs]
    for k, idxs in enumerate(batches):
        mine = idxs[run.rank::run.world]  # this process's share of the batch (all of it in one process)
        batch = data.collate(run.train_examples, mine).to(run.device)
        last = k == len(batches) - 1   # under DDP, only the last backward() averages the gradients
        with contextlib.nullcontext() if last or run.world == 1 else run.train_model.no_sync():
            with autocast(run.device):
                loss, parts = compute_loss(run.train_model, batch, run.kd, args.normalize, args.label_smoothing)
            if run.world > 1 or len(batches) > 1:  # DDP averages the N gradients: weigh by the part of the step
                loss = loss * run.world * share_of_batch(run.train_examples, mine, whole, args.normalize)
            loss.backward()
        for name, value in parts.items():
            run.part_sums[name] = run.part_sums.get(name, 0.0) + value * batch.ntokens
        run.divergence.add(parts, batch.ntokens)
        run.tokens += batch.ntokens
    if args.warmup:  # linear warm-up (Vaswani et al. 2017): lr * min(1, (step + 1) / STEPS)
        for group in optimizer.param_groups:
            group["lr"] = progress.lr * min(1.0, (progress.step + 1) / args.warmup)
    if run.masks:  # pruned weights get no gradient: the norm clipped is that of the kept weights
        prune.mask_gradients(run.model, run.masks)
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if run.masks:
        prune.apply_masks(run.model, run.masks)  # pruned weights back to exactly 0
    progress.step += 1
    progress.batch_in_epoch += len(batches)
    run.train_time += time.time() - t0
    return parts


def stop_reason(run: Run, ctrl_c: StopOnCtrlC) -> str | None:
    if ctrl_c.requested:
        return "Ctrl-C"
    if run.progress.step >= (run.args.max_steps or math.inf):
        return f"--max-steps {run.args.max_steps}"
    if run.args.time_limit is not None and run.elapsed() > 60 * run.args.time_limit:
        return f"--time-limit {run.args.time_limit:g} min"
    if run.args.patience and run.progress.evals_since_best >= run.args.patience:
        return f"--patience {run.args.patience}: no better valid {run.args.best_metric} in as many evaluations"
    return None


def validate(run: Run, stopped=None) -> dict:
    """evaluate (under torchrun: process 0; the others get its record), count the training figures afresh."""
    run.progress.elapsed = run.elapsed()
    if run.world > 1:  # the training figures of all processes together
        run.part_sums = {name: sum_over_processes(value, run.world) for name, value in run.part_sums.items()}
        run.tokens = int(sum_over_processes(torch.tensor(run.tokens, device=run.device), run.world))
    record = from_process_0(evaluate(run, stopped) if run.rank == 0 else None, run.world)
    run.part_sums, run.tokens, run.train_time, run.last_eval_step = {}, 0, 0.0, run.progress.step
    run.last_record = record
    return record


def evaluate(run: Run, stopped) -> dict:
    """Validation perplexity, greedy BLEU and chrF; print them with the training figures, return the log row."""
    args, progress, tokens = run.args, run.progress, run.tokens
    ppl = perplexity(run.model, run.valid_examples, args, run.device)
    bleu, chrf = greedy_scores(run.model, run.valid_pairs, run.src_vocab, run.tgt_vocab, args)
    means = {name: value.item() / tokens for name, value in run.part_sums.items()}  # per target token
    record = {"step": progress.step, "epoch": progress.epoch, "lr": progress.lr,
              "train_loss": means.pop("loss", None), "valid_ppl": ppl, "valid_bleu": bleu.score,
              "valid_chrf": chrf.score, "tokens_per_s": tokens / run.train_time if run.train_time else None,
              "elapsed": progress.elapsed}
    if run.kd or args.best_metric == "loss":  # the training objective on the validation data
        with eval_mode(run.model), autocast(run.device):
            record["valid_loss"] = mean_loss(run.model, (data.collate(run.valid_examples, idxs).to(run.device)
                                                         for idxs in make_batches(run.valid_examples, args, False)),
                                             run.kd, args.label_smoothing)
    if means:  # the terms of a distillation loss, e.g. {"nll": .., "word_kd": ..}
        record["train_parts"] = means
    if stopped:
        record["stopped"] = stopped
    train_loss = f"{record['train_loss']:.3f}" if tokens else "-"
    print(f"step {progress.step} | epoch {progress.epoch} | lr {progress.lr:g} | train loss {train_loss} | "
          f"valid ppl {ppl:.2f} | " + (f"valid loss {record['valid_loss']:.4f} | " if "valid_loss" in record else "")
          + f"valid BLEU {bleu.score:.2f} | chrF {chrf.score:.2f} | "
          f"{record['tokens_per_s'] or 0:.0f} tgt tok/s" +
          (f" | stopped: {stopped}" if stopped else ""))
    if run.last_record is None:
        print(f"BLEU signature: {bleu.signature}; chrF signature: {chrf.signature}")
    return record


def schedule_lr(run: Run, record, epoch_ended: bool) -> None:
    """Luong et al. (2015): halve the rate after each epoch past --decay-after, or on a plateau of the validation
    --best-metric: when it got worse since the last evaluation (a Seq-KD student's reference perplexity can rise
    while its BLEU climbs) or, with --decay-patience K, after every K evaluations in a row without a new best."""
    args, progress = run.args, run.progress
    if epoch_ended and args.decay_after is not None and progress.epoch > args.decay_after:
        set_lr(run, progress.lr * args.lr_decay, f"epoch {progress.epoch} > --decay-after {args.decay_after}")
    elif record and args.decay_on_plateau:
        misses = 0 if progress.improves(record, args.best_metric) else progress.evals_since_best + 1
        if args.decay_patience:
            why = misses and misses % args.decay_patience == 0 and f"no better valid {args.best_metric} in {misses} " \
                "evaluations (--decay-patience)"
        else:
            why = progress.worse_than_last(record, args.best_metric) and f"valid {args.best_metric} got worse"
        if why:
            set_lr(run, progress.lr * args.lr_decay, why)
    if record:
        progress.remember(record)


def save_last(run: Run, new_row: bool = False) -> None:
    """last.pt, with the training figures since the last evaluation (summed over processes), the last log row
    and the number of rows in log.jsonl (with new_row: once that row is appended)."""
    run.progress.elapsed = run.saved_at = run.elapsed()
    part_sums = {name: sum_over_processes(value, run.world).cpu() for name, value in run.part_sums.items()}
    tokens = int(sum_over_processes(torch.tensor(run.tokens, device=run.device), run.world))
    running = {"part_sums": part_sums, "tokens": tokens, "train_time": run.train_time,
               "divergence": run.divergence.state()}
    save(run, run.last_path, running=running, last_record=run.last_record, log_rows=run.log_rows + new_row)


def save_epoch(run: Run, epoch: int) -> None:
    """--keep-epochs N: the model after `epoch` as SAVE_DIR/epoch{epoch}.pt (no optimizer state), the N newest kept."""
    if run.args.keep_epochs and run.rank == 0:
        save(run, run.save_dir / f"epoch{epoch}.pt", with_optimizer=False)
        for old in epoch_checkpoints(run.save_dir)[:-run.args.keep_epochs]:
            Path(old).unlink(missing_ok=True)


def save_checkpoints(run: Run, record) -> None:
    """After an evaluation: best.pt (no optimizer state: it is for decoding and --init) when better, last.pt,
    then the log row. A crash between any two writes leaves log and last.pt consistent: last.pt holds the row
    and the log's rows with it, --resume makes the log those (a crash before last.pt repeats the evaluation)."""
    progress = run.progress
    if progress.add_evaluation(record, run.args.best_metric):
        save(run, run.best_path, with_optimizer=False)
    save_last(run, new_row=True)
    if run.rank == 0:
        append_line(run.log_path, json.dumps(record))
    run.log_rows += 1


def finish(run: Run, stop: str | None) -> dict:
    """After train_loop: save (Ctrl-C), or evaluate where training ended and score the test set
    with the best model. Returns the final metrics."""
    args, progress = run.args, run.progress
    if stop == "Ctrl-C":
        save_last(run)
        print(f"stopped by Ctrl-C: saved {run.last_path} at epoch {progress.epoch}, batch {progress.batch_in_epoch}, "
              f"step {progress.step}; continue with --resume")
        leave_together(run.world)
        return {"interrupted": True, "step": progress.step, "last_path": str(run.last_path)}
    time_limit = stop is not None and stop.startswith("--time-limit")
    if run.last_eval_step != progress.step or time_limit:  # evaluate where training ended (no lr change)
        save_checkpoints(run, validate(run, stopped=stop if time_limit else None))
    elif not run.best_path.exists():
        save(run, run.best_path, with_optimizer=False)
    print(f"done after {plural(progress.step, 'step')} ({stop or plural(args.epochs, 'epoch')}): best valid ppl "
          f"{progress.best_valid_ppl:.2f}, best valid BLEU {progress.best_valid_bleu:.2f}; "
          f"{run.best_path} is the best by {args.best_metric}")
    metrics = {"step": progress.step, "epoch": progress.epoch, "params": run.n_params,
               "best_valid_ppl": progress.best_valid_ppl, "best_valid_bleu": progress.best_valid_bleu,
               **({"best_valid_loss": progress.best_valid_loss} if "valid_loss" in run.last_record else {}),
               "valid_ppl": run.last_record["valid_ppl"], "valid_bleu": run.last_record["valid_bleu"],
               "valid_chrf": run.last_record.get("valid_chrf"), "elapsed": progress.elapsed,
               "best_path": str(run.best_path), "last_path": str(run.last_path), "log_path": str(run.log_path)}
    if "test" in run.splits and run.rank == 0:
        metrics.update(score_test(run))
    leave_together(run.world)
    return metrics


def score_test(run: Run) -> dict:
    """The test set, scored with the best model."""
    best = model_from_checkpoint(load_checkpoint(run.best_path), device=run.device)
    test_pairs, _ = data.clean_pairs(run.splits["test"], name="test")
    ppl = perplexity(best, data.encode_pairs(test_pairs, run.src_vocab, run.tgt_vocab), run.args, run.device)
    bleu, chrf = greedy_scores(best, test_pairs, run.src_vocab, run.tgt_vocab, run.args)
    print(f"test ({run.best_path}): ppl {ppl:.2f} | greedy BLEU {bleu.score:.2f} | chrF {chrf.score:.2f} | "
          f"{bleu.signature}")
    return {"test_ppl": ppl, "test_bleu": bleu.score, "test_chrf": chrf.score}


def train(args) -> dict:
    """Run the training of parsed, resolved `args` in a locked SAVE_DIR (runs.lock); return the final metrics."""
    with lock(Path(args.save_dir) / ".lock", f"the run folder {args.save_dir}"):
        run = setup(args)
        return finish(run, train_loop(run))


def main(argv=None) -> dict:
    """Parse the flags (a list, or sys.argv) and train; a bad input exits with a one-line error."""
    try:
        return train(parse_args(argv))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped by Ctrl-C; nothing saved since the last checkpoint")
    finally:
        end_processes()


if __name__ == "__main__":
    exit_script(130 if main().get("interrupted") else 0)
