"""Magnitude pruning of a trained model, and a compact sparse export of the result.

See, Luong & Manning (2016), "Compression of Neural Machine Translation Models via Pruning":
set the weights of smallest magnitude to zero, then retrain with them held at zero. Kim & Rush
(2016, Table 3) apply it to their distilled student: 80% pruned leaves 13x fewer parameters than
the teacher for -0.2 BLEU, after retraining ("crucial!").

    python prune.py --ckpt student.pt --amount 0.8 --out pruned.pt
    python prune.py --ckpt student.pt --amount 0.8 --scheme class-uniform --exclude embed \\
        --teacher teacher.pt --out pruned.pt --export pruned.sparse.pt
    python train.py --init pruned.pt ...        # retrain: the masks travel in the checkpoint

Words used below
  prunable weight  every parameter with dim >= 2: embeddings and weight matrices (LSTM, attention,
                   output; a transformer's q/k/v/o and feed-forward). Biases and norm scales (dim 1)
                   are never pruned. Nothing here knows an architecture: it prunes every model family.
  weight class     See et al. group weights into classes, one per matrix, so a class is simply a
                   parameter name ("encoder.rnn.weight_hh_l0", "generator.weight", ...).
  mask             {parameter name: bool tensor of its shape}; True = kept, False = pruned (held at
                   exactly 0.0 by `apply_masks`). A checkpoint stores only the names of the masked
                   classes: the zeros of their weights are the masks (model.pruning_masks).
  amount           the fraction of the prunable (not --exclude'd) weights to prune, in [0, 1). Weights
                   already exactly zero count as pruned: re-pruning only adds to a model's masks.

The three schemes of See et al. (sec. 3.2). Each prunes exactly round(amount * N) of the N
prunable weights; among equal magnitudes the earlier position (in model order) goes first.
  class-blind         one global threshold on |w| across all classes (their best scheme)
  class-uniform       the same fraction of every class, on |w| within the class
  class-distribution  prune |w| < λ·σ_c, σ_c the standard deviation of class c; one λ for all
                      classes, chosen (by sorting |w|/σ_c) so that the total reaches the amount
"""
import argparse
import os
import sys

import torch

from data import UserError
from model import count_params, load_checkpoint, model_from_checkpoint, pruning_masks, save_checkpoint

SCHEMES = ("class-blind", "class-uniform", "class-distribution")

# 1. Prunable weights and masks ---------------------------------------------------------------


def prunable_weights(model):
    """Every parameter with dim >= 2, {name: Parameter}, in model order; tied parameters once."""
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def check_amount(amount):
    if not 0.0 <= amount < 1.0:  # also catches NaN
        raise UserError(f"--amount {amount} is outside [0, 1): give the fraction of weights to "
                        "prune, e.g. --amount 0.8 for 80%")


def smallest(scores, k):
    """scores (N,) -> bool (N,), True at the k smallest scores (a stable sort: ties go by position)."""
    order = torch.sort(scores, stable=True).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


