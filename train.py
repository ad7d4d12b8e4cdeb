"""Train a sequence-to-sequence translator: one training loop for every recipe.

    python train.py                                    # the built-in synthetic corpus, minutes on a CPU
    python train.py --train-src train.en --train-tgt train.de \\
                    --valid-src valid.en --valid-tgt valid.de --preset kim-rush-student
    python train.py ... --teacher teacher.pt --kd-alpha 0.5    # Word-KD (Kim & Rush 2016, section 3.1)
    python train.py ... --init student.pt --lr 0.1              # fine-tune (Seq-Inter, retrain a pruned model)
    python train.py --resume --save-dir runs/NAME               # continue a stopped run exactly
    python train.py ... --preset kim-rush-teacher               # the paper's size AND schedule (TRAIN_PRESETS)
    torchrun --nproc_per_node 4 train.py ...                    # 4 GPUs (or processes), DistributedDataParallel
    python train.py --arch t5                                   # the T5-like transformer (model.py 2b);
                                                                # on your corpus: Adafactor, as T5
    python train.py --arch t5 --preset t5-student-small --teacher t5.pt --kd relation \
                    --relation-terms miniend-d                  # MiniEnD-D: attention relations + logit KD
    python train.py ... --span-corruption --mono text.txt       # T5 span corruption on unlabelled text

One optimisation step, whatever the recipe:
    loss = NLL                                 (or α·L_WORD-KD + (1-α)·L_NLL with --teacher,
                                                or Σ w·L_term with --kd relation: MiniLM / MiniEnD)
           divided by the target tokens of the batch (or by its sentences: --normalize sents)
    loss.backward(); clip the gradient norm to --clip; optimizer.step()
    re-apply the pruning masks, if the model has any, so pruned weights stay exactly 0.
Training on distilled data (Seq-KD, Seq-Inter) is this same loop with other --train-tgt files;
task-agnostic distillation (MiniEnD) is this same loop on span-corruption examples
(--span-corruption), and fine-tuning after it is --init. Both orders of a staged recipe (Seq-KD
data first, then gold, or the reverse) are two commands: the second --init's the first's best.pt.

Vocabularies. A new one is built from the training text, unless a checkpoint provides it. --arch t5
shares one embedding between source and target, so its vocabulary is joint (one vocabulary of
--src-vocab-size entries for both sides), and it reserves --sentinels entries "<X0>", "<X1>", ...
(ids 4, 5, ...) for span corruption, so that translation models and span-corruption models can
share one vocabulary (a teacher and its students must). --span-corruption does the same for an LSTM.

Every evaluation (each epoch, or every --eval-every steps) computes the validation perplexity and
the BLEU of greedy decoding, appends a line to SAVE_DIR/log.jsonl and writes SAVE_DIR/last.pt;
SAVE_DIR/best.pt keeps the model with the best validation perplexity (--best-metric bleu to choose
by BLEU instead). --resume continues from last.pt to the same result an uninterrupted run gives:
the batches of an epoch depend only on (--seed, epoch), and the checkpoint holds the optimizer,
the learning-rate schedule, the random-number generators and the position inside the epoch.

Several GPUs: under `torchrun --nproc_per_node N` every process runs this same loop on 1/N of each
batch (--batch-size and --batch-tokens are the size of the whole batch, summed over the processes, so
the same flags give the same training on 1 or N GPUs); DistributedDataParallel adds up the gradients.
Process 0 evaluates, writes the checkpoints and the log, and prints; see "Several processes" below.

The file reads top to bottom: command line, data, model, loss, evaluation, checkpoints, several
processes, the loop.
"""
import argparse
import datetime
import json
import math
import os
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
from model import (PRESETS, T5_PRESETS, build_model, count_params, load_checkpoint, make_config,
                   model_from_checkpoint, pick_device, save_checkpoint)

# -----------------------------------------------------------------------------
# Command line

# model flags that override a field of the model's config (flag dest == config field name)
MODEL_FIELDS = {"lstm": ["layers", "hidden", "emb_dim", "attention", "bidirectional", "input_feed", "dropout"],
                "t5": ["layers", "dec_layers", "d_model", "heads", "d_kv", "d_ff", "ff", "dropout"]}
# the preset when --preset is not given: (architecture, on the built-in corpus?) -> preset
DEFAULT_PRESETS = {("lstm", True): "builtin", ("lstm", False): "kim-rush-student",
                   ("t5", True): "t5-builtin", ("t5", False): "t5-student"}
DEFAULT_EPOCHS = 10
DEFAULT_SENTINELS = 100   # as T5's <extra_id_0> .. <extra_id_99>

# The training schedule of a preset, applied by resolve_defaults to every flag not given on the
# command line (a flag given always wins). A preset brings its schedule when named with --preset;
# on the built-in corpus the default preset ('builtin' / 't5-builtin') brings its schedule too.
# Without --preset on your own corpus, the model is kim-rush-student sized and the flags keep the
# plain defaults of TRAIN_DEFAULTS.
#
# The paper presets follow Kim & Rush (2016), whose "training details mirror Luong et al. (2015)",
# with the values of their code (harvardnlp/seq2seq-attn, train.lua and preprocess.py defaults),
# which produced the reported numbers: plain SGD, lr 1.0, 13 epochs, the lr halved after every
# epoch from epoch 9 on (--decay-after 8) or when the validation perplexity rises, batches of 64
# sentences of at most 50 words, gradient norm clipped at 5, the loss summed over the tokens and
# divided by the sentences of the batch (--normalize sents), 50k-word vocabularies; dropout 0.3
# comes with the model preset (model.PRESETS). (Luong et al. 2015, section 4.1, report 12 epochs
# halving after epoch 8, batches of 128 and dropout 0.2 for their own dropout models.)
# seq2seq-attn's plateau rule is sticky (once the perplexity rose it halves every epoch); ours
# halves at each rise, which agrees with it whenever the rise comes after epoch 8.
LUONG_SCHEDULE = dict(optim="sgd", lr=1.0, epochs=13, decay_after=8, decay_on_plateau=True,
                      batch_size=64, max_len=50, clip=5.0, normalize="sents")
