"""Train a sequence-to-sequence translator: one training loop for every recipe.

    python train.py                                    # the built-in synthetic corpus, minutes on a CPU
    python train.py --train-src train.en --train-tgt train.de \\
                    --valid-src valid.en --valid-tgt valid.de --preset kim-rush-student
    python train.py ... --teacher teacher.pt --kd-alpha 0.5    # Word-KD (Kim & Rush 2016, section 3.1)
    python train.py ... --init student.pt --lr 0.1              # fine-tune (Seq-Inter, retrain a pruned model)
    python train.py --resume --save-dir runs/NAME               # continue a stopped run exactly
    python train.py ... --keep-epochs 5                         # then average.py --last 5 runs/NAME --out avg.pt
    python train.py ... --preset kim-rush-teacher               # the paper's size AND schedule (TRAIN_PRESETS)
    torchrun --nproc_per_node 4 train.py ...                    # 4 GPUs (or processes), DistributedDataParallel
    python train.py --arch t5                                   # the T5-like transformer (t5.py), Adafactor
    python train.py --arch t5 --preset t5-student-small --teacher t5.pt --kd relation \\
                    --relation-terms miniend-d                  # MiniEnD-D: attention relations + logit KD
    python train.py ... --span-corruption --mono text.txt       # T5 span corruption on unlabelled text

One optimisation step, whatever the recipe:
    loss = NLL                                 (or α·L_WORD-KD + (1-α)·L_NLL with --teacher,
                                                or Σ w·L_term with --kd relation: MiniLM / MiniEnD)
           divided by the target tokens of the batch (or by its sentences: --normalize sents)
           (--label-smoothing F: the NLL against (1-F)·one-hot + F·uniform)
    loss.backward(); zero the pruned weights' gradients; clip the gradient norm to --clip; optimizer.step()
    (--accum N: the gradients of N batches are added up first, each loss divided by the tokens of all N)
    re-apply the pruning masks, if the model has any, so pruned weights stay exactly 0.
Training on distilled data (Seq-KD, Seq-Inter) is this same loop with other --train-tgt files;
task-agnostic distillation (MiniEnD) is this same loop on span-corruption examples
(--span-corruption), and fine-tuning after it is --init. Both orders of a staged recipe (Seq-KD
data first, then gold, or the reverse) are two commands: the second --init's the first's best.pt.

Vocabularies. A new one is built from the training text, unless a checkpoint provides it. --arch t5 shares
one embedding between source and target, so its vocabulary is joint (--src-vocab-size entries for both
sides), and it reserves --sentinels entries "<X0>", "<X1>", ... (ids 4, 5, ...) for span corruption, so
that translation and span-corruption models can share one vocabulary (a teacher and its students must).
--span-corruption does the same for an LSTM.

Every evaluation (each epoch, or every --eval-every steps) computes the validation perplexity and the
BLEU and chrF of one greedy decoding (with a teacher, also the training objective), writes SAVE_DIR/last.pt,
then appends a line to SAVE_DIR/log.jsonl; SAVE_DIR/best.pt keeps the model with the best validation
perplexity (--best-metric bleu: by BLEU; loss: by the objective), and with
--keep-epochs N SAVE_DIR/epoch{E}.pt the model after each of the last N epochs (for average.py --last N). last.pt
is also written every --save-every minutes (default 10), so a killed run loses little. --resume continues
from last.pt to the same result an uninterrupted run gives: the batches of an epoch depend only on (--seed,
epoch), and the checkpoint holds the optimizer, the learning-rate schedule, the random-number generators,
the position inside the epoch and its running loss sums. SAVE_DIR/.lock keeps a second run out of the folder;
SAVE_DIR/run.json records how the run started (every resolved flag, the model config, the package versions,
the git commit, the device, the command line) and each resumption. A run whose training loss is NaN or
infinite, or above log V (a uniform guess over the V target words) over 200 steps after the first 200,
stops with an error (kd_losses.DivergenceCheck).

Several GPUs: under `torchrun --nproc_per_node N` every process runs this same loop on 1/N of each batch
(--batch-size and --batch-tokens are the size of the whole batch, over all processes, so the same flags
give the same training on 1 or N GPUs); DistributedDataParallel adds up the gradients. Process 0
evaluates, writes the checkpoints and the log, and prints (train.py, "Several processes"). One exception:
with --kd relation each process averages a relation term over its own rows and weighs it by its share of
the target tokens, which is close to one process's step but not equal to it.

flags.py is this command line (this text is its --help): defaults, flags, and what the flags name.
"""
import argparse
import math
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