def prune(model, amount, scheme="class-blind", exclude=()):
    """Choose the weights to prune. Returns masks {name: bool tensor, True = kept} for every
    prunable weight whose name contains none of the `exclude` substrings. The model is not
    changed: `apply_masks(model, masks)` zeroes the pruned weights."""
    check_amount(amount)
    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme}: unknown scheme (known: {', '.join(SCHEMES)})")
    weights = prunable_weights(model)
    for pattern in exclude:
        if not any(pattern in name for name in weights):
            raise UserError(f"--exclude {pattern!r} matches no weight class; the classes are: "
                            f"{', '.join(weights)}")
    weights = {name: p.detach() for name, p in weights.items()
               if not any(pattern in name for pattern in exclude)}
    if not weights:
        raise UserError("--exclude leaves no weight to prune: exclude fewer classes")
    magnitude = {name: w.abs().flatten().float() for name, w in weights.items()}   # (n_c,) each

    if scheme == "class-uniform":
        # k_c smallest |w| of every class. Rounding the running total (rather than each class)
        # keeps every class within one weight of amount * n_c and the total exact.
        pruned, seen, done = {}, 0, 0
        for name, m in magnitude.items():
            seen += m.numel()
            k = round(amount * seen) - done
            pruned[name] = smallest(m, k)
            done += k
    else:
        if scheme == "class-blind":
            scores = magnitude                                               # |w|
        else:
            # See et al.: prune |w| < λ·σ_c  <=>  |w| / σ_c < λ, so the k smallest |w| / σ_c over
            # all classes are exactly the weights below the λ that prunes k of them.
            scores = {name: m / weights[name].float().std(correction=0).clamp_min(1e-12)
                      for name, m in magnitude.items()}
        flat = torch.cat(list(scores.values()))                             # (N,)
        chosen = smallest(flat, round(amount * flat.numel()))
        pruned = dict(zip(scores, chosen.split([s.numel() for s in scores.values()])))

    # Already-zero weights count as pruned (a re-pruned model keeps its old masks).
    return {name: ~pruned[name].view_as(w) & (w != 0) for name, w in weights.items()}


@torch.no_grad()
def apply_masks(model, masks):
    """Set every pruned weight (mask False) to exactly 0.0, in place. train.py calls this after
    every optimizer step: whatever the step did (Adam's moments, weight decay), pruned weights
    are zero again before the next forward pass."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params or params[name].shape != keep.shape:
            raise UserError(f"the pruning mask of {name} does not fit this model: "
                            "was the checkpoint pruned from a different model?")
        params[name].masked_fill_(~keep.to(params[name].device), 0.0)


def mask_gradients(model, masks):
    """Zero the gradients of pruned weights, in place: clipping then rescales the kept ones' norm."""
    for name, p in model.named_parameters():
        if name in masks and p.grad is not None:
            p.grad.masked_fill_(~masks[name], 0.0)


# 2. Report -----------------------------------------------------------------------------------


def count_nonzero(model):
    return sum(int((p != 0).sum()) for p in model.parameters())


def report(model, exclude=(), teacher_params=None):
    """The table printed by the CLI: one row per weight class (size, pruned fraction, remaining
    non-zeros), one for the parameters never pruned, then totals. Counts come from the weights."""
    weights = prunable_weights(model)
    others = [p for p in model.parameters() if p.dim() < 2]
    other_label = "biases and norms (not pruned)"
    width = max(len(name) for name in [*weights, other_label])
    lines = [f"{'weight class':<{width}}  {'shape':>12}  {'size':>12}  {'pruned':>7}  {'non-zero':>12}"]
    for name, p in weights.items():
        nonzero = int((p != 0).sum())
        note = "  (excluded)" if any(pattern in name for pattern in exclude) else ""
        lines.append(f"{name:<{width}}  {'x'.join(map(str, p.shape)):>12}  {p.numel():>12,}  "
                     f"{1 - nonzero / p.numel():>7.1%}  {nonzero:>12,}{note}")
    n_other = sum(p.numel() for p in others)
    nz_other = sum(int((p != 0).sum()) for p in others)
    lines.append(f"{other_label:<{width}}  {'':>12}  {n_other:>12,}  {'':>7}  {nz_other:>12,}")
    total = sum(p.numel() for p in model.parameters())
    nonzero = count_nonzero(model)
    lines.append(f"parameters: {total:,} before, {nonzero:,} non-zero after pruning "
                 f"({nonzero / total:.1%} kept)")
    if teacher_params is not None:
        lines.append(f"teacher: {teacher_params:,} parameters -> "
                     f"{teacher_params / max(nonzero, 1):.1f}x fewer than the teacher")
    return "\n".join(lines)


# 3. Sparse export ----------------------------------------------------------------------------