TRAIN_PRESETS = {
    "kim-rush-teacher": dict(LUONG_SCHEDULE, tokenizer="word", src_vocab_size=50000, tgt_vocab_size=50000),
    "kim-rush-student": dict(LUONG_SCHEDULE, tokenizer="word", src_vocab_size=50000, tgt_vocab_size=50000),
    "kim-rush-student-small": dict(LUONG_SCHEDULE, tokenizer="word", src_vocab_size=50000,
                                   tgt_vocab_size=50000),
    "iwslt-teacher": LUONG_SCHEDULE,    # the vocabulary: all words of a small corpus (up to 50k)
    "iwslt-student": LUONG_SCHEDULE,
    # The built-in corpus: a good model in minutes on a CPU (the ceiling of a model that picks the
    # most frequent translation is ~85 BLEU). lstm: valid BLEU ~80 after 3 epochs. t5: Adafactor at
    # 1e-2, valid greedy BLEU 78.3 after 2 epochs and 81.8 after 3, 25 s an epoch on one CPU
    # thread; Adam (no warm-up) was at 40.5 after 3 epochs at lr 5e-4 and 80.7 only after 6.
    "builtin": dict(optim="adam", lr=0.005, batch_size=32, epochs=3),
    "t5-builtin": dict(optim="adafactor", lr=1e-2, batch_size=32, epochs=3),
}
# --optim. Adafactor is T5's optimizer (Raffel et al. 2020; Shazeer & Stern 2018): no momentum, a
# factored second moment, and a step relative to the size of each weight matrix,
# RMS(W) * min(lr, 1/sqrt(step)). With T5's initialisation (embeddings of standard deviation 1,
# query weights of (d_model * d_kv)^-0.5, 0.008 at width 256 with heads of 64) that matters: Adam
# moves every weight by about lr per step, whatever its scale, so the embeddings hardly move while
# the queries change fast.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adafactor": torch.optim.Adafactor}
DEFAULT_LR = {"sgd": 1.0, "adam": 1e-3, "adafactor": 1e-2}   # Luong et al.; Adam's own; T5's
# The defaults of the flags a training preset may set, for every flag neither given nor preset.
# --optim itself defaults by architecture: SGD for the LSTM (Luong et al.), Adafactor for T5.
TRAIN_DEFAULTS = dict(batch_size=64, max_len=50, clip=5.0, normalize="tokens",
                      tokenizer="word", decay_on_plateau=False)
