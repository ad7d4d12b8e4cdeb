"""Checkpoint averaging: one checkpoint whose weights are the plain mean of several checkpoints'.

    python average.py runs/mine/best.pt runs/mine/last.pt --out runs/mine/avg.pt
    python average.py --last 5 runs/mine --out runs/mine/avg.pt     # its 5 newest epoch{E}.pt
    python translate.py --ckpt runs/mine/avg.pt --src test.en --ref test.de

The mean of the weights of checkpoints from late in one training run (or of runs fine-tuned from
one start) can decode better than each of them: score it on validation data to see. They must be
checkpoints of one model: the same architecture, config, vocabularies and weight names and
shapes, pruned in the same weight classes, else a one-line error names the file. train.py keeps
best.pt and last.pt per --save-dir, and with --keep-epochs N the models after its last N epochs,
SAVE_DIR/epoch{E}.pt: --last N FOLDER averages the N of them with the highest E.

What the average holds:
  float tensors       the mean over the checkpoints, summed in float64, stored in the tensor's dtype
  other tensors       integer or bool buffers (counters, flags: nothing a mean means) are the last
                      checkpoint's
  pruning masks       a weight pruned in any checkpoint is pruned in the average: the masks are
                      ANDed and the mean multiplied by them, so the average is at least as sparse
                      as each checkpoint and its pruned weights stay exactly 0.0 (model.pruning_masks)
  everything else     the last checkpoint's: config, vocabularies, training arguments and counts;
                      not its optimizer state (Adam's moments belong to that one point of training);
                      "averaged" lists the files averaged
It is written atomically (model.save_checkpoint); translate.py --ckpt decodes it, and train.py
--init reads it (weights, config, masks, vocabularies), like any checkpoint.
"""
import argparse
import os
import sys

import torch

from data import UserError, plural
from model import load_checkpoint, save_checkpoint
from runs import epoch_checkpoints

# what must be equal in every checkpoint, and how to get checkpoints that agree
FIX = {"architecture": "average checkpoints of one model",
       "config": "average checkpoints of one model",
       "vocabularies": "average checkpoints trained with one vocabulary",
       "weights": "average checkpoints of one model",
       "pruned weight classes": "average checkpoints pruned alike (retrained from one prune.py output)"}


def model_signature(ckpt):
    """What must be equal in every checkpoint averaged, by the name an error gives it."""
    return {"architecture": ckpt.get("arch"), "config": ckpt.get("config"), "vocabularies": ckpt.get("vocab"),
            "weights": {name: tuple(t.shape) for name, t in ckpt["model"].items()},
            "pruned weight classes": sorted(ckpt.get("masks") or {})}


def check_same_model(signature, path, first, first_path):
    """UserError naming `path` and what differs from `first_path`'s model (its signature `first`)."""
    for what, value in first.items():
        if signature[what] == value:
            continue
        detail = ""
        if what == "config" and isinstance(value, dict) and isinstance(signature[what], dict):
            keys = sorted(k for k in set(value) | set(signature[what]) if value.get(k) != signature[what].get(k))
            detail = " (" + ", ".join(f"{k}: {value.get(k)} there, {signature[what].get(k)} here"
                                      for k in keys) + ")"
        elif what == "architecture":
            detail = f" ({value} there, {signature[what]} here)"
        raise UserError(f"{path} has other {what} than {first_path}{detail}: {FIX[what]}")


