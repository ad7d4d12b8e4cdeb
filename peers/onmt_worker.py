"""The OpenNMT-py timing worker: VENV/bin/python peers/onmt_worker.py JOB.json RESULT.json
(run by side_by_side.py with the venv it makes; imports onmt and torch, nothing of seqkd).

The model comes from OpenNMT-py's own builder (onmt.model_builder.build_model, which also does its
uniform init) from its own option parser, with the options of the job's config (OPTIONS). Training
calls the model and its generator on the job's padded tensors and sums the NLL over non-PAD targets
itself. Decoding uses onmt.translate.Translator.translate_batch: GreedySearch (random_sampling_topk
1: argmax) or BeamSearch, with min_length / max_length set for each batch (every batch holds sources
of one length L): </s> is blocked before the L-th token and the search stops at L tokens.

Vocabularies: onmt's dict_to_vocabs over <blank> <unk> <s> </s> w4 .. w{V-1}, so its ids of pad,
unk, bos and eos are seqkd's (0, 1, 2, 3) and the job's tensors mean the same in both tools.

Imports that onmt makes but this never uses (onmt.transforms imports all its transforms, and those
import spacy, pyahocorasick, rapidfuzz and fasttext) are replaced by empty stand-in modules when the
venv lacks them (stand_in_unused_modules), so the venv needs none of those packages.
"""
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F

import timing

UNUSED_MODULES = {"spacy": [], "ahocorasick": [], "fasttext": [], "rapidfuzz": ["fuzz", "process"]}
PAD = 0


def stand_in_unused_modules():
    """Register an empty module for each of UNUSED_MODULES that is not installed (with the names
    that `from X import a, b` asks for set to None)."""
    for name, attributes in UNUSED_MODULES.items():
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            for attribute in attributes:
                setattr(module, attribute, None)
            sys.modules[name] = module


def import_onmt():
    """Import the parts of onmt used here; torch's FutureWarnings about onmt's use of the deprecated
    torch.cuda.amp.custom_fwd/custom_bwd (SRU, sparsemax: not used here) are silenced."""
    stand_in_unused_modules()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd)", category=FutureWarning)
        import onmt
        import onmt.model_builder
        import onmt.opts
        import onmt.translate
        from onmt.inputters.inputter import dict_to_vocabs
        from onmt.utils.parse import ArgumentParser
    return onmt, dict_to_vocabs, ArgumentParser


onmt, dict_to_vocabs, ArgumentParser = import_onmt()


def options(cfg):
    """The job's config as OpenNMT-py training options (an argparse namespace from its own parser)."""
    return [
        "-encoder_type", "rnn", "-decoder_type", "rnn", "-rnn_type", "LSTM",
        "-layers", str(cfg["layers"]), "-hidden_size", str(cfg["hidden"]),
        "-word_vec_size", str(cfg["emb_dim"]), "-global_attention", "general", "-input_feed", "1",
        "-dropout", str(cfg["dropout"]), "-param_init", str(cfg["init"]),
        "-optim", "adam", "-learning_rate", str(cfg["lr"]), "-max_grad_norm", str(cfg["clip"]),
    ]


def model_opt(cfg):
    parser = ArgumentParser(description="onmt_worker")
    onmt.opts.model_opts(parser)
    onmt.opts._add_train_general_opts(parser)
    onmt.opts.distributed_opts(parser)
    onmt.opts._add_quant_opts(parser)
    opt = parser.parse_args(options(cfg))
    ArgumentParser.update_model_opts(opt)
    ArgumentParser.validate_model_opts(opt)
    return opt


def vocabs(size):
    tokens = ["<blank>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4, size)]
    return dict_to_vocabs({"src": tokens, "tgt": tokens, "data_task": "seq2seq"})


def build(cfg, seed):
    """OpenNMT-py's NMTModel (with .generator) of the job's config, on the CPU, uniform init."""
    torch.manual_seed(seed)
    opt = model_opt(cfg)
    model = onmt.model_builder.build_model(opt, opt, vocabs(cfg["vocab"]), checkpoint=None, device_id=0)
    return model


def train_step_fn(model, cfg):
    """One full step: model + generator, NLL summed over non-PAD targets, backward, clip, Adam."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def step(src, tgt_in, tgt_out):
        src_len = (src != PAD).sum(1)
        tgt = torch.cat([tgt_in, tgt_out[:, -1:]], dim=1)          # the model feeds tgt[:, :-1] = tgt_in
        dec_out, _ = model(src.unsqueeze(2), tgt.unsqueeze(2), src_len)    # (B, T, H)
        logits = model.generator(dec_out)                              # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        optimizer.step()
    return step


def translator(model, cfg, beam_size):
    """OpenNMT-py's Translator: raw log-probability sums (no length or coverage penalty), one best."""
    with warnings.catch_warnings():     # it warns that alpha 0 means no length penalty: that is the point
        warnings.filterwarnings("ignore", message="Using length penalty with alpha==0")
        scorer = onmt.translate.GNMTGlobalScorer(alpha=0.0, beta=0.0, length_penalty="none", coverage_penalty="none")
    return onmt.translate.Translator(
        model, vocabs(cfg["vocab"]), gpu=-1, n_best=1, beam_size=beam_size, max_length_ratio=0,
        random_sampling_topk=1 if beam_size == 1 else 0, global_scorer=scorer, report_score=False)


def decoder(cfg, seed):
    """beam size -> decode(src) for batches of equal-length sources -> generated tokens per sentence."""
    model = build(cfg, seed).eval()

    def make(beam_size):
        search = translator(model, cfg, beam_size)

        def decode(src):
            B, L = src.shape
            search.min_length, search.max_length = L - 1, L
            batch = {"src": src.unsqueeze(2), "srclen": torch.full((B,), L, dtype=torch.long)}
            results = search.translate_batch(batch, attn_debug=False)
            return [len(predictions[0]) for predictions in results["predictions"]]
        return decode
    return make


def main(argv):
    timing.worker_main(argv, build, train_step_fn, decoder, lambda m: sum(p.numel() for p in m.parameters()),
                       "OpenNMT-py", onmt.__version__)


if __name__ == "__main__":
    main(sys.argv[1:])