import data
import kd_losses
from data import UserError
from model import PRESETS, T5_PRESETS, load_checkpoint, make_config

# 1. Defaults -----------------------------------------------------------------

# model flags that override a field of the model's config (flag dest == config field name)
MODEL_FIELDS = {"lstm": ["layers", "hidden", "emb_dim", "attention", "bidirectional", "input_feed", "dropout"],
                "t5": ["layers", "dec_layers", "d_model", "heads", "d_kv", "d_ff", "ff", "dropout"]}
# the preset when --preset is not given: (architecture, on the built-in corpus?) -> preset
DEFAULT_PRESETS = {("lstm", True): "builtin", ("lstm", False): "kim-rush-student",
                   ("t5", True): "t5-builtin", ("t5", False): "t5-student"}
DEFAULT_EPOCHS = 10
DEFAULT_SENTINELS = 100   # as T5's <extra_id_0> .. <extra_id_99>
# --threads on the CPU when not given: beside two other training jobs on 2 cores, the 'builtin' model trained
# at 5,000-8,700 target tokens/s with 1 thread and at 140-820 with 2 (torch's default there)
CPU_THREADS = 1

# The training schedule of a preset, applied by resolve_defaults to every flag not given (a flag given always
# wins): that of --preset NAME, or on the built-in corpus the default preset's ('builtin' / 't5-builtin').
# Without --preset on your own corpus: DEFAULT_PRESETS' model, TRAIN_DEFAULTS.
# The paper presets follow Kim & Rush (2016), whose "training details mirror Luong et al. (2015)", with
# the values of their code (harvardnlp/seq2seq-attn, train.lua and preprocess.py defaults), which produced
# the reported numbers: plain SGD, lr 1.0, 13 epochs, the lr halved after every epoch from epoch 9 on
# (--decay-after 8) or when the validation perplexity rises, batches of 64 sentences of at most 50 words,
# gradient norm clipped at 5, the loss summed over the tokens and divided by the sentences of the batch
# (--normalize sents), 50k-word vocabularies; dropout 0.3 comes with the model preset (model.PRESETS).
# (Luong et al. 2015, section 4.1, report 12 epochs halving after epoch 8, batches of 128 and dropout 0.2
# for their own dropout models.) seq2seq-attn's plateau rule is sticky (once the perplexity rose it halves
# every epoch); ours halves at each rise, which agrees with it whenever the rise comes after epoch 8.
LUONG_SCHEDULE = dict(optim="sgd", lr=1.0, epochs=13, decay_after=8, decay_on_plateau=True,
                      batch_size=64, max_len=50, clip=5.0, normalize="sents")
KIM_RUSH_SCHEDULE = dict(LUONG_SCHEDULE, tokenizer="word", src_vocab_size=50000, tgt_vocab_size=50000)
TRAIN_PRESETS = {
    **dict.fromkeys(["kim-rush-teacher", "kim-rush-student", "kim-rush-student-small"], KIM_RUSH_SCHEDULE),
    "iwslt-teacher": LUONG_SCHEDULE,    # the vocabulary: all words of a small corpus (up to 50k)
    "iwslt-student": LUONG_SCHEDULE,
    # The built-in corpus: a good model in minutes on a CPU (the ceiling of a model that picks the most
    # frequent translation is ~85 BLEU). lstm: valid BLEU ~80 after 3 epochs. t5: Adafactor at 1e-2, valid
    # greedy BLEU 78.3 after 2 epochs and 81.8 after 3, 25 s an epoch on one CPU thread; Adam (no warm-up)
    # was at 40.5 after 3 epochs at lr 5e-4 and 80.7 only after 6.
    "builtin": dict(optim="adam", lr=0.005, batch_size=32, epochs=3),
    "t5-builtin": dict(optim="adafactor", lr=1e-2, batch_size=32, epochs=3),
}
# --optim. Adafactor is T5's optimizer (Raffel et al. 2020; Shazeer & Stern 2018): no momentum, a factored
# second moment, and a step relative to the size of each weight matrix, RMS(W) * min(lr, 1/sqrt(step)).
# With T5's initialisation (embeddings of standard deviation 1, query weights of (d_model * d_kv)^-0.5,
# 0.008 at width 256 with heads of 64) that matters: Adam moves every weight by about lr per step,
# whatever its scale, so the embeddings hardly move while the queries change fast.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": partial(torch.optim.Adam, fused=True),  # one kernel for all weights
              "adafactor": torch.optim.Adafactor}
