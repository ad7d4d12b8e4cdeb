"""Train a sequence-to-sequence translator: one training loop for every recipe.

    python train.py                                    # the built-in synthetic corpus, minutes on a CPU
    python train.py --train-src train.en --train-tgt train.de \\
                    --valid-src valid.en --valid-tgt valid.de --preset kim-rush-student
    python train.py ... --teacher teacher.pt --kd-alpha 0.5    # Word-KD (Kim & Rush 2016, section 3.1)
    python train.py ... --init student.pt --lr 0.1              # fine-tune (Seq-Inter, retrain a pruned model)
    python train.py --resume --save-dir runs/NAME               # continue a stopped run exactly

One optimisation step, whatever the recipe:
    loss = NLL, token-normalised               (or α·L_WORD-KD + (1-α)·L_NLL with --teacher)
    loss.backward(); clip the gradient norm to --clip; optimizer.step()
    re-apply the pruning masks, if the model has any, so pruned weights stay exactly 0.
Training on distilled data (Seq-KD, Seq-Inter) is this same loop with other --train-tgt files.

Every evaluation (each epoch, or every --eval-every steps) computes the validation perplexity and
the BLEU of greedy decoding, appends a line to SAVE_DIR/log.jsonl and writes SAVE_DIR/last.pt;
SAVE_DIR/best.pt keeps the model with the best validation perplexity (--best-metric bleu to choose
by BLEU instead). --resume continues from last.pt to the same result an uninterrupted run gives:
the batches of an epoch depend only on (--seed, epoch), and the checkpoint holds the optimizer,
the learning-rate schedule, the random-number generators and the position inside the epoch.

The file reads top to bottom: command line, data, model, loss, evaluation, checkpoints, the loop.
"""
import argparse
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import beam
import data
import kd_losses
import prune
from data import UserError
from model import (PRESETS, build_model, count_params, load_checkpoint, make_config, model_from_checkpoint,
                   pick_device, save_checkpoint)

# -----------------------------------------------------------------------------
# Command line