DEFAULT_OPTIM = {"lstm": "sgd", "t5": "adafactor"}


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
    g.add_argument("--tokenizer", choices=["word", "spm"],
                   help="word: whitespace tokens, the N most frequent kept, the rest <unk>; "
                        "spm: a sentencepiece model trained on the training text (default: word)")
    g.add_argument("--src-vocab-size", type=int, metavar="N",
                   help="source vocabulary size incl. the 4 specials (default: 50000 for word, 8000 for spm)")
    g.add_argument("--tgt-vocab-size", type=int, metavar="N", help="target vocabulary size (same defaults)")
    g.add_argument("--joint-vocab", action="store_true",
                   help="one vocabulary shared by source and target, of --src-vocab-size entries "
                        "(always so with --arch t5 and --span-corruption)")
    g.add_argument("--sentinels", type=int, metavar="N",
                   help="reserve N vocabulary entries <X0> .. <X{N-1}> for span corruption, counted in "
                        f"--src-vocab-size (default: {DEFAULT_SENTINELS} with --arch t5 or --span-corruption, "
                        "else 0)")
    g.add_argument("--vocab-from", metavar="CKPT",
                   help="reuse the vocabularies of a checkpoint instead of building new ones "
                        "(automatic with --teacher, --init and --resume)")
    g.add_argument("--max-len", type=int, metavar="N",
                   help="drop training pairs with a side longer than N tokens (default: 50, as Luong et al.)")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="sentences per batch, over all processes under torchrun (default: 64; 32 on the "
                        "built-in corpus)")
    g.add_argument("--batch-tokens", type=int, metavar="N",
                   help="instead of --batch-size: at most N padded source+target tokens per batch (over all "
                        "processes under torchrun)")
    g.add_argument("--span-corruption", action="store_true",
                   help="train on T5 span-corruption examples (Raffel et al. 2020) of monolingual text "
                        "instead of translation pairs: --mono FILE, else the source side of the training "
                        "data; validation on the source side of the validation data. Target files are "
                        "not needed. For task-agnostic distillation (MiniEnD) before fine-tuning with --init; a model "
                        "to be fine-tuned on translation needs a vocabulary of both languages: give --mono "
                        "text of both, or --vocab-from a translation model")
    g.add_argument("--mono", metavar="FILE", help="with --span-corruption: the unlabelled text, one sentence per line")
    g.add_argument("--noise-density", type=float, default=0.15, metavar="F",
                   help="span corruption: the fraction of tokens dropped (default: %(default)s, as T5)")
    g.add_argument("--mean-span-length", type=float, default=3.0, metavar="F",
                   help="span corruption: the mean length of a dropped span (default: %(default)s, as T5)")

    g = p.add_argument_group("model (a preset, then single fields overridden by flags)")
    g.add_argument("--arch", choices=["lstm", "t5"],
                   help="model family: the LSTM of Luong et al. (2015) or the T5-like transformer "
                        "(default: lstm, or the architecture of --init)")
    g.add_argument("--preset", metavar="NAME",
                   help=f"model size; lstm: {', '.join(PRESETS)}; t5: {', '.join(T5_PRESETS)} (default: "
                        "'builtin' / 't5-builtin' on the built-in corpus, else 'kim-rush-student' / 't5-student'). "
                        f"A preset with a training schedule ({', '.join(TRAIN_PRESETS)}) also sets the "
                        "optimisation flags you do not give: the paper presets train as Kim & Rush (2016): "
                        "SGD lr 1.0, 13 epochs halving after epoch 8 or on a perplexity rise, batch 64, max "
                        "length 50, clip 5, --normalize sents, 50k words")
    g.add_argument("--layers", type=int, metavar="N", help="layers in the encoder and in the decoder (lstm, t5)")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout probability (lstm, t5)")
    g.add_argument("--hidden", type=int, metavar="N", help="lstm: hidden size")
    g.add_argument("--emb-dim", type=int, metavar="N", help="lstm: word embedding size")
    g.add_argument("--attention", choices=["dot", "general", "concat"],
                   help="lstm: the attention score of Luong et al. (2015)")
    g.add_argument("--bidirectional", action="store_true", default=None, help="lstm: bidirectional encoder")
    g.add_argument("--no-input-feed", dest="input_feed", action="store_false", default=None,
                   help="lstm: do not feed the previous attentional state h~ into the decoder input")
    g.add_argument("--d-model", type=int, metavar="N", help="t5: the width of the residual stream")
    g.add_argument("--heads", type=int, metavar="N", help="t5: attention heads")
    g.add_argument("--d-kv", type=int, metavar="N", help="t5: the width of one attention head")
    g.add_argument("--d-ff", type=int, metavar="N", help="t5: the inner width of the feed-forward blocks")
    g.add_argument("--ff", choices=["relu", "gated-gelu"], help="t5: feed-forward of T5 v1.0 (relu) or v1.1")
    g.add_argument("--dec-layers", type=int, metavar="N", help="t5: decoder layers (default: --layers)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optim", choices=sorted(OPTIMIZERS),
                   help="plain SGD as Luong et al. and Kim & Rush, Adam, or Adafactor as T5 (Shazeer & Stern "
                        "2018: steps relative to each weight's size, --lr is the largest relative step) "
                        "(default: sgd for lstm, adafactor for t5; adam for the lstm on the built-in corpus)")
    g.add_argument("--lr", type=float,
                   help="learning rate (default: 1.0 for sgd, 0.001 for adam, 0.01 for adafactor as T5)")
    g.add_argument("--decay-after", type=int, metavar="N",
                   help="halve the learning rate at the end of every epoch after epoch N (Luong et al.; "
                        "with any --optim)")
    g.add_argument("--decay-on-plateau", action=argparse.BooleanOptionalAction,
                   help="halve the learning rate when the validation perplexity rises from one evaluation to the "
                        "next (default: off; on with the paper presets)")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="raise the learning rate linearly from lr/STEPS to lr over the first STEPS steps, as "
                        "transformers are trained (Vaswani et al. 2017) (default: %(default)s, none)")
    g.add_argument("--lr-decay", type=float, default=0.5, metavar="F",
                   help="factor of each decay (default: %(default)s, i.e. halve)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W",
                   help="L2 weight decay (default: %(default)s)")
    g.add_argument("--normalize", choices=["tokens", "sents"],
                   help="divide each batch's summed loss by its target tokens, or by its sentences as "
                        "Luong et al. and Kim & Rush's code (steps ~ mean target length times larger: "
                        "their SGD lr 1.0 assumes it) (default: tokens; sents with the paper presets)")
    g.add_argument("--clip", type=float, metavar="NORM",
                   help="rescale the gradient when its global norm exceeds NORM; 0 = off (default: 5)")
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

    g = p.add_argument_group("distillation (Word-KD, Kim & Rush 2016 section 3.1; attention relations, "
                             "MiniLM / MiniEnD)")
    g.add_argument("--teacher", metavar="CKPT",
                   help="the teacher; it must share the student's vocabularies, which are taken "
                        "from it unless --vocab-from/--init say otherwise")
    g.add_argument("--kd", choices=["word", "relation"],
                   help="word: Word-KD, any teacher architecture; relation: the attention-relation losses "
                        "of MiniLM / MiniEnD (kd_losses.py section 4), T5 student and teacher "
                        "(default with --teacher: word)")
    g.add_argument("--kd-alpha", type=float, metavar="A",
                   help="--kd word: L = A * L_WORD-KD + (1 - A) * L_NLL (default: 0.5, as the paper)")
    g.add_argument("--kd-temperature", type=float, default=1.0, metavar="T",
                   help="soften both distributions by T and scale the KD term by T^2; also the 'logit' "
                        "relation term (default: %(default)s)")
    g.add_argument("--relation-terms", metavar="SPEC",
                   help="--kd relation: comma-separated recipes (minilm, miniend-d, miniend-e) and terms "
                        "(enc-qq, dec-kk, cross-qk, ..., logit, nll), each optionally =WEIGHT, e.g. "
                        "'minilm,nll' or 'miniend-e,nll=0.5,logit=0.5' (default: miniend-d)")
    g.add_argument("--relation-heads", type=int, metavar="R",
                   help="--kd relation: relation heads; R must divide heads x d_kv of both models "
                        "(default: the student's number of heads)")
    g.add_argument("--relation-student-layer", type=int, default=-1, metavar="I",
                   help="--kd relation: the student layer (of each stack) to match (default: -1, the last)")
    g.add_argument("--relation-teacher-layer", type=int, default=-1, metavar="I",
                   help="--kd relation: the teacher layer it learns from (default: -1, the last)")
    return p