DEFAULT_LR = {"sgd": 1.0, "adam": 1e-3, "adafactor": 1e-2}   # Luong et al.; Adam's own; T5's
# The defaults of the flags a training preset may set, for every flag neither given nor preset.
TRAIN_DEFAULTS = dict(batch_size=64, max_len=50, clip=5.0, normalize="tokens",
                      tokenizer="word", decay_on_plateau=False)
DEFAULT_OPTIM = {"lstm": "sgd", "t5": "adafactor"}   # --optim by architecture: Luong et al.'s, T5's
# The numeric flags' ranges, checked before anything is read: (the range in words, its test, the flags).
# (The --relation-*-layer flags depend on the models: kd_losses.make_distillation checks them.)
NUMBER_RANGES = [
    ("a positive number", lambda x: x > 0, "batch_size batch_tokens max_len epochs max_steps patience eval_every"
     " decay_patience threads relation_heads layers dec_layers hidden emb_dim d_model heads d_kv d_ff accum"),
    ("positive and finite", lambda x: 0 < x < math.inf, "lr kd_temperature mean_span_length time_limit"),
    ("0 or more", lambda x: x >= 0, "sentinels decay_after keep_epochs"),
    ("0 or more and finite", lambda x: 0 <= x < math.inf, "weight_decay clip save_every"),
    ("0 (none) or a number of steps", lambda x: x >= 0, "warmup"),
    ("in [0, 1)", lambda x: 0 <= x < 1, "dropout label_smoothing"),
    ("in [0, 1]", lambda x: 0 <= x <= 1, "kd_alpha"),
    ("in (0, 1]", lambda x: 0 < x <= 1, "lr_decay"),
    ("between 0 and 1", lambda x: 0 < x < 1, "noise_density"),
    ("in [0, 2^32)", lambda x: 0 <= x < 2 ** 32, "seed"),
]


# 2. Flags --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The parser of train.py's flags; --help shows this file's docstring, then the flags."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser)
    add_model_flags(parser)
    add_optimisation_flags(parser)
    add_evaluation_checkpoint_and_distillation_flags(parser)
    return parser


def add_data_flags(parser) -> None:
    """The data and the vocabularies; --span-corruption."""
    g = parser.add_argument_group("data (give none of the file flags to train on the built-in synthetic corpus)")
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
    g.add_argument("--joint-vocab", action="store_true", help="one vocabulary for both sides, of "
                   "--src-vocab-size entries (always so with --arch t5 and --span-corruption)")
    g.add_argument("--sentinels", type=int, metavar="N", help="reserve N vocabulary entries <X0> .. <X{N-1}> "
                   f"for span corruption, within --src-vocab-size (default: {DEFAULT_SENTINELS} with --arch "
                   "t5 or --span-corruption, else 0)")
    g.add_argument("--vocab-from", metavar="CKPT", help="reuse a checkpoint's vocabularies instead of "
                   "building new ones (automatic with --teacher, --init and --resume)")
    g.add_argument("--max-len", type=int, metavar="N",
                   help="drop training pairs with a side longer than N tokens (default: 50, as Luong et al.)")
    g.add_argument("--batch-size", type=int, metavar="N", help="sentences per batch, over all processes "
                   "under torchrun (default: 64; 32 on the built-in corpus)")
    g.add_argument("--batch-tokens", type=int, metavar="N", help="instead of --batch-size: at most N padded "
                   "source+target tokens per batch (over all processes under torchrun)")
    g.add_argument("--span-corruption", action="store_true", help="train on T5 span-corruption examples "
                   "(Raffel et al. 2020) of monolingual text instead of translation pairs: --mono FILE, else "
                   "the training source side; validation on the validation source side; no target files. For "
                   "task-agnostic distillation (MiniEnD) before fine-tuning with --init; a model to be "
                   "fine-tuned on translation needs a vocabulary of both languages: --mono text of both, or "
                   "--vocab-from a translation model")
    g.add_argument("--mono", metavar="FILE", help="with --span-corruption: the unlabelled text, one sentence per line")
    g.add_argument("--noise-density", type=float, default=0.15, metavar="F",
                   help="span corruption: the fraction of tokens dropped (default: %(default)s, as T5)")
    g.add_argument("--mean-span-length", type=float, default=3.0, metavar="F",
                   help="span corruption: the mean length of a dropped span (default: %(default)s, as T5)")