# model flags that override a field of the model's config (flag dest == config field name)
MODEL_FIELDS = ["layers", "hidden", "emb_dim", "attention", "bidirectional", "input_feed", "dropout"]
DEFAULT_EPOCHS = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("data (give none of the file flags to train on the built-in synthetic corpus)")
    g.add_argument("--train-src", metavar="FILE", help="training source sentences, one per line")
    g.add_argument("--train-tgt", metavar="FILE", help="training target sentences, line-aligned with --train-src "
                   "(a distilled corpus for Seq-KD / Seq-Inter is just another --train-tgt)")
    g.add_argument("--valid-src", metavar="FILE", help="validation source (perplexity and BLEU at every evaluation)")
    g.add_argument("--valid-tgt", metavar="FILE", help="validation target (the BLEU references)")
    g.add_argument("--test-src", metavar="FILE", help="optional test source: the best model is scored on it at the end")
    g.add_argument("--test-tgt", metavar="FILE", help="optional test target")
    g.add_argument("--tokenizer", choices=["word", "spm"], default="word",
                   help="word: whitespace tokens, the N most frequent kept, the rest <unk>; "
                        "spm: a sentencepiece model trained on the training text (default: %(default)s)")
    g.add_argument("--src-vocab-size", type=int, metavar="N",
                   help="source vocabulary size incl. the 4 specials (default: 50000 for word, 8000 for spm)")
    g.add_argument("--tgt-vocab-size", type=int, metavar="N", help="target vocabulary size (same defaults)")
    g.add_argument("--joint-vocab", action="store_true",
                   help="one vocabulary shared by source and target, of --src-vocab-size entries")
    g.add_argument("--vocab-from", metavar="CKPT",
                   help="reuse the vocabularies of a checkpoint instead of building new ones "
                        "(automatic with --teacher, --init and --resume)")
    g.add_argument("--max-len", type=int, default=50, metavar="N",
                   help="drop training pairs with a side longer than N tokens (default: %(default)s, as Luong et al.)")
    g.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="sentences per batch (default: %(default)s)")
    g.add_argument("--batch-tokens", type=int, metavar="N",
                   help="instead of --batch-size: at most N padded source+target tokens per batch")

    g = p.add_argument_group("model (a preset, then single fields overridden by flags)")
    g.add_argument("--arch", choices=["lstm"], default="lstm", help="model family (default: %(default)s)")
    g.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                   help=f"model size, one of: {', '.join(sorted(PRESETS))} "
                        "(default: 'builtin' on the built-in corpus, else 'kim-rush-student')")
    g.add_argument("--layers", type=int, metavar="N", help="LSTM layers in the encoder and in the decoder")
    g.add_argument("--hidden", type=int, metavar="N", help="LSTM hidden size")
    g.add_argument("--emb-dim", type=int, metavar="N", help="word embedding size")
    g.add_argument("--attention", choices=["dot", "general", "concat"],
                   help="Luong et al. (2015) attention score")
    g.add_argument("--bidirectional", action="store_true", default=None, help="bidirectional encoder")
    g.add_argument("--no-input-feed", dest="input_feed", action="store_false", default=None,
                   help="do not feed the previous attentional state h~ into the decoder input")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout probability")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optim", choices=["sgd", "adam"], default="sgd",
                   help="plain SGD as Luong et al. and Kim & Rush, or Adam (default: %(default)s)")
    g.add_argument("--lr", type=float, help="learning rate (default: 1.0 for sgd, 0.001 for adam)")
    g.add_argument("--decay-after", type=int, metavar="N",
                   help="halve the learning rate at the end of every epoch after epoch N (Luong et al.; "
                        "with sgd or adam)")
    g.add_argument("--decay-on-plateau", action="store_true",
                   help="halve the learning rate when the validation perplexity rises from one evaluation to the next")
    g.add_argument("--lr-decay", type=float, default=0.5, metavar="F",
                   help="factor of each decay (default: %(default)s, i.e. halve)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W",
                   help="L2 weight decay (default: %(default)s)")
    g.add_argument("--clip", type=float, default=5.0, metavar="NORM",
                   help="rescale the gradient when its global norm exceeds NORM; 0 = off (default: %(default)s)")
    g.add_argument("--epochs", type=int, metavar="N",
                   help=f"passes over the training data (default: {DEFAULT_EPOCHS}, or no limit with --max-steps)")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in total")
    g.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop after the step that ends past MINUTES of training (counted over --resume), "
                        "then evaluate and save as at a normal end")
    g.add_argument("--seed", type=int, default=1, metavar="N", help="seeds the initialisation, the batch order and dropout "
                   "(default: %(default)s)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--device", default="auto", metavar="NAME", help="auto (cuda when present), cpu, cuda or cuda:N "
                   "(default: %(default)s); on CUDA the forward pass runs in bf16 autocast")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate every STEPS optimizer steps (default: at the end of every epoch)")
    g.add_argument("--bleu-tokenize", default="13a", metavar="TOK",
                   help="sacrebleu tokenizer: 13a for raw text, none for pre-tokenized corpora, so that it "
                        "equals the paper's tokenized BLEU (default: %(default)s)")
    g.add_argument("--best-metric", choices=["ppl", "bleu"], default="ppl",
                   help="what best.pt is chosen by: validation perplexity, or greedy BLEU (better for Seq-KD "
                        "students, whose perplexity on the references rises while BLEU improves) "
                        "(default: %(default)s)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--name", help="run name (default: 'builtin', or the name of --train-src without extension)")
    g.add_argument("--save-dir", metavar="DIR", help="where best.pt, last.pt and log.jsonl go (default: runs/NAME)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in SAVE_DIR/last.pt; its flags are reused, flags given now "
                        "override them (e.g. a larger --epochs)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if SAVE_DIR already holds a run")
    g.add_argument("--init", metavar="CKPT",
                   help="start from this model's weights, vocabularies, config and pruning masks, with a fresh "
                        "optimizer and --lr (fine-tuning, e.g. Seq-Inter or retraining after pruning)")

    g = p.add_argument_group("distillation (Word-KD, Kim & Rush 2016 section 3.1)")
    g.add_argument("--teacher", metavar="CKPT",
                   help="teacher for word-level KD; it must share the student's vocabularies, which are taken "
                        "from it unless --vocab-from/--init say otherwise")
    g.add_argument("--kd-alpha", type=float, default=0.5, metavar="A",
                   help="L = A * L_WORD-KD + (1 - A) * L_NLL (default: %(default)s, as the paper)")
    g.add_argument("--kd-temperature", type=float, default=1.0, metavar="T",
                   help="soften both distributions by T and scale the KD term by T^2 (default: %(default)s)")
    return p