def average(paths):
    """The checkpoint whose weights are the mean of those of `paths` (see the top of the file).
    Loads one checkpoint at a time: memory for two, and the float64 sums."""
    sums, keep = None, None
    for path in paths:
        ckpt = load_checkpoint(path)
        state, masks = ckpt["model"], ckpt.get("masks") or {}
        if sums is None:
            first, first_path = model_signature(ckpt), path
            sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in state.items()
                    if t.is_floating_point()}
            keep = {name: torch.ones(m.shape, dtype=torch.bool) for name, m in masks.items()}
        check_same_model(model_signature(ckpt), path, first, first_path)
        for name, total in sums.items():
            total += state[name].double()
        for name, kept in keep.items():
            kept &= masks[name].cpu()
    mean = {}
    for name, t in ckpt["model"].items():       # the last checkpoint's order, dtypes and other tensors
        if name in sums:
            t = (sums[name] / len(paths)).to(t.dtype)
            if name in keep:
                t = t.masked_fill(~keep[name], 0.0)
        mean[name] = t
    out = {key: value for key, value in ckpt.items() if key != "optimizer"}
    out.update(model=mean, averaged=[str(p) for p in paths])
    if keep:
        out["masks"] = keep
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Average the weights of checkpoints of one model (a plain mean) into one checkpoint.",
        epilog="examples:  python average.py runs/mine/best.pt runs/mine/last.pt --out runs/mine/avg.pt\n"
               "           python average.py --last 5 runs/mine --out runs/mine/avg.pt   (train.py --keep-epochs 5)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="CKPT",
                   help="checkpoints of one model (train.py, prune.py); config, vocabularies and "
                        "the rest come from the last; with --last, one train.py --save-dir")
    p.add_argument("--last", type=int, metavar="N", help="average the N epoch checkpoints SAVE_DIR/epoch{E}.pt "
                   "of the highest E in the folder given (train.py --keep-epochs N keeps them)")
    p.add_argument("--out", required=True, help="where to write the average (atomically)")
    return p.parse_args(argv)


def last_epochs(folder, n):
    """--last N FOLDER: the paths of FOLDER's N epoch checkpoints of the highest epochs, oldest first."""
    if not os.path.isdir(folder):
        raise UserError(f"--last {n} {folder}: not a folder; give one train.py --save-dir, e.g. --last {n} runs/mine")
    found = epoch_checkpoints(folder)
    if len(found) < n:
        names = ", ".join(os.path.basename(path) for path in found) or "none"
        fewer = f", or give --last {len(found)}" if len(found) >= 2 else ""
        raise UserError(f"--last {n}: {folder} holds {plural(len(found), 'epoch checkpoint')} ({names}); "
                        f"train with --keep-epochs {n}{fewer}")
    return found[len(found) - n:]


def check_args(args):
    """Before any checkpoint is loaded: two or more existing files, each once, and a file to write; --last N
    FOLDER: one folder, N >= 2, whose N newest epoch checkpoints become the files."""
    if args.last is not None:
        if len(args.ckpts) != 1 or args.last < 2:
            raise UserError(f"--last {args.last} {' '.join(args.ckpts)}: give --last 2 or more and one folder, e.g. "
                            "average.py --last 5 runs/mine --out avg.pt")
        args.ckpts = last_epochs(args.ckpts[0], args.last)
    if len(args.ckpts) < 2:
        raise UserError(f"average.py {args.ckpts[0]}: give two or more checkpoints to average")
    seen = {}                                   # real path -> the path given first
    for path in args.ckpts:
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} not found: give the paths of .pt files written by train.py")
        if (other := seen.get(os.path.realpath(path))) is not None:
            also = f" (also as {other})" if other != path else ""
            raise UserError(f"checkpoint {path} is given twice{also}: name each checkpoint once")
        seen[os.path.realpath(path)] = path
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder: give a file name, e.g. {os.path.join(args.out, 'avg.pt')}")


def main(argv=None):
    """Average the checkpoints; returns the checkpoint written."""
    args = parse_args(argv)
    try:
        check_args(args)
        ckpt = average(args.ckpts)
        save_checkpoint(ckpt, args.out)
    except UserError as e:
        sys.exit(f"error: {e}")
    pruned = f", pruned in {len(ckpt['masks'])} weight classes" if ckpt.get("masks") else ""
    print(f"averaged {len(args.ckpts)} checkpoints ({ckpt['arch']}{pruned}) -> {args.out} "
          f"({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return ckpt


if __name__ == "__main__":
    main()