def add_model_flags(parser) -> None:
    """The model: --arch, --preset, the fields of MODEL_FIELDS."""
    g = parser.add_argument_group("model (a preset, then single fields overridden by flags)")
    g.add_argument("--arch", choices=["lstm", "t5"], help="model family: the LSTM of Luong et al. (2015) or "
                   "the T5-like transformer (default: lstm, or the architecture of --init)")
    g.add_argument("--preset", metavar="NAME", help=f"model size; lstm: {', '.join(PRESETS)}; t5: "
                   f"{', '.join(T5_PRESETS)} (default: 'builtin' / 't5-builtin' on the built-in corpus, else "
                   "'kim-rush-student' / 't5-student'). A preset with a training schedule "
                   f"({', '.join(TRAIN_PRESETS)}) also sets the optimisation flags not given; the paper "
                   "presets as Kim & Rush (2016): SGD lr 1.0, 13 epochs halving after epoch 8 or on a "
                   "perplexity rise, batch 64, max length 50, clip 5, --normalize sents, 50k words")
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


def add_optimisation_flags(parser) -> None:
    """The optimizer, its schedule, the loss's options, when to stop; threads and device."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--optim", choices=sorted(OPTIMIZERS), help="SGD (Luong et al., Kim & Rush), Adam, or "
                   "Adafactor (T5; Shazeer & Stern 2018: steps relative to each weight's size, at most --lr) "
                   "(default: sgd for lstm, adafactor for t5; adam for the lstm on the built-in corpus)")
    g.add_argument("--lr", type=float, help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, "
                   f"{DEFAULT_LR['adam']} adam, {DEFAULT_LR['adafactor']} adafactor; "
                   f"{TRAIN_PRESETS['builtin']['lr']} for the lstm on the built-in corpus)")
    g.add_argument("--decay-after", type=int, metavar="N", help="halve the learning rate at the end of every "
                   "epoch after epoch N (Luong et al.; with any --optim)")
    g.add_argument("--decay-on-plateau", action=argparse.BooleanOptionalAction,
                   help="halve the learning rate when the validation --best-metric gets worse from one evaluation "
                        "to the next (perplexity rises, BLEU falls) (default: off; on with the paper presets)")
    g.add_argument("--decay-patience", type=int, metavar="K", help="with --decay-on-plateau: halve only after K "
                   "evaluations in a row without a new best --best-metric (and again after each K more), so that "
                   "a noisy dip on a rising curve keeps the rate (default: halve on every dip)")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="raise the learning rate linearly "
                   "from lr/STEPS to lr over STEPS steps (Vaswani et al. 2017) (default: %(default)s, none)")
    g.add_argument("--lr-decay", type=float, default=0.5, metavar="F",
                   help="factor of each decay (default: %(default)s, i.e. halve)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W",
                   help="L2 weight decay (default: %(default)s)")
    g.add_argument("--normalize", choices=["tokens", "sents"], help="divide each batch's summed loss by its "
                   "target tokens, or by its sentences as Luong et al. and Kim & Rush's code (steps ~ mean "
                   "target length times larger: their SGD lr 1.0 assumes it) (default: tokens; sents with "
                   "the paper presets)")
    g.add_argument("--label-smoothing", type=float, default=0.0, metavar="F", help="train the NLL against "
                   "(1-F)·one-hot + F·uniform over the target words (Szegedy et al. 2016; 0.1 in Vaswani et al. "
                   "2017), with or without --kd word; the validation perplexity stays plain (default: %(default)s)")
    g.add_argument("--accum", type=int, default=1, metavar="N", help="gradient accumulation: one optimizer step "
                   "per N batches, their gradients added up and each loss divided by the target tokens (or "
                   "sentences) of all N, so --batch-size B --accum N trains as --batch-size N*B in the memory of "
                   "B (as fairseq's --update-freq); --max-steps, --eval-every and --warmup count optimizer steps "
                   "(default: %(default)s)")
    g.add_argument("--clip", type=float, metavar="NORM",
                   help="rescale the gradient when its global norm exceeds NORM; 0 = off (default: 5)")
    g.add_argument("--epochs", type=int, metavar="N",
                   help=f"passes over the training data (default: the preset's schedule: "
                   f"{TRAIN_PRESETS['builtin']['epochs']} on the built-in corpus, {LUONG_SCHEDULE['epochs']} "
                   f"with the paper presets; else {DEFAULT_EPOCHS}, or no limit with --max-steps)")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in total")
    g.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop after the step that ends past "
                   "MINUTES of training (counted over --resume), then evaluate and save as at a normal end")
    g.add_argument("--seed", type=int, default=1, metavar="N", help="seeds the initialisation, the batch "
                   "order and dropout (default: %(default)s)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default on the CPU: 1, "
                   "as torch's own default of one per core runs 10-100x slower as soon as any other job shares "
                   "the cores; on an idle machine a large model may train faster with more; on a GPU: torch's choice)")
    g.add_argument("--device", default="auto", metavar="NAME", help="auto (cuda when present), cpu, cuda or "
                   "cuda:N (default: %(default)s); on CUDA the forward pass runs in bf16 autocast")


def add_evaluation_checkpoint_and_distillation_flags(parser) -> None:
    """Evaluation; the checkpoints (--save-dir, --resume, --init); --teacher and distillation."""
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate every STEPS optimizer steps (default: at the end of every epoch)")
    g.add_argument("--bleu-tokenize", default="13a", metavar="TOK", help="sacrebleu tokenizer: 13a for raw "
                   "text, none for pre-tokenized corpora (the paper's tokenized BLEU) (default: %(default)s)")
    g.add_argument("--best-metric", choices=["ppl", "bleu", "loss"], default="ppl", help="what best.pt is chosen "
                   "by: validation perplexity; greedy BLEU (better for Seq-KD students, whose perplexity on "
                   "the references rises while BLEU improves); or the training objective itself on the "
                   "validation data, e.g. the relation loss of --kd relation (default: %(default)s)")
    g.add_argument("--patience", type=int, metavar="N", help="stop after N evaluations with no better --best-metric")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--name", help="run name (default: 'builtin', or the name of --train-src without extension)")
    g.add_argument("--save-dir", metavar="DIR", help="where best.pt, last.pt and log.jsonl go (default: runs/NAME); "
                   "a folder that holds another run needs --resume, --overwrite or another --save-dir")
    g.add_argument("--resume", action="store_true", help="continue the run saved in SAVE_DIR/last.pt; its "
                   "flags are reused, flags given now override them (e.g. a larger --epochs)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if SAVE_DIR already holds a run")
    g.add_argument("--save-every", type=float, default=10.0, metavar="MINUTES", help="also write last.pt after "
                   "the step that ends MINUTES after the last save, so a killed run loses at most that much "
                   "(0 = only at evaluations and at the end) (default: %(default)s)")
    g.add_argument("--keep-epochs", type=int, default=0, metavar="N", help="also keep the model after each of "
                   "the last N epochs as SAVE_DIR/epoch{E}.pt (no optimizer state; older ones are deleted), to "
                   "average them: average.py --last N SAVE_DIR --out avg.pt (default: %(default)s, none)")
    g.add_argument("--init", metavar="CKPT", help="start from this model's weights, vocabularies, config and "
                   "pruning masks, with a fresh optimizer and --lr (fine-tuning, e.g. Seq-Inter or "
                   "retraining after pruning)")

    g = parser.add_argument_group("distillation (Word-KD, Kim & Rush 2016 section 3.1; attention relations, "
                                  "MiniLM / MiniEnD)")
    g.add_argument("--teacher", metavar="CKPT", help="the teacher; it must share the student's vocabularies, "
                   "which are taken from it unless --vocab-from/--init say otherwise")
    g.add_argument("--kd", choices=["word", "relation"], help="word: Word-KD, any teacher architecture; "
                   "relation: the attention-relation losses of MiniLM / MiniEnD (relation_losses.py), T5 "
                   "student and teacher (default with --teacher: word)")
    g.add_argument("--kd-alpha", type=float, metavar="A",
                   help="--kd word: L = A * L_WORD-KD + (1 - A) * L_NLL (default: 0.5, as the paper)")
    g.add_argument("--kd-temperature", type=float, default=1.0, metavar="T", help="soften both distributions "
                   "by T and scale the KD term by T^2; also the 'logit' relation term (default: %(default)s)")
    g.add_argument("--relation-terms", metavar="SPEC", help="--kd relation: comma-separated recipes (minilm, "
                   "miniend-d, miniend-e) and terms (enc-qq, dec-kk, cross-qk, ..., logit, nll), each "
                   "optionally =WEIGHT, e.g. 'minilm,nll' or 'miniend-e,nll=0.5,logit=0.5' (default: "
                   "miniend-d)")
    g.add_argument("--relation-heads", type=int, metavar="R", help="--kd relation: relation heads; R must "
                   "divide heads x d_kv of both models (default: the student's number of heads)")
    g.add_argument("--relation-student-layer", type=int, default=-1, metavar="I",
                   help="--kd relation: the student layer (of each stack) to match (default: -1, the last)")
    g.add_argument("--relation-teacher-layer", type=int, default=-1, metavar="I",
                   help="--kd relation: the teacher layer it learns from (default: -1, the last)")


# 3. Resolving the defaults ---------------------------------------------------

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
    if args.resume:      # the stopped run's flags (parse_args) are resolved already: a None there is its value
        schedule = {}
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
    args.src_vocab_size = default_size if args.src_vocab_size is None else args.src_vocab_size
    args.tgt_vocab_size = default_size if args.tgt_vocab_size is None else args.tgt_vocab_size
    if args.batch_tokens is not None:
        args.batch_size = None
    check_numbers(args)
    if args.decay_patience and not args.decay_on_plateau:
        raise UserError("--decay-patience counts evaluations for --decay-on-plateau: add it, or drop --decay-patience")
    kd_losses.resolve_distillation_flags(args)  # --kd, --kd-alpha, --relation-terms
    check_save_dir(args.save_dir)


def parse_args(argv=None):
    """train.py's flags (a list, or sys.argv), resolved. With --resume the stopped run's flags (in SAVE_DIR/last.pt)
    become the defaults, and the flags given now override them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_defaults(args)
    if args.resume:
        last_path = Path(args.save_dir) / "last.pt"
        if not last_path.exists():
            raise UserError(f"--resume: there is no {last_path} to continue; check --save-dir")
        parser.set_defaults(**load_checkpoint(last_path)["args"])
        args = parser.parse_args(argv)
        resolve_defaults(args)
    return args