def resolve_defaults(args) -> None:
    """Fill in the defaults that depend on other flags, and check flag combinations."""
    data_flags = [args.train_src, args.train_tgt, args.valid_src, args.valid_tgt]
    args.builtin = not any(data_flags + [args.test_src, args.test_tgt])
    if not args.builtin and not all(data_flags):
        raise UserError("give all four of --train-src --train-tgt --valid-src --valid-tgt "
                        "(or none of them, to use the built-in corpus)")
    if bool(args.test_src) != bool(args.test_tgt):
        raise UserError("--test-src and --test-tgt go together: give both or neither")
    if args.name is None:
        args.name = "builtin" if args.builtin else Path(args.train_src).stem
    if args.save_dir is None:
        args.save_dir = str(Path("runs") / args.name)
    if args.preset is None:
        args.preset = "builtin" if args.builtin else "kim-rush-student"
    if args.lr is None:
        args.lr = 1.0 if args.optim == "sgd" else 1e-3
    if args.epochs is None and args.max_steps is None:
        args.epochs = DEFAULT_EPOCHS
    default_size = 50000 if args.tokenizer == "word" else 8000
    args.src_vocab_size = args.src_vocab_size or default_size
    args.tgt_vocab_size = args.tgt_vocab_size or default_size
    if args.batch_tokens is not None:
        args.batch_size = None
    for flag, value in [("--batch-size", args.batch_size), ("--batch-tokens", args.batch_tokens),
                        ("--max-len", args.max_len), ("--epochs", args.epochs), ("--max-steps", args.max_steps),
                        ("--eval-every", args.eval_every), ("--threads", args.threads)]:
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number, got {value}")
    if not 0.0 <= args.kd_alpha <= 1.0:
        raise UserError(f"--kd-alpha must be in [0, 1], got {args.kd_alpha}")
    if args.kd_temperature <= 0:
        raise UserError(f"--kd-temperature must be positive, got {args.kd_temperature}")


# -----------------------------------------------------------------------------
# Data


def load_splits(args) -> dict[str, list[tuple[str, str]]]:
    """Raw sentence pairs: {"train", "valid"[, "test"]} from the files given, else the built-in corpus."""
    if args.builtin:
        return data.builtin_splits()
    splits = {"train": data.read_parallel(args.train_src, args.train_tgt),
              "valid": data.read_parallel(args.valid_src, args.valid_tgt)}
    if args.test_src:
        splits["test"] = data.read_parallel(args.test_src, args.test_tgt)
    return splits


def get_vocabs(args, train_pairs, vocab_ckpt, vocab_source):
    """The vocabularies: those of `vocab_ckpt` (resume, init, --vocab-from, teacher) or new ones."""
    if vocab_ckpt is None:
        src_vocab, tgt_vocab = data.build_vocabs([s for s, _ in train_pairs], [t for _, t in train_pairs],
                                                 kind=args.tokenizer, src_size=args.src_vocab_size,
                                                 tgt_size=args.tgt_vocab_size, joint=args.joint_vocab)
        print(f"vocabularies built from the training data: {len(src_vocab)} source, {len(tgt_vocab)} target")
    else:
        src_vocab, tgt_vocab = data.vocabs_from_checkpoint(vocab_ckpt)
        print(f"vocabularies from {vocab_source}: {len(src_vocab)} source, {len(tgt_vocab)} target ({src_vocab.kind})")
    return src_vocab, tgt_vocab


def check_teacher_vocabs(teacher_ckpt, path, src_vocab, tgt_vocab) -> None:
    """Word-KD compares distributions over the same words: the teacher must share both vocabularies."""
    teacher_src, teacher_tgt = data.vocabs_from_checkpoint(teacher_ckpt)
    for side, theirs, ours in [("target", teacher_tgt, tgt_vocab), ("source", teacher_src, src_vocab)]:
        if len(theirs) != len(ours):
            raise UserError(f"--teacher {path}: its {side} vocabulary has {len(theirs)} entries but the student's "
                            f"has {len(ours)}; let the student take the teacher's vocabularies (--vocab-from {path})")
        if theirs.to_dict() != ours.to_dict():
            raise UserError(f"--teacher {path}: its {side} vocabulary ({len(theirs)} entries) holds other words "
                            f"than the student's; let the student take the teacher's (--vocab-from {path})")