def resolve_defaults(args) -> None:
    """Fill in the defaults that depend on other flags, and check flag combinations."""
    data_flags = [args.train_src, args.train_tgt, args.valid_src, args.valid_tgt]
    args.builtin = not any(data_flags + [args.test_src, args.test_tgt])
    if args.span_corruption:  # monolingual: a training text (--mono or --train-src) and --valid-src
        if not args.builtin and not (args.valid_src and (args.mono or args.train_src)):
            raise UserError("--span-corruption reads monolingual text: give --valid-src and --mono or "
                            "--train-src (or no data file, to use the built-in corpus's source side)")
        if args.test_src:
            raise UserError("--test-src/--test-tgt: there is no test set with --span-corruption; drop them")
    elif not args.builtin and not all(data_flags):
        raise UserError("give all four of --train-src --train-tgt --valid-src --valid-tgt "
                        "(or none of them, to use the built-in corpus)")
    if args.mono and not args.span_corruption:
        raise UserError("--mono is the text of --span-corruption: add --span-corruption, or drop --mono")
    if bool(args.test_src) != bool(args.test_tgt):
        raise UserError("--test-src and --test-tgt go together: give both or neither")
    if args.name is None:
        args.name = "builtin" if args.builtin else Path(args.train_src or args.mono).stem
    if args.save_dir is None:
        args.save_dir = str(Path("runs") / args.name)
    if args.arch is None and not args.init:   # with --init the architecture is the checkpoint's
        args.arch = "lstm"
    schedule = TRAIN_PRESETS.get(args.preset, {})   # --preset NAME: its training schedule
    if args.preset is None and args.arch:
        args.preset = DEFAULT_PRESETS[args.arch, args.builtin]
        schedule = TRAIN_PRESETS.get(args.preset, {}) if args.builtin else {}
    if args.optim is not None and args.optim != schedule.get("optim", args.optim):
        schedule = {flag: value for flag, value in schedule.items() if flag != "lr"}  # its lr is for its optimizer
    arch = args.arch or load_checkpoint(args.init)["arch"]       # with --init: the checkpoint's
    for flag, value in {**TRAIN_DEFAULTS, "optim": DEFAULT_OPTIM[arch], **schedule}.items():
        # flags given > the schedule > defaults
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.sentinels is None:
        args.sentinels = DEFAULT_SENTINELS if args.arch == "t5" or args.span_corruption else 0
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optim]
    if args.epochs is None and args.max_steps is None:
        args.epochs = DEFAULT_EPOCHS
    default_size = 50000 if args.tokenizer == "word" else 8000
    args.src_vocab_size = args.src_vocab_size or default_size
    args.tgt_vocab_size = args.tgt_vocab_size or default_size
    if args.batch_tokens is not None:
        args.batch_size = None
    for flag, value in [("--batch-size", args.batch_size), ("--batch-tokens", args.batch_tokens),
                        ("--max-len", args.max_len), ("--epochs", args.epochs), ("--max-steps", args.max_steps),
                        ("--eval-every", args.eval_every), ("--threads", args.threads),
                        ("--relation-heads", args.relation_heads), ("--mean-span-length", args.mean_span_length)]:
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be a positive number, got {value}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 (none) or a number of steps, got {args.warmup}")
    if args.sentinels < 0:
        raise UserError(f"--sentinels must be 0 or more, got {args.sentinels}")
    if not 0.0 < args.noise_density < 1.0:
        raise UserError(f"--noise-density must be between 0 and 1, got {args.noise_density}")

    # distillation: --kd word (Word-KD) or relation (MiniLM / MiniEnD), only with a teacher
    if args.kd is None and args.teacher:
        args.kd = "word"
    if args.kd and not args.teacher:
        raise UserError(f"--kd {args.kd} distils from a teacher: give --teacher CKPT")
    if args.kd == "word" and args.kd_alpha is None:
        args.kd_alpha = 0.5
    if args.kd == "relation":
        if args.kd_alpha is not None:
            raise UserError("--kd-alpha is for --kd word; with --kd relation weigh the terms in --relation-terms "
                            "(e.g. 'miniend-e,nll=0.5,logit=0.5')")
        args.relation_terms = args.relation_terms or "miniend-d"
        kd_losses.parse_relation_terms(args.relation_terms)  # a bad spec fails now, before any data is read
    elif args.relation_terms or args.relation_heads:
        raise UserError("--relation-terms/--relation-heads go with --kd relation (and --teacher)")
    if args.kd_alpha is not None and not 0.0 <= args.kd_alpha <= 1.0:
        raise UserError(f"--kd-alpha must be in [0, 1], got {args.kd_alpha}")
    if args.kd_temperature <= 0:
        raise UserError(f"--kd-temperature must be positive, got {args.kd_temperature}")


# -----------------------------------------------------------------------------
# Data


def load_splits(args) -> dict[str, list[tuple[str, str]]]:
    """Raw sentence pairs: {"train", "valid"[, "test"]} from the files given, else the built-in corpus.

    With --span-corruption the text is monolingual: {"train": --mono (else the training source
    side), "valid": the validation source side}, each sentence as a pair (sentence, sentence) so
    that clean_pairs treats it like a corpus; only the first of the two is read afterwards."""
    if args.span_corruption:
        builtin = data.builtin_splits() if args.builtin else None
        if args.mono:
            train = data.read_lines(args.mono)
        else:
            train = [s for s, _ in builtin["train"]] if builtin else data.read_lines(args.train_src)
        valid = [s for s, _ in builtin["valid"]] if builtin else data.read_lines(args.valid_src)
        return {"train": [(s, s) for s in train], "valid": [(s, s) for s in valid]}
    if args.builtin:
        return data.builtin_splits()
    splits = {"train": data.read_parallel(args.train_src, args.train_tgt),
              "valid": data.read_parallel(args.valid_src, args.valid_tgt)}
    if args.test_src:
        splits["test"] = data.read_parallel(args.test_src, args.test_tgt)
    return splits


