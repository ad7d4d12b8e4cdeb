"""What both timing workers share: reading the job, setting the threads, the timed loops, the result.

It needs torch alone, so the seqkd worker (system python) and the OpenNMT-py worker (its venv)
import the same file and time their steps with the same code. A job is the JSON file that
side_by_side.py writes: the model config, the padded training batches and the decoding batches.
"""
import json
import os
import sys
import time

import torch


def read_job(argv):
    """argv = [job.json, result.json] -> (the job dict, the result path); threads set to the job's."""
    if len(argv) != 2:
        sys.exit(f"usage: python {os.path.basename(sys.argv[0])} JOB.json RESULT.json  (run by side_by_side.py)")
    with open(argv[0]) as f:
        job = json.load(f)
    torch.set_num_threads(job["threads"])
    return job, argv[1]


def write_result(result, path):
    result.update(torch=torch.__version__, threads=torch.get_num_threads())
    with open(path, "w") as f:
        json.dump(result, f)


def train_tensors(batch):
    """A job's batch (lists of ids, PAD-padded) -> src, tgt_in, tgt_out as (B, L) long tensors."""
    return tuple(torch.tensor(batch[key], dtype=torch.long) for key in ("src", "tgt_in", "tgt_out"))


def time_train(step, batches, warmup):
    """Target tokens/s of step(src, tgt_in, tgt_out) over the batches after the first `warmup`;
    a batch's tokens are its non-PAD tgt_out tokens (EOS included), counted by the parent."""
    tensors = [train_tensors(b) for b in batches]
    for src, tgt_in, tgt_out in tensors[:warmup]:
        step(src, tgt_in, tgt_out)
    t0 = time.perf_counter()
    for src, tgt_in, tgt_out in tensors[warmup:]:
        step(src, tgt_in, tgt_out)
    seconds = time.perf_counter() - t0
    return sum(b["ntokens"] for b in batches[warmup:]) / seconds


def time_decode(decode, batches):
    """Source words/s of decode(src) -> output lengths, over batches of equal-length sources (lists
    of ids, no padding). The first batch is decoded once untimed (warm-up). Returns the speed and the
    generated tokens of each sentence (EOS included), in batch order."""
    tensors = [torch.tensor(b, dtype=torch.long) for b in batches]
    decode(tensors[0])
    lengths = []
    t0 = time.perf_counter()
    for src in tensors:
        lengths += decode(src)
    seconds = time.perf_counter() - t0
    return sum(t.numel() for t in tensors) / seconds, lengths


def run_measurements(job, train_step, decoder, num_params, tool, version):
    """The job's measurements, in the job's order -> the result dict.
    train_step(src, tgt_in, tgt_out) does one full step; decoder(beam) -> decode(src)."""
    result = {"tool": tool, "version": version, "params": num_params}
    for name in job["measurements"]:
        if name == "train":
            result["train_tok_s"] = time_train(train_step, job["train_batches"], job["warmup"])
        else:
            beam = 1 if name == "greedy" else job["beam"]
            speed, lengths = time_decode(decoder(beam), job["decode_batches"])
            result[f"{name}_words_s"], result[f"{name}_lengths"] = speed, lengths
    return result


def worker_main(argv, build, train_step_fn, decoder, count_params, tool, version):
    """A worker's main: the job's model build(config, seed), its measurements, the result file."""
    job, out = read_job(argv)
    cfg, seed = job["config"], job["seed"]
    model = build(cfg, seed)
    result = run_measurements(job, train_step_fn(model, cfg), decoder(cfg, seed), count_params(model), tool, version)
    write_result(result, out)