def make_batches(examples, args, shuffle: bool, epoch: int = 0) -> list[list[int]]:
    """Example indices of each batch; with shuffle, a deterministic function of (--seed, epoch)."""
    lengths = [(len(src), len(tgt)) for src, tgt in examples]
    return data.batch_indices(lengths, batch_tokens=args.batch_tokens, batch_size=args.batch_size,
                              shuffle=shuffle, seed=args.seed, epoch=epoch)


# -----------------------------------------------------------------------------
# Model


def check_model_flags(args, config: dict, source: str) -> None:
    """With --init/--resume the config comes from the checkpoint; a model flag that disagrees is an error."""
    for field in MODEL_FIELDS:
        value = getattr(args, field)
        if value is not None and value != config.get(field):
            flag = "--no-input-feed" if field == "input_feed" else "--" + field.replace("_", "-")
            raise UserError(f"{flag} ({value}) does not match {source}, whose {field} is {config.get(field)}; "
                            f"drop the flag")


# -----------------------------------------------------------------------------
# Loss


def compute_loss(model, batch, teacher=None, kd_alpha=0.5, kd_temperature=1.0) -> torch.Tensor:
    """The training loss of a batch: a scalar, averaged over the batch.ntokens real target tokens.

    Without a teacher: NLL = -(1/N) Σ_t log p(y_t | y_<t, x) over the non-PAD targets.
    With a teacher: Word-KD (Kim & Rush 2016, section 3.1) mixed with NLL by α, both teacher-forced
    on the gold prefix; the teacher is in eval mode and no gradient flows into it.
    """
    logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
    if teacher is None:
        return kd_losses.nll_loss(logits, batch.tgt_out)
    with torch.no_grad():
        teacher_logits, _ = teacher(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
    return kd_losses.word_kd_loss(logits, teacher_logits, batch.tgt_out, alpha=kd_alpha, T=kd_temperature)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def perplexity(model, examples, args, device) -> float:
    """exp(total NLL / number of real target tokens incl. EOS) with teacher forcing, in eval mode."""
    was_training = model.training
    model.eval()
    total, ntokens = torch.zeros((), device=device), 0
    for idxs in make_batches(examples, args, shuffle=False):
        batch = data.collate(examples, idxs).to(device)
        with autocast(device):
            logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
        loss_sum, n = kd_losses.nll_sum(logits, batch.tgt_out)
        total += loss_sum
        ntokens += n
    model.train(was_training)
    return math.exp(total.item() / ntokens)


def greedy_bleu(model, pairs, src_vocab, tgt_vocab, args):
    """sacrebleu BLEU (with .signature) of greedy translations of the pairs' sources against their targets."""
    hyps = beam.translate(model, src_vocab, tgt_vocab, [src for src, _ in pairs], beam=1)
    return beam.bleu(hyps, [tgt for _, tgt in pairs], tokenize=args.bleu_tokenize)


def autocast(device):
    """bf16 autocast on CUDA (the loss is computed in float32 anyway); a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# -----------------------------------------------------------------------------
# Checkpoints


@dataclass
class Progress:
    """Where the run stands: everything besides weights and optimizer that --resume needs."""
    epoch: int = 1                 # the current epoch, counted from 1
    batch_in_epoch: int = 0        # batches of this epoch already trained on
    step: int = 0                  # optimizer steps so far
    lr: float = 1.0
    best_valid_ppl: float = math.inf
    best_valid_bleu: float = -1.0
    prev_valid_ppl: float = math.inf   # for --decay-on-plateau
    elapsed: float = 0.0           # seconds of this run, over all its resumptions


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


def make_checkpoint(model, arch, config, src_vocab, tgt_vocab, masks, optimizer, progress, args) -> dict:
    """The checkpoint dict of SPEC.md: only tensors and plain Python values (weights_only=True loads it)."""
    ckpt = {"format": "seqkd", "arch": arch, "config": config,
            "vocab": {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            **asdict(progress), "rng": rng_states(), "args": vars(args)}
    if masks:
        ckpt["masks"] = masks
    return ckpt


class StopOnCtrlC:
    """First Ctrl-C: finish the current step, save last.pt and stop. A second Ctrl-C stops at once."""

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
        print("\nCtrl-C: stopping after this step and saving last.pt (press again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# -----------------------------------------------------------------------------
# Training


def train(args) -> dict:
    """Run the training described by parsed, resolved `args`; return the final metrics."""
    save_dir = Path(args.save_dir)
    last_path, best_path, log_path = save_dir / "last.pt", save_dir / "best.pt", save_dir / "log.jsonl"
    if not args.resume and last_path.exists() and not args.overwrite:
        raise UserError(f"{save_dir} already holds a run: add --resume to continue it, or --overwrite to start again")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- the checkpoints we start from ----
    # --resume: everything; --init: weights, config, masks, vocabularies; --vocab-from, --teacher: vocabularies
    resume = load_checkpoint(last_path) if args.resume else None
    init = load_checkpoint(args.init) if args.init and not resume else None
    teacher_ckpt = load_checkpoint(args.teacher) if args.teacher else None
    if resume:
        vocab_ckpt, vocab_source = resume, str(last_path)
    elif init:
        vocab_ckpt, vocab_source = init, f"--init {args.init}"
    elif args.vocab_from:
        vocab_ckpt, vocab_source = load_checkpoint(args.vocab_from), f"--vocab-from {args.vocab_from}"
    elif teacher_ckpt:
        vocab_ckpt, vocab_source = teacher_ckpt, f"the teacher {args.teacher} (Word-KD needs the same words)"
    else:
        vocab_ckpt, vocab_source = None, None

    # ---- data ----
    splits = load_splits(args)
    src_vocab, tgt_vocab = get_vocabs(args, splits["train"], vocab_ckpt, vocab_source)
    if teacher_ckpt:
        check_teacher_vocabs(teacher_ckpt, args.teacher, src_vocab, tgt_vocab)
    train_pairs, _ = data.clean_pairs(splits["train"], max_len=args.max_len, src_vocab=src_vocab,
                                      tgt_vocab=tgt_vocab, name="train")
    valid_pairs, _ = data.clean_pairs(splits["valid"], name="valid")
    train_examples = data.encode_pairs(train_pairs, src_vocab, tgt_vocab)  # [(src_ids, tgt_ids), ...]
    valid_examples = data.encode_pairs(valid_pairs, src_vocab, tgt_vocab)

    # ---- model (and its pruning masks) ----
    start = resume or init
    if start:
        arch, config = start["arch"], start["config"]
        check_model_flags(args, config, str(last_path) if resume else f"--init {args.init}")
    else:
        arch = args.arch
        overrides = {field: getattr(args, field) for field in MODEL_FIELDS}
        config = asdict(make_config(arch, args.preset, src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab),
                                    **overrides))
    model = build_model(arch, config).to(device)
    masks = None  # {parameter name: bool tensor, True = kept}
    if start:
        model.load_state_dict(start["model"])
        if start.get("masks"):
            masks = {name: keep.to(device) for name, keep in start["masks"].items()}
            prune.apply_masks(model, masks)
    n_params = count_params(model)
    print(f"model: {arch} {config}\n       {n_params:,} parameters" +
          (f", {prune.count_nonzero(model):,} non-zero (pruned; the masks are kept)" if masks else ""))

    teacher = None
    if teacher_ckpt:
        teacher = model_from_checkpoint(teacher_ckpt, device=device)  # eval mode: no dropout
        teacher.requires_grad_(False)
        print(f"teacher: {args.teacher}, {count_params(teacher):,} parameters; "
              f"Word-KD with alpha {args.kd_alpha}, temperature {args.kd_temperature}")

    # ---- optimizer and progress ----
    Optimizer = torch.optim.SGD if args.optim == "sgd" else torch.optim.Adam
    optimizer = Optimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    progress = Progress(lr=args.lr)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        progress = Progress(**{field: resume[field] for field in asdict(progress)})
        set_rng_states(resume["rng"])
        print(f"resuming {last_path}: epoch {progress.epoch}, batch {progress.batch_in_epoch}, "
              f"step {progress.step}, lr {progress.lr:g}")
    else:
        save_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        best_path.unlink(missing_ok=True)

    def set_lr(lr, reason):
        progress.lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        print(f"learning rate -> {lr:g} ({reason})")

    set_lr(progress.lr, "resumed" if resume else f"--lr, {args.optim}")
    max_steps = args.max_steps or math.inf
    max_epochs = args.epochs or math.inf
    run_start, elapsed_before = time.time(), progress.elapsed

    def elapsed():
        return elapsed_before + time.time() - run_start

    # what happened since the last evaluation
    loss_sum, tokens, train_time = torch.zeros((), device=device), 0, 0.0
    last_eval_step, first_eval = None, True

    def validate(stopped=None) -> dict:
        """Validation perplexity and greedy BLEU; print and log them with the training figures."""
        nonlocal loss_sum, tokens, train_time, last_eval_step, first_eval
        progress.elapsed = elapsed()
        ppl = perplexity(model, valid_examples, args, device)
        bleu = greedy_bleu(model, valid_pairs, src_vocab, tgt_vocab, args)
        record = {"step": progress.step, "epoch": progress.epoch, "lr": progress.lr,
                  "train_loss": loss_sum.item() / tokens if tokens else None,
                  "valid_ppl": ppl, "valid_bleu": bleu.score,
                  "tokens_per_s": tokens / train_time if train_time else None, "elapsed": progress.elapsed}
        if stopped:
            record["stopped"] = stopped
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        train_loss = f"{record['train_loss']:.3f}" if tokens else "-"
        print(f"step {progress.step} | epoch {progress.epoch} | lr {progress.lr:g} | train loss {train_loss} | "
              f"valid ppl {ppl:.2f} | valid BLEU {bleu.score:.2f} | {record['tokens_per_s'] or 0:.0f} tgt tok/s" +
              (f" | stopped: {stopped}" if stopped else ""))
        if first_eval:
            print(f"BLEU signature: {bleu.signature}")
            first_eval = False
        loss_sum, tokens, train_time, last_eval_step = torch.zeros((), device=device), 0, 0.0, progress.step
        return record

    def schedule_lr(record, epoch_ended: bool) -> None:
        """Luong et al. (2015): halve the learning rate after each epoch past --decay-after, or
        when the validation perplexity rose since the previous scheduled evaluation."""
        ppl = record["valid_ppl"] if record else None
        if epoch_ended and args.decay_after is not None and progress.epoch > args.decay_after:
            set_lr(progress.lr * args.lr_decay, f"epoch {progress.epoch} > --decay-after {args.decay_after}")
        elif ppl is not None and args.decay_on_plateau and ppl > progress.prev_valid_ppl:
            set_lr(progress.lr * args.lr_decay, f"validation perplexity rose from {progress.prev_valid_ppl:.2f}")
        if ppl is not None:
            progress.prev_valid_ppl = ppl

    def save(path, with_optimizer=True):
        save_checkpoint(make_checkpoint(model, arch, config, src_vocab, tgt_vocab, masks,
                                        optimizer if with_optimizer else None, progress, args), path)

    def save_checkpoints(record) -> None:
        """last.pt always; best.pt (no optimizer state: it is for decoding and --init) when better."""
        ppl, bleu = record["valid_ppl"], record["valid_bleu"]
        better = ppl < progress.best_valid_ppl if args.best_metric == "ppl" else bleu > progress.best_valid_bleu
        progress.best_valid_ppl = min(progress.best_valid_ppl, ppl)
        progress.best_valid_bleu = max(progress.best_valid_bleu, bleu)
        if better:
            save(best_path, with_optimizer=False)
        save(last_path)

    def stop_reason():
        if ctrl_c.requested:
            return "Ctrl-C"
        if progress.step >= max_steps:
            return f"--max-steps {args.max_steps}"
        if args.time_limit is not None and elapsed() > 60 * args.time_limit:
            return f"--time-limit {args.time_limit:g} min"
        return None

    # ---- the loop ----
    model.train()
    stop = None
    with StopOnCtrlC() as ctrl_c:
        while progress.epoch <= max_epochs and not (stop := stop_reason()):
            order = make_batches(train_examples, args, shuffle=True, epoch=progress.epoch)  # same for a resumed run
            bar = tqdm(total=len(order), initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
                       unit="batch", mininterval=1.0, file=sys.stderr, disable=None, leave=False)
            for idxs in order[progress.batch_in_epoch:]:
                t0 = time.time()
                batch = data.collate(train_examples, idxs).to(device)
                with autocast(device):
                    loss = compute_loss(model, batch, teacher, args.kd_alpha, args.kd_temperature)
                loss.backward()
                if args.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if masks:
                    prune.apply_masks(model, masks)  # pruned weights back to exactly 0
                progress.step += 1
                progress.batch_in_epoch += 1
                loss_sum += loss.detach() * batch.ntokens
                tokens += batch.ntokens
                train_time += time.time() - t0
                bar.update()
                if not bar.disable and progress.step % 10 == 0:  # .item() waits for the GPU: not every step
                    bar.set_postfix(loss=f"{loss.item():.3f}", tgt_tok_s=f"{tokens / train_time:.0f}", refresh=False)

                if args.eval_every and progress.step % args.eval_every == 0:
                    record = validate()
                    schedule_lr(record, epoch_ended=False)
                    save_checkpoints(record)
                if stop := stop_reason():
                    break
            bar.close()

            if progress.batch_in_epoch == len(order) and stop != "Ctrl-C":  # the epoch is complete
                record = None if args.eval_every else validate()
                schedule_lr(record, epoch_ended=True)
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                if record:
                    save_checkpoints(record)

    if stop == "Ctrl-C":
        progress.elapsed = elapsed()
        save(last_path)
        print(f"stopped by Ctrl-C: saved {last_path} at epoch {progress.epoch}, batch {progress.batch_in_epoch}, "
              f"step {progress.step}; continue with --resume")
        return {"interrupted": True, "step": progress.step, "last_path": str(last_path)}
    time_limit = stop is not None and stop.startswith("--time-limit")
    if last_eval_step != progress.step or time_limit:  # evaluate where training ended (no lr change)
        save_checkpoints(validate(stopped=stop if time_limit else None))
    elif not best_path.exists():
        save(best_path, with_optimizer=False)
    print(f"done after {progress.step} steps ({stop or f'{args.epochs} epochs'}): best valid ppl "
          f"{progress.best_valid_ppl:.2f}, best valid BLEU {progress.best_valid_bleu:.2f}; "
          f"{best_path} is the best by {args.best_metric}")
    metrics = {"step": progress.step, "epoch": progress.epoch, "params": n_params,
               "best_valid_ppl": progress.best_valid_ppl, "best_valid_bleu": progress.best_valid_bleu,
               "last_valid_ppl": progress.prev_valid_ppl, "elapsed": progress.elapsed,
               "best_path": str(best_path), "last_path": str(last_path), "log_path": str(log_path)}

    # ---- the test set, scored with the best model ----
    if "test" in splits:
        best = model_from_checkpoint(load_checkpoint(best_path), device=device)
        test_pairs, _ = data.clean_pairs(splits["test"], name="test")
        ppl = perplexity(best, data.encode_pairs(test_pairs, src_vocab, tgt_vocab), args, device)
        bleu = greedy_bleu(best, test_pairs, src_vocab, tgt_vocab, args)
        print(f"test ({best_path}): ppl {ppl:.2f} | greedy BLEU {bleu.score:.2f} | {bleu.signature}")
        metrics.update(test_ppl=ppl, test_bleu=bleu.score)
    return metrics


def main(argv=None) -> dict:
    """Parse the flags (a list, or sys.argv) and train; a bad input exits with a one-line error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        resolve_defaults(args)
        if args.resume:  # the stopped run's flags become the defaults; flags given now override them
            last_path = Path(args.save_dir) / "last.pt"
            if not last_path.exists():
                raise UserError(f"--resume: there is no {last_path} to continue; check --save-dir")
            parser.set_defaults(**load_checkpoint(last_path)["args"])
            args = parser.parse_args(argv)
            resolve_defaults(args)
        return train(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped by Ctrl-C; nothing saved since the last checkpoint")


if __name__ == "__main__":
    if main().get("interrupted"):
        sys.exit(130)