def get_vocabs(args, train_pairs, vocab_ckpt, vocab_source):
    """The vocabularies: those of `vocab_ckpt` (resume, init, --vocab-from, teacher) or new ones.

    A new vocabulary is joint (one object for both sides) with --joint-vocab, --arch t5 (one
    embedding for both sides) and --span-corruption (one language); a joint one holds --sentinels
    entries <X0>, <X1>, ... right after the specials."""
    if vocab_ckpt is not None:
        src_vocab, tgt_vocab = data.vocabs_from_checkpoint(vocab_ckpt)
        print(f"vocabularies from {vocab_source}: {len(src_vocab)} source, {len(tgt_vocab)} target ({src_vocab.kind}"
              f"{', joint' if src_vocab is tgt_vocab else ''}, {len(data.sentinel_ids(src_vocab))} sentinels)")
        return src_vocab, tgt_vocab
    why_joint = ("--span-corruption: one language" if args.span_corruption else
                 "--arch t5 shares one embedding between source and target" if args.arch == "t5" else
                 "--joint-vocab" if args.joint_vocab else None)
    src_lines = [s for s, _ in train_pairs]
    tgt_lines = [] if args.span_corruption else [t for _, t in train_pairs]   # monolingual: one side
    if why_joint is None:
        if args.sentinels:
            raise UserError("--sentinels: span-corruption sentinels need a joint vocabulary: add --joint-vocab")
        src_vocab, tgt_vocab = data.build_vocabs(src_lines, tgt_lines, kind=args.tokenizer,
                                                 src_size=args.src_vocab_size, tgt_size=args.tgt_vocab_size)
        print(f"vocabularies built from the training data: {len(src_vocab)} source, {len(tgt_vocab)} target")
        return src_vocab, tgt_vocab
    if args.sentinels:
        vocab = data.build_vocab_with_sentinels(src_lines + tgt_lines, args.tokenizer, args.src_vocab_size,
                                                args.sentinels)
    else:
        vocab, _ = data.build_vocabs(src_lines + tgt_lines, [], kind=args.tokenizer,
                                     src_size=args.src_vocab_size, joint=True)
    print(f"vocabulary built from the training data: {len(vocab)} entries, joint ({why_joint}), "
          f"{args.sentinels} of them sentinels <X0>, <X1>, ... for span corruption")
    return vocab, vocab


def span_corruption_sentinels(src_vocab, tgt_vocab, vocab_source) -> list[int]:
    """--span-corruption reads and writes one language: the vocabulary must be joint and hold the
    sentinels. Returns their ids."""
    source = vocab_source or "the training data"
    if src_vocab is not tgt_vocab:
        raise UserError(f"--span-corruption needs one joint vocabulary, but {source} has separate source and "
                        "target vocabularies; build a new one (no --vocab-from) or use a --arch t5 checkpoint")
    sentinels = data.sentinel_ids(src_vocab)
    if not sentinels:
        raise UserError(f"--span-corruption: the vocabulary of {source} has no sentinels <X0>, <X1>, ...; "
                        "use a checkpoint trained with --arch t5 or --span-corruption, or --sentinels N")
    return sentinels


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


def flag_name(field: str) -> str:
    return "--no-input-feed" if field == "input_feed" else "--" + field.replace("_", "-")


def check_model_flags(args, arch: str, config: dict | None, source: str | None) -> None:
    """Model flags must fit the architecture; with --init/--resume the config comes from the
    checkpoint (`source`), so a flag that disagrees with it is an error too."""
    for field in sorted(set(MODEL_FIELDS["lstm"] + MODEL_FIELDS["t5"]) - set(MODEL_FIELDS[arch])):
        if getattr(args, field) is not None:
            other = "t5" if arch == "lstm" else "lstm"
            raise UserError(f"{flag_name(field)} is a flag of --arch {other}, but the model is {arch}"
                            f"{f' ({source})' if source else ''}; drop it")
    if config is None:
        return
    for field in MODEL_FIELDS[arch]:
        value = getattr(args, field)
        if value is not None and value != config.get(field):
            raise UserError(f"{flag_name(field)} ({value}) does not match {source}, whose {field} is "
                            f"{config.get(field)}; drop the flag")


def make_model_config(args, src_vocab, tgt_vocab) -> dict:
    """The config of a new model: --preset, then the model flags. A T5 shares its embedding
    between source and target when the vocabulary is joint, else each side gets its own."""
    overrides = {field: getattr(args, field) for field in MODEL_FIELDS[args.arch]}
    if args.arch == "t5":
        overrides["share_embeddings"] = src_vocab is tgt_vocab
        if src_vocab is not tgt_vocab:
            print("t5: the vocabularies are separate, so the encoder gets its own embedding (share_embeddings=False)")
    return asdict(make_config(args.arch, args.preset, src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab),
                              **overrides))


# -----------------------------------------------------------------------------
# Loss


@dataclass
class Distillation:
    """What the student learns from its teacher (--teacher): the loss compute_loss adds."""
    teacher: torch.nn.Module             # in eval mode, no gradient
    kind: str = "word"                   # word: Word-KD; relation: MiniLM / MiniEnD relations
    alpha: float = 0.5                   # word: L = α L_WORD-KD + (1 - α) L_NLL
    temperature: float = 1.0             # word, and the "logit" relation term
    terms: dict | None = None            # relation: {term: weight}, kd_losses.parse_relation_terms
    relation_heads: int = 1              # relation: R, divides heads x d_kv of both models
    student_layer: int = -1              # relation: which layer of each stack, -1 = the last
    teacher_layer: int = -1


