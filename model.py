"""Sequence-to-sequence models behind one incremental-decoding interface, and their checkpoints.

The models are lstm.py (Luong et al. 2015) and t5.py (Raffel et al. 2020); this file builds them
(make_config, build_model), saves, loads and rebuilds checkpoints, and picks the device.

The interface every model implements (beam.py and train.py use nothing else):

    logits, attn = model(src, src_mask, tgt_in)     # teacher forcing: (B, T, V), (B, T, S)
    state = model.start(src, src_mask)               # encode once -> decoder state
    logp, attn, state = model.step(prev, state)      # one target step: (B, V) log-probs, (B, S)
    state = model.reorder(state, index)              # pick / repeat rows after a beam step
    model.source_state                               # names of the state entries that depend
                                                     # only on the source (beam.reorder_beams)

Conventions: tensors are batch-first; `src` (B, S) and `tgt_in` (B, T) hold token ids padded with
PAD; `src_mask` (B, S) is boolean with True = real token, False = padding. A decoder state is a
dict of tensors that all have the batch as dimension 0, so reordering it is one index_select per
entry, whatever the architecture. Each model class has `arch` ("lstm" or "t5") and `cfg`.
"""
import contextlib
import functools
import math
import os
import sys
import warnings
from dataclasses import fields

import torch

from data import UserError
# the models, their configs and presets, re-exported: model.PRESETS, model.T5Model ... work
from lstm import PRESETS, LSTMConfig, Seq2Seq, check_lstm_config, from_lstm_cells
from runs import write_atomically
from t5 import T5_PRESETS, T5Config, T5Model, check_t5_config

ARCHS = {"lstm": (LSTMConfig, Seq2Seq), "t5": (T5Config, T5Model)}   # -> (config, model class)


def make_config(arch, preset=None, **overrides):
    """A config for ARCH ("lstm" or "t5") from a preset name plus field overrides. None values,
    and fields the architecture does not have, are ignored. UserError for an unknown architecture
    or preset, and for a config that cannot be built."""
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: unknown architecture (known: {', '.join(ARCHS)})")
    presets = PRESETS if arch == "lstm" else T5_PRESETS
    if preset is not None and preset not in presets:
        raise UserError(f"--preset {preset}: unknown preset for --arch {arch} "
                        f"(known: {', '.join(presets)})")
    config_cls = ARCHS[arch][0]
    values = dict(presets.get(preset, {}))
    names = {f.name for f in fields(config_cls)}
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    cfg = config_cls(**values)
    (check_lstm_config if arch == "lstm" else check_t5_config)(cfg)
    return cfg


def build_model(arch, config):
    """A fresh model from an architecture name and a config dict (as stored in checkpoints)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    config_cls, model_cls = ARCHS[arch]
    return model_cls(config_cls(**config))


def count_params(model):
    """Every weight and bias, also those that int8_model's layers keep outside parameters()."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            n += m.weight().numel() + (0 if m.bias() is None else m.bias().numel())
        elif isinstance(m, torch.ao.nn.quantized.dynamic.LSTM):
            n += sum(w.numel() for w in [*m.get_weight().values(), *m.get_bias().values()])
    return n