def export_sparse(ckpt, path):
    """Write a compact copy of a (pruned) checkpoint: every masked weight as its non-zero values
    and their flat positions (int32), every other tensor dense. arch, config, vocab and args
    travel too: model.load_checkpoint(path) reads it back as the ordinary checkpoint."""
    masks = ckpt.get("masks") or {}
    tensors = {}
    for name, t in ckpt["model"].items():
        if name in masks:
            flat = t.flatten()
            index = flat.nonzero().squeeze(1)                                 # (nnz,)
            index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
            tensors[name] = {"shape": list(t.shape), "index": index.to(index_dtype), "value": flat[index]}
        else:
            tensors[name] = t
    save_checkpoint({"format": "seqkd-sparse", "arch": ckpt.get("arch"), "config": ckpt.get("config"),
                     "vocab": ckpt.get("vocab"), "args": ckpt.get("args"), "tensors": tensors}, path)


# 4. Command line -----------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Magnitude pruning (See et al. 2016) of a checkpoint.")
    ap.add_argument("--ckpt", required=True, help="checkpoint to prune (from train.py)")
    ap.add_argument("--amount", type=float, required=True,
                    help="fraction of the prunable weights to set to zero, in [0, 1), e.g. 0.8")
    ap.add_argument("--scheme", choices=SCHEMES, default="class-blind",
                    help="how the threshold is chosen (See et al. sec. 3.2); default class-blind")
    ap.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="leave out the weight classes whose name contains PATTERN, e.g. 'embed' or "
                         "'generator' (repeatable); by default every weight with dim >= 2 is pruned")
    ap.add_argument("--teacher", help="teacher checkpoint: print how many times fewer parameters")
    ap.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    ap.add_argument("--export", metavar="PATH",
                    help="also write a compact sparse file (non-zeros and their positions)")
    return ap.parse_args(argv)


def run(args):
    check_amount(args.amount)  # before loading anything large
    ckpt = load_checkpoint(args.ckpt)
    if not ckpt.get("model"):
        raise UserError(f"--ckpt {args.ckpt} holds no model weights: give a checkpoint written by train.py")
    teacher_params = None
    if args.teacher:
        teacher_params = count_params(model_from_checkpoint(load_checkpoint(args.teacher)))

    model = model_from_checkpoint(ckpt)
    old_masks = pruning_masks(ckpt)
    apply_masks(model, old_masks)                 # re-pruning: old zeros count as pruned
    masks = prune(model, args.amount, args.scheme, args.exclude)
    masks = {**old_masks, **masks}                # classes excluded now keep their old masks
    apply_masks(model, masks)
    print(f"pruned {args.ckpt}: {args.scheme}, amount {args.amount:g}"
          + (f", excluding {', '.join(args.exclude)}" if args.exclude else ""))
    print(report(model, args.exclude, teacher_params))

    out = dict(ckpt)
    out.pop("optimizer", None)                    # Adam's moments belong to the dense model
    out["model"] = {name: t.cpu() for name, t in model.state_dict().items()}
    out["masks"] = {name: m.cpu() for name, m in masks.items()}
    out["pruning"] = {"amount": args.amount, "scheme": args.scheme, "exclude": list(args.exclude)}
    save_checkpoint(out, args.out)
    dense_mb = os.path.getsize(args.out) / 1e6
    print(f"wrote {args.out} ({dense_mb:.2f} MB)")
    summary = {"params": count_params(model), "nonzero": count_nonzero(model),
               "teacher_params": teacher_params, "dense_mb": dense_mb}
    if args.export:
        export_sparse(out, args.export)
        summary["sparse_mb"] = os.path.getsize(args.export) / 1e6
        print(f"wrote {args.export} ({summary['sparse_mb']:.2f} MB sparse vs {dense_mb:.2f} MB dense)")
    return summary


def main(argv=None):
    """Prune a checkpoint; returns {"params", "nonzero", "teacher_params", "dense_mb", ["sparse_mb"]}."""
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