def make_distillation(args, model, teacher) -> Distillation | None:
    """The Distillation of the flags (None without --teacher), checked once before training."""
    if teacher is None:
        return None
    if args.kd == "word":  # any two architectures: only the output distributions are compared
        print(f"teacher: {args.teacher} ({teacher.arch}), {count_params(teacher):,} parameters; "
              f"Word-KD with alpha {args.kd_alpha}, temperature {args.kd_temperature}")
        return Distillation(teacher, "word", alpha=args.kd_alpha, temperature=args.kd_temperature)
    for who, m in [("the student", model), (f"the teacher {args.teacher}", teacher)]:
        if m.arch != "t5":
            raise UserError(f"--kd relation compares attention queries, keys and values: {who} is an "
                            f"{m.arch} model, and both must be --arch t5 (use --kd word for this teacher)")
    terms = kd_losses.parse_relation_terms(args.relation_terms)
    heads = args.relation_heads or model.cfg.heads
    kd_losses.check_relation_setup(terms, heads, model.cfg, teacher.cfg, args.relation_student_layer,
                                   args.relation_teacher_layer)
    print(f"teacher: {args.teacher} ({teacher.arch}), {count_params(teacher):,} parameters; relation KD "
          f"{' + '.join(f'{w:g} {name}' for name, w in terms.items())}, {heads} relation heads, "
          f"student layer {args.relation_student_layer} <- teacher layer {args.relation_teacher_layer}")
    return Distillation(teacher, "relation", temperature=args.kd_temperature, terms=terms, relation_heads=heads,
                        student_layer=args.relation_student_layer, teacher_layer=args.relation_teacher_layer)


def compute_loss(model, batch, kd: Distillation | None = None, normalize="tokens"):
    """The training loss of a batch, and its parts for the log.

        no teacher:       L = L_NLL = -Σ_t log p(y_t | y_<t, x), over the real target tokens
        --kd word:        L = α L_WORD-KD + (1 - α) L_NLL       (Kim & Rush 2016, section 3.1)
        --kd relation:    L = Σ_term w_term L_term              (MiniLM / MiniEnD, kd_losses.py section 4)

    Teacher forcing on the batch's target prefix, the teacher in eval mode with no gradient.
    normalize="tokens": L per real target token (batch.ntokens). "sents": per sentence instead, the
    sum over the batch's tokens divided by its B sentences (Luong et al. 2015 and Kim & Rush's
    code), = the per-token loss x ntokens / B; the relation terms, averages over attention rows,
    are scaled by the same factor.
    Returns (loss: 0-dim tensor to backpropagate, parts: {"loss": the per-token loss, whatever
    `normalize` is; for a composite loss also each term per token: "nll" and "word_kd", or the
    relation terms}), the parts detached.
    """
    if kd is not None and kd.kind == "relation":
        logits, _, qkv = model(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)  # (B, T, V)
        with torch.no_grad():
            teacher_logits, _, teacher_qkv = kd.teacher(batch.src, batch.src_mask, batch.tgt_in, return_qkv=True)
        loss, parts = kd_losses.relation_kd_loss(
            qkv, teacher_qkv, kd.terms, kd.relation_heads, kd.student_layer, kd.teacher_layer,
            student_logits=logits, teacher_logits=teacher_logits, target=batch.tgt_out, T=kd.temperature)
    else:
        logits, _ = model(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
        nll_sum, ntokens = kd_losses.nll_sum(logits, batch.tgt_out)
        if kd is None:
            loss, parts = nll_sum / ntokens, {}
        else:
            with torch.no_grad():
                teacher_logits, _ = kd.teacher(batch.src, batch.src_mask, batch.tgt_in)  # (B, T, V)
            kd_sum, _ = kd_losses.word_kd_sum(logits, teacher_logits, batch.tgt_out, T=kd.temperature)
            loss = (kd.alpha * kd_sum + (1 - kd.alpha) * nll_sum) / ntokens  # Kim & Rush, section 3.1
            parts = {"word_kd": kd_sum.detach() / ntokens, "nll": nll_sum.detach() / ntokens}
    parts["loss"] = loss.detach()
    if normalize == "sents":
        loss = loss * batch.ntokens / batch.src.size(0)    # Σ over tokens / B
    return loss, parts


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
# Several processes: torchrun and DistributedDataParallel
#
# `torchrun --nproc_per_node N train.py ...` starts N copies of this script (one per GPU; on a CPU,
# N processes), with WORLD_SIZE=N, RANK and LOCAL_RANK in the environment. Every process reads the
# whole corpus, builds the same batch list (a function of --seed and the epoch), and at each step
# takes its share of the same batch: sentences r, r+N, r+2N, ... of it for process r. The whole batch
# is what --batch-size / --batch-tokens ask for, so a run on N GPUs takes the same steps as a run on
# one (a batch of fewer than N sentences is skipped). DistributedDataParallel averages the N
# gradients during backward(); each share's loss is weighted by its part of the batch (tokens or
# sentences, as --normalize), so the average is exactly the gradient of the whole batch's loss.
# Every process then clips and steps identically. Process 0 alone evaluates, prints, shows the
# progress bar and writes the log and the checkpoints; the others wait for its figures (the
# learning-rate schedule needs them). --resume: every process loads last.pt. The dropout masks of
# processes 1..N-1 come from their own random streams, reseeded at the start of a run, so a resumed
# run under torchrun repeats the uninterrupted one except for those masks.


def setup_processes(args) -> tuple[int, int, torch.device]:
    """(rank, number of processes, device). Under torchrun (WORLD_SIZE > 1) this joins the process
    group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA, gloo on CPU; processes other
    than 0 print nothing (stdout to /dev/null; errors still reach stderr). Else (0, 1, --device)."""
    device = pick_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # a long timeout: the other processes wait while process 0 evaluates and saves
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=2))
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