@contextlib.contextmanager
def eval_mode(model):
    """Within the block the model is in eval mode (no dropout); afterwards in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def save_checkpoint(obj, path):
    """torch.save through runs.write_atomically (never half a checkpoint, never a shared temporary
    file); pruning masks {name: bool tensor} are written as the list of their names (pruning_masks)."""
    if isinstance(obj, dict) and isinstance(obj.get("masks"), dict):
        obj = dict(obj, masks=mask_names(obj["masks"], obj["model"]))
    write_atomically(path, lambda f: torch.save(obj, f))


def mask_names(masks, state):
    """The names of the masked weights (`state`'s own key objects, which pickle stores as short
    references); every pruned weight must be exactly 0.0 in `state`."""
    for name, keep in masks.items():
        w = state[name]
        if w[~keep.to(w.device)].any():
            raise ValueError(f"pruned weights of {name} are not 0.0: apply the masks before saving")
    return [name for name in state if name in masks]


def pruning_masks(ckpt):
    """The pruning masks of a checkpoint, {name: bool tensor, True = kept}; {} if unpruned.

    A weight that is exactly 0.0 counts as pruned (prune.py's convention), so a checkpoint stores
    only the names of its masked weights and each mask is `weight != 0`. Names rather than
    bit-packed masks: nothing to pack or unpack, and the file holds nothing the zeros do not
    already say. Older checkpoints hold the bool tensors themselves: those are returned as stored."""
    masks = ckpt.get("masks") or {}
    if isinstance(masks, dict):
        return masks
    for name in masks:
        if name not in ckpt["model"]:
            raise UserError(f"the pruning mask {name} names no weight of the checkpoint")
    return {name: ckpt["model"][name] != 0 for name in masks}


def densify(sparse):
    """The checkpoint a file of `prune.py --export` ("seqkd-sparse") describes: every sparse
    weight {"shape", "index" (flat positions of the non-zeros), "value"} becomes a dense tensor
    again, and those weights are the masked ones."""
    state, masked = {}, []
    for name, t in sparse["tensors"].items():
        if isinstance(t, dict):
            flat = t["value"].new_zeros(math.prod(t["shape"]))                  # (numel,)
            flat[t["index"].long()] = t["value"]
            t = flat.view(t["shape"])
            masked.append(name)
        state[name] = t
    kept = {key: sparse[key] for key in ("arch", "config", "vocab", "args") if key in sparse}
    return {"format": "seqkd", **kept, "model": state, "masks": masked}


def load_checkpoint(path, map_location="cpu"):
    """Load a seqkd checkpoint dict with torch.load(weights_only=True). A sparse file of
    `prune.py --export` comes back as the ordinary (dense) checkpoint; "masks", if any, as
    {name: bool tensor} (pruning_masks)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found: give the path of a .pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, or a pickle that holds more than weights
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}): "
                        "is it a seqkd checkpoint written by train.py?") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == "seqkd-sparse":
        ckpt = densify(ckpt)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "seqkd" or "model" not in ckpt:
        raise UserError(f"checkpoint {path} is not a seqkd checkpoint (no model weights): "
                        "give a file written by train.py or prune.py")
    if ckpt.get("arch") == "lstm" and "cells.0.weight_ih" in ckpt["model"]:   # saved before DecoderLSTM
        ckpt["model"], renamed = from_lstm_cells(ckpt["model"])
        masked = [new for name in ckpt.get("masks") or [] for new in renamed.get(name, [name])]
        ckpt["masks"] = list(dict.fromkeys(masked))          # names: pruning_masks reads the zeros
    if ckpt.get("masks"):
        ckpt["masks"] = pruning_masks(ckpt)
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model a checkpoint describes, load its weights, and put it in eval mode."""
    model = build_model(ckpt["arch"], ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not fit its {ckpt['arch']} config: {first}") from None
    return model.to(device).eval()


def int8_model(model):
    """The model for int8 decoding on the CPU, quantised at load (the checkpoint stays float32):
    torch's dynamic quantisation stores the weights of every nn.Linear and nn.LSTM as int8 (one
    scale per tensor) and quantises their inputs on the fly, so the matrix products run in int8.
    Embeddings stay float32: a look-up does no arithmetic, so int8 would save memory, not time.
    Where this torch has no int8 kernels, it says so and returns the float32 model."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch.ao.quantization's deprecation notice
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear, torch.nn.LSTM},
                                                          dtype=torch.qint8)
    except (AttributeError, ImportError, RuntimeError, NotImplementedError) as e:
        print(f"int8: not available in torch {torch.__version__} ({type(e).__name__}: {str(e).splitlines()[0]}); "
              "decoding in float32", file=sys.stderr)
        return model


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def decoding_precision(name, device):
    """The context decoding runs in. None: float32. "tf32": float32 weights, matrix products in
    TF32 on CUDA (10-bit mantissa inputs, float32 sums). "bf16" / "fp16": torch.autocast, which
    runs the matrix products in that type and keeps softmaxes and sums in float32 (Model.step
    returns float32 log-probabilities either way). fp16 and TF32 are CUDA's; bf16 runs on the CPU too.
    On CUDA every choice also allows TF32 products for the rest of the process."""
    if name is None:
        return contextlib.nullcontext()
    if name in ("tf32", "fp16") and device.type != "cuda":
        raise UserError(f"--autocast {name} is for CUDA, not {device}: use --device cuda, or bf16 on the CPU")
    if name == "bf16" and device.type == "cpu" and not cpu_runs_bf16():
        raise UserError(f"--autocast bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) cannot run an LSTM "
                        "in bfloat16 (oneDNN needs AVX-512): decode in float32 (drop --autocast), or try --int8")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return contextlib.nullcontext() if name == "tf32" else torch.autocast(device.type, dtype=AUTOCAST[name])


@functools.cache
def cpu_runs_bf16():
    """Whether this CPU runs a small LSTM and Linear under bf16 autocast (oneDNN refuses on CPUs
    without AVX-512), tried once per process on tiny inputs."""
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.Linear(2, 2)(torch.nn.LSTM(2, 2)(torch.zeros(1, 1, 2))[0])
        return True
    except RuntimeError:
        return False


def pick_device(name=None):
    """'auto' (or None): CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)