def check_numbers(args) -> None:
    """Each numeric flag in its range (NUMBER_RANGES; vocabularies: room for the specials, sentinels, a word)."""
    for allowed, ok, dests in NUMBER_RANGES:
        for dest in dests.split():
            if getattr(args, dest) is not None and not ok(getattr(args, dest)):
                raise UserError(f"{flag_name(dest)} must be {allowed}, got {getattr(args, dest)}")
    words = len(data.SPECIALS) + 1    # the specials and a word, in the source (or joint) one also the sentinels
    for dest, least in [("src_vocab_size", words + args.sentinels), ("tgt_vocab_size", words)]:
        if getattr(args, dest) < least:
            raise UserError(f"{flag_name(dest)} must be at least {least} (the specials, the sentinels and a "
                            f"word), got {getattr(args, dest)}")


def check_save_dir(save_dir: str) -> None:
    """--save-dir: a folder, or a new one, where this process can write."""
    path = Path(save_dir).absolute()
    while not path.exists():       # the deepest part that exists: the folders under it are made
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        what = "is a folder this process cannot write in" if path.is_dir() else "is a file, not a folder"
        raise UserError(f"--save-dir {save_dir}: {path} {what}; give another --save-dir")


# 4. What the model flags name (the checkpoints to start from: runs.py; the text, the vocabularies: data.py) ---

def flag_name(field: str) -> str:
    """The flag that sets a config field: input_feed -> --no-input-feed, emb_dim -> --emb-dim."""
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