def sum_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of a tensor over all processes (unchanged with one process)."""
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def leave_together(world: int) -> None:
    """Wait until every process is done (process 0 saves and scores the test set last): a process
    that exits early closes its gloo connections under the others, which then abort."""
    if world > 1:
        torch.distributed.barrier()


def share_of_batch(examples, mine, whole, normalize: str) -> float:
    """This process's part `mine` of the `whole` batch (example indices), counted in what --normalize
    divides the summed loss by: target tokens (with EOS) or sentences."""
    def size(idxs):
        return sum(len(examples[i][1]) + 1 for i in idxs) if normalize == "tokens" else len(idxs)
    return size(mine) / size(whole)


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
    rank, world, device = setup_processes(args)   # one process, or one of torchrun's N
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
        vocab_ckpt, vocab_source = teacher_ckpt, f"the teacher {args.teacher} (distillation needs the same words)"
    else:
        vocab_ckpt, vocab_source = None, None
    start = resume or init                    # the model's weights and config, else a new model
    start_source = str(last_path) if resume else f"--init {args.init}"
    if start:
        if args.arch and args.arch != start["arch"]:
            raise UserError(f"--arch {args.arch}, but {start_source} is a {start['arch']} model: drop --arch "
                            f"(fine-tuning keeps the checkpoint's architecture), or drop --init to train a new model")
        args.arch = start["arch"]
    arch = args.arch
    check_model_flags(args, arch, start["config"] if start else None, start_source if start else None)

    # ---- data ----
    splits = load_splits(args)
    src_vocab, tgt_vocab = None, None
    if rank == 0:
        src_vocab, tgt_vocab = get_vocabs(args, splits["train"], vocab_ckpt, vocab_source)
    if world > 1:  # every process takes process 0's vocabularies (threaded sentencepiece need not repeat itself)
        vocabs = {"src": src_vocab.to_dict(), "tgt": tgt_vocab.to_dict()} if rank == 0 else None
        src_vocab, tgt_vocab = data.vocabs_from_checkpoint({"vocab": from_process_0(vocabs, world)})
    if teacher_ckpt:
        check_teacher_vocabs(teacher_ckpt, args.teacher, src_vocab, tgt_vocab)
    train_pairs, _ = data.clean_pairs(splits["train"], max_len=args.max_len, src_vocab=src_vocab,
                                      tgt_vocab=tgt_vocab, name="train")
    valid_pairs, _ = data.clean_pairs(splits["valid"], name="valid")
    if args.span_corruption:
        # T5 span corruption of monolingual sentences: the training examples are made afresh at the
        # start of every epoch (in the loop below), the validation examples once
        sentinels = span_corruption_sentinels(src_vocab, tgt_vocab, vocab_source)
        train_sentences = src_vocab.encode_batch([s for s, _ in train_pairs])   # [ids, ...]
        train_examples = None
        valid_examples = data.span_corruption_examples(src_vocab.encode_batch([s for s, _ in valid_pairs]),
                                                       sentinels, args.seed, 0, args.noise_density,
                                                       args.mean_span_length)
        valid_pairs = [(src_vocab.decode(x), tgt_vocab.decode(y)) for x, y in valid_examples]  # for greedy BLEU
        print(f"span corruption: {len(train_sentences):,} training and {len(valid_examples):,} validation "
              f"sentences, noise density {args.noise_density}, mean span length {args.mean_span_length}; "
              f"e.g. {valid_pairs[0][0]!r} -> {valid_pairs[0][1]!r}")
    else:
        train_examples = data.encode_pairs(train_pairs, src_vocab, tgt_vocab)  # [(src_ids, tgt_ids), ...]
        valid_examples = data.encode_pairs(valid_pairs, src_vocab, tgt_vocab)

    # ---- model (and its pruning masks) ----
    config = start["config"] if start else make_model_config(args, src_vocab, tgt_vocab)
    model = model_from_checkpoint(start, device=device) if start else build_model(arch, config).to(device)
    masks = None  # {parameter name: bool tensor, True = kept}
    if start and start.get("masks"):
        masks = {name: keep.to(device) for name, keep in start["masks"].items()}
        prune.apply_masks(model, masks)
    n_params = count_params(model)
    print(f"model: {arch} {config}\n       {n_params:,} parameters" +
          (f", {prune.count_nonzero(model):,} non-zero (pruned; the masks are kept)" if masks else ""))

    teacher = None
    if teacher_ckpt:
        teacher = model_from_checkpoint(teacher_ckpt, device=device)  # eval mode: no dropout
        teacher.requires_grad_(False)
    kd = make_distillation(args, model, teacher)
    # the model that trains: under torchrun wrapped so that backward() averages the gradients of all
    # processes; `model` itself (the same parameters) is what is evaluated and saved
    train_model = model
    if world > 1:
        device_ids = [device] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ---- optimizer and progress ----
    optimizer = OPTIMIZERS[args.optim](model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    progress = Progress(lr=args.lr)
    if resume:
        if resume["args"]["optim"] != args.optim:
            raise UserError(f"--optim {args.optim}: the run in {last_path} uses {resume['args']['optim']}; "
                            f"drop --optim to continue it")
        optimizer.load_state_dict(resume["optimizer"])
        progress = Progress(**{field: resume[field] for field in asdict(progress)})
        set_rng_states(resume["rng"])
        print(f"resuming {last_path}: epoch {progress.epoch}, batch {progress.batch_in_epoch}, "
              f"step {progress.step}, lr {progress.lr:g}")
    elif rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        best_path.unlink(missing_ok=True)
    if rank > 0:  # dropout: each process its own random stream
        torch.manual_seed(args.seed + 1000 * rank + progress.step)

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

    # what happened since the last evaluation: {part: Σ per-token value x ntokens}, target tokens, seconds
    part_sums, tokens, train_time = {}, 0, 0.0
    last_eval_step, last_record = None, None

    def evaluate(stopped) -> dict:
        """Validation perplexity and greedy BLEU; print and log them with the training figures."""
        ppl = perplexity(model, valid_examples, args, device)
        bleu = greedy_bleu(model, valid_pairs, src_vocab, tgt_vocab, args)
        means = {name: value.item() / tokens for name, value in part_sums.items()}  # per target token
        record = {"step": progress.step, "epoch": progress.epoch, "lr": progress.lr,
                  "train_loss": means.pop("loss", None), "valid_ppl": ppl, "valid_bleu": bleu.score,
                  "tokens_per_s": tokens / train_time if train_time else None, "elapsed": progress.elapsed}
        if means:  # the terms of a distillation loss, e.g. {"nll": .., "word_kd": ..}
            record["train_parts"] = means
        if stopped:
            record["stopped"] = stopped
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        train_loss = f"{record['train_loss']:.3f}" if tokens else "-"
        print(f"step {progress.step} | epoch {progress.epoch} | lr {progress.lr:g} | train loss {train_loss} | "
              f"valid ppl {ppl:.2f} | valid BLEU {bleu.score:.2f} | {record['tokens_per_s'] or 0:.0f} tgt tok/s" +
              (f" | stopped: {stopped}" if stopped else ""))
        if last_record is None:
            print(f"BLEU signature: {bleu.signature}")
        return record

    def validate(stopped=None) -> dict:
        """evaluate() (under torchrun: process 0 evaluates, the others receive its record), then
        count the training figures afresh."""
        nonlocal part_sums, tokens, train_time, last_eval_step, last_record
        progress.elapsed = elapsed()
        if world > 1:  # the training figures of all processes together
            part_sums = {name: sum_over_processes(value, world) for name, value in part_sums.items()}
            tokens = int(sum_over_processes(torch.tensor(tokens, device=device), world))
        record = from_process_0(evaluate(stopped) if rank == 0 else None, world)
        part_sums, tokens, train_time, last_eval_step = {}, 0, 0.0, progress.step
        last_record = record
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
        if rank == 0:  # one writer
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
    with StopOnCtrlC() as ctrl_c:
        stop = from_process_0(stop_reason(), world)  # why training ends early; a resumed run may have nothing to do
        while progress.epoch <= max_epochs and stop is None:
            if args.span_corruption:  # fresh noise every epoch, as T5; a function of (--seed, epoch)
                train_examples = data.span_corruption_examples(train_sentences, sentinels, args.seed, progress.epoch,
                                                               args.noise_density, args.mean_span_length)
            order = make_batches(train_examples, args, shuffle=True, epoch=progress.epoch)  # same for a resumed run
            if world > 1:  # every process needs a sentence of each batch
                order = [idxs for idxs in order if len(idxs) >= world]
            bar = tqdm(total=len(order), initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
                       unit="batch", file=sys.stderr, disable=rank > 0, leave=False,
                       mininterval=1.0 if sys.stderr.isatty() else 60.0)  # a log file: a line a minute
            for idxs in order[progress.batch_in_epoch:]:
                t0 = time.time()
                mine = idxs[rank::world]  # this process's share of the batch (all of it in one process)
                batch = data.collate(train_examples, mine).to(device)
                with autocast(device):
                    loss, parts = compute_loss(train_model, batch, kd, args.normalize)
                if world > 1:  # DDP averages the N gradients: weigh this share by its part of the batch
                    loss = loss * world * share_of_batch(train_examples, mine, idxs, args.normalize)
                loss.backward()
                if args.warmup:  # linear warm-up (Vaswani et al. 2017): lr * min(1, (step + 1) / STEPS)
                    for group in optimizer.param_groups:
                        group["lr"] = progress.lr * min(1.0, (progress.step + 1) / args.warmup)
                if args.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if masks:
                    prune.apply_masks(model, masks)  # pruned weights back to exactly 0
                progress.step += 1
                progress.batch_in_epoch += 1
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value * batch.ntokens
                tokens += batch.ntokens
                train_time += time.time() - t0
                bar.update()
                if not bar.disable and progress.step % 10 == 0:  # .item() waits for the GPU: not every step
                    bar.set_postfix(loss=f"{parts['loss'].item():.3f}", tgt_tok_s=f"{tokens / train_time:.0f}",
                                    refresh=False)

                if args.eval_every and progress.step % args.eval_every == 0:
                    record = validate()
                    schedule_lr(record, epoch_ended=False)
                    save_checkpoints(record)
                stop = from_process_0(stop_reason(), world)  # all processes stop at the same step
                if stop:
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
        leave_together(world)
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
               "valid_ppl": last_record["valid_ppl"], "valid_bleu": last_record["valid_bleu"],
               "elapsed": progress.elapsed,
               "best_path": str(best_path), "last_path": str(last_path), "log_path": str(log_path)}

    # ---- the test set, scored with the best model ----
    if "test" in splits and rank == 0:
        best = model_from_checkpoint(load_checkpoint(best_path), device=device)
        test_pairs, _ = data.clean_pairs(splits["test"], name="test")
        ppl = perplexity(best, data.encode_pairs(test_pairs, src_vocab, tgt_vocab), args, device)
        bleu = greedy_bleu(best, test_pairs, src_vocab, tgt_vocab, args)
        print(f"test ({best_path}): ppl {ppl:.2f} | greedy BLEU {bleu.score:.2f} | {bleu.signature}")
        metrics.update(test_ppl=ppl, test_bleu=bleu.score)
    leave_together(world)
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
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    code = 130 if main().get("interrupted") else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave at once, skipping Python's shutdown: everything is saved and every
        # process has passed the last barrier. DistributedDataParallel keeps gloo's threads alive
        # after destroy_process_group (torch 2.13), and a process whose interpreter shuts down
        # beside them can abort ("terminate called without an active exception"), which torchrun
        # reports as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
