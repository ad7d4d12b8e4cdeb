"""Tests of flags.py, train.py's command line: the defaults that depend on other flags, the errors
of bad combinations, and what the flags name (text, model config). No training here."""
import os
from types import SimpleNamespace

import pytest

import data
from data import UserError
from flags import TRAIN_PRESETS, build_parser, check_model_flags, flag_name, make_model_config, resolve_defaults

FILES = ["--train-src", "c/train.en", "--train-tgt", "c/train.de", "--valid-src", "c/valid.en",
         "--valid-tgt", "c/valid.de"]    # resolve_defaults only looks at the names


def resolved(*argv):
    args = build_parser().parse_args([str(a) for a in argv])
    resolve_defaults(args)
    return args


def test_help_shows_the_usage_and_every_group():
    text = build_parser().format_help()
    assert text.startswith("usage: train.py") and "One optimisation step, whatever the recipe" in text
    for group in ["data (give none", "model (a preset", "optimisation:", "evaluation:", "checkpoints:",
                  "distillation (Word-KD"]:
        assert group in text, group


@pytest.mark.parametrize("argv, expected", [
    # the built-in corpus: its default preset brings its schedule
    ([], dict(builtin=True, preset="builtin", optim="adam", lr=0.005, batch_size=32, epochs=3, sentinels=0,
              normalize="tokens", name="builtin", save_dir="runs/builtin", src_vocab_size=50000)),
    (["--arch", "t5"], dict(preset="t5-builtin", optim="adafactor", lr=0.01, epochs=3, sentinels=100)),
    # your corpus without --preset: a kim-rush-student sized model with the plain defaults
    (FILES, dict(builtin=False, preset="kim-rush-student", optim="sgd", lr=1.0, epochs=10, batch_size=64,
                 normalize="tokens", decay_on_plateau=False, clip=5.0, name="train", save_dir="runs/train")),
    # a paper preset: Kim & Rush's schedule for every flag not given
    (FILES + ["--preset", "kim-rush-teacher"], dict(optim="sgd", lr=1.0, epochs=13, decay_after=8,
                                                    decay_on_plateau=True, normalize="sents", max_len=50)),
    # another optimizer drops the schedule's lr (it is for SGD), not the rest of the schedule
    (FILES + ["--preset", "kim-rush-teacher", "--optim", "adam"], dict(optim="adam", lr=1e-3, epochs=13)),
    (FILES + ["--preset", "kim-rush-teacher", "--epochs", 2, "--tokenizer", "spm"],
     dict(epochs=2, tokenizer="spm", src_vocab_size=50000)),     # a flag given wins over the schedule
    (FILES + ["--tokenizer", "spm"], dict(src_vocab_size=8000, tgt_vocab_size=8000)),
    (FILES + ["--batch-tokens", 900, "--max-steps", 5], dict(batch_size=None, batch_tokens=900, epochs=None)),
    (["--max-steps", 5], dict(epochs=3)),                           # the built-in schedule's epochs
    (["--teacher", "t.pt"], dict(kd="word", kd_alpha=0.5, relation_terms=None)),
    ([], dict(accum=1, label_smoothing=0.0, threads=None)),     # train.setup picks the threads on the CPU
    (["--teacher", "t.pt", "--kd", "relation"], dict(kd="relation", kd_alpha=None, relation_terms="miniend-d")),
    (["--span-corruption"], dict(sentinels=100, arch="lstm")),
])
def test_defaults_depend_on_the_other_flags(argv, expected):
    args = resolved(*argv)
    assert {name: getattr(args, name) for name in expected} == expected
    assert set(TRAIN_PRESETS["kim-rush-teacher"]) <= set(vars(args))


@pytest.mark.parametrize("argv, message", [
    (["--kd", "word"], "--kd word distils from a teacher: give --teacher CKPT"),
    (["--mono", "x.txt"], "--mono is the text of --span-corruption"),
    (FILES[:2], "give all four of --train-src --train-tgt --valid-src --valid-tgt"),
    (FILES + ["--test-src", "t.en"], "--test-src and --test-tgt go together"),
    (["--span-corruption", "--train-src", "x.txt"], "--span-corruption reads monolingual text"),
    (["--epochs", 0], "--epochs must be a positive number, got 0"),
    (["--warmup", -2], r"--warmup must be 0 \(none\) or a number of steps, got -2"),
    (["--noise-density", 1.5], "--noise-density must be between 0 and 1"),
    (["--relation-heads", 2], "--relation-terms/--relation-heads go with --kd relation"),
    (["--teacher", "t.pt", "--kd-alpha", 2], r"--kd-alpha must be in \[0, 1\]"),
    (["--teacher", "t.pt", "--kd", "relation", "--relation-terms", "minilm,bogus"], "unknown term 'bogus'"),
    (["--teacher", "t.pt", "--kd-temperature", 0], "--kd-temperature must be positive"),
    (["--teacher", "t.pt", "--kd", "relation", "--label-smoothing", 0.1], "--label-smoothing smooths the NLL of "
     "plain training and of --kd word, not the 'nll' term of --kd relation: drop --label-smoothing"),
])
def test_bad_combinations_are_one_line_user_errors(argv, message):
    with pytest.raises(UserError, match=message) as e:
        resolved(*argv)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--lr", -1], r"--lr must be positive and finite, got -1.0"),
    (["--lr", "nan"], r"--lr must be positive and finite, got nan"),
    (["--lr", "inf"], r"--lr must be positive and finite, got inf"),
    (["--dropout", 1.5], r"--dropout must be in \[0, 1\), got 1.5"),
    (["--dropout", 1.0], r"--dropout must be in \[0, 1\), got 1.0"),
    (["--dropout", -0.5], r"--dropout must be in \[0, 1\), got -0.5"),
    (["--weight-decay", -1], r"--weight-decay must be 0 or more and finite, got -1.0"),
    (["--clip", -1], r"--clip must be 0 or more and finite, got -1.0"),
    (["--clip", "nan"], r"--clip must be 0 or more and finite, got nan"),
    (["--lr-decay", 0], r"--lr-decay must be in \(0, 1\], got 0.0"),
    (["--lr-decay", 2], r"--lr-decay must be in \(0, 1\], got 2.0"),
    (["--decay-after", -1], r"--decay-after must be 0 or more, got -1"),
    (["--teacher", "t.pt", "--kd-alpha", "nan"], r"--kd-alpha must be in \[0, 1\], got nan"),
    (["--teacher", "t.pt", "--kd-temperature", "inf"], r"--kd-temperature must be positive and finite, got inf"),
    (["--noise-density", "nan"], r"--noise-density must be between 0 and 1, got nan"),
    (["--mean-span-length", "nan"], r"--mean-span-length must be positive and finite, got nan"),
    (["--mean-span-length", 0], r"--mean-span-length must be positive and finite, got 0.0"),
    (["--warmup", -1], r"--warmup must be 0 \(none\) or a number of steps, got -1"),
    (["--time-limit", -1], r"--time-limit must be positive and finite, got -1.0"),
    (["--seed", -1], r"--seed must be in \[0, 2\^32\), got -1"),
    (["--hidden", 0], r"--hidden must be a positive number, got 0"),
    (["--arch", "t5", "--d-model", -8], r"--d-model must be a positive number, got -8"),
    (["--batch-tokens", 0], r"--batch-tokens must be a positive number, got 0"),
    (["--tgt-vocab-size", 4], r"--tgt-vocab-size must be at least 5 \(the specials, the sentinels and a word\)"),
    (["--src-vocab-size", 0], r"--src-vocab-size must be at least 5 "),
    (["--arch", "t5", "--src-vocab-size", 100], r"--src-vocab-size must be at least 105 .*, got 100"),
    (["--accum", 0], r"--accum must be a positive number, got 0"),
    (["--label-smoothing", 1], r"--label-smoothing must be in \[0, 1\), got 1.0"),
    (["--label-smoothing", -0.1], r"--label-smoothing must be in \[0, 1\), got -0.1"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message) as e:
        resolved(*FILES, *argv)                      # (the files need not exist: nothing is read)
    assert "\n" not in str(e.value)


def test_numeric_flags_at_the_edges_of_their_ranges_are_accepted():
    args = resolved("--dropout", 0, "--clip", 0, "--lr-decay", 1, "--warmup", 0, "--weight-decay", 0,
                    "--teacher", "t.pt", "--kd-alpha", 1, "--seed", 0, "--decay-after", 0, "--src-vocab-size", 5)
    assert (args.dropout, args.clip, args.lr_decay, args.kd_alpha, args.src_vocab_size) == (0, 0, 1, 1, 5)
    assert resolved("--teacher", "t.pt", "--kd-alpha", 0).kd_alpha == 0


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be positive and finite, got -1.0"),
    (["--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["--dropout", "1.5"], r"--dropout must be in \[0, 1\), got 1.5"),
    (["--dropout", "1.0"], r"--dropout must be in \[0, 1\), got 1.0"),
    (["--dropout", "-0.5"], r"--dropout must be in \[0, 1\), got -0.5"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more and finite, got -1.0"),
    (["--save-dir", "FILE"], "--save-dir .*FILE: .*FILE is a file, not a folder; give another --save-dir"),
    (["--accum", "0"], "--accum must be a positive number, got 0"),
])
def test_train_main_fails_on_bad_numbers_and_save_dirs_before_any_data_is_read(tmp_path, extra, message):
    import train
    missing = [str(tmp_path / name) for name in ["missing.en", "missing.de"]] * 2   # never read
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / x) if x == "FILE" else x for x in extra]
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        train.main(["--train-src", missing[0], "--train-tgt", missing[1], "--valid-src", missing[2],
                    "--valid-tgt", missing[3], "--save-dir", str(tmp_path / "run"), *extra])


def test_save_dir_must_be_a_folder_this_process_can_write_in(tmp_path):
    (tmp_path / "file").write_text("x")
    for save_dir in [tmp_path / "file", tmp_path / "file" / "run"]:
        with pytest.raises(UserError, match=f"--save-dir {save_dir}: .*file is a file, not a folder") as e:
            resolved("--save-dir", save_dir)
        assert "\n" not in str(e.value)
    assert resolved("--save-dir", tmp_path / "new" / "run").save_dir == str(tmp_path / "new" / "run")
    if os.geteuid() != 0:                            # (root may write anywhere)
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(UserError, match="locked is a folder this process cannot write in"):
            resolved("--save-dir", tmp_path / "locked" / "run")


def test_model_flags_fit_the_architecture_and_the_checkpoint():
    assert flag_name("input_feed") == "--no-input-feed" and flag_name("emb_dim") == "--emb-dim"
    args = resolved("--arch", "t5", "--hidden", 8)
    with pytest.raises(UserError, match="--hidden is a flag of --arch lstm, but the model is t5; drop it"):
        check_model_flags(args, "t5", None, None)
    args = resolved("--layers", 2)
    check_model_flags(args, "lstm", {"layers": 2}, "--init x.pt")            # agrees: fine
    with pytest.raises(UserError, match=r"--layers \(2\) does not match --init x.pt, whose layers is 1"):
        check_model_flags(args, "lstm", {"layers": 1}, "--init x.pt")


def test_make_model_config_preset_then_flags_and_t5_embedding_sharing(capsys):
    src = data.WordVocab.build(["a b c"], 20)
    tgt = data.WordVocab.build(["x y"], 20)
    config = make_model_config(resolved("--preset", "tiny", "--hidden", 24), src, tgt)
    assert (config["hidden"], config["src_vocab"], config["tgt_vocab"]) == (24, len(src), len(tgt))
    joint = make_model_config(resolved("--arch", "t5", "--preset", "t5-tiny"), src, src)
    assert joint["share_embeddings"] is True and joint["src_vocab"] == joint["tgt_vocab"] == len(src)
    separate = make_model_config(SimpleNamespace(**vars(resolved("--arch", "t5", "--preset", "t5-tiny"))), src, tgt)
    assert separate["share_embeddings"] is False
    assert "share_embeddings=False" in capsys.readouterr().out


def test_help_examples_and_defaults_say_what_happens():
    text = build_parser().format_help()
    assert "--kd relation \\\n" in text                    # a continued example line, not two lines run together
    epochs = " ".join(text.split("\n  --epochs N", 1)[1].split("\n  --", 1)[0].split())
    assert f"{resolved().epochs} on the built-in corpus" in epochs and f"else {resolved(*FILES).epochs}," in epochs
    lr = " ".join(text.split("\n  --lr LR", 1)[1].split("\n  --", 1)[0].split())
    assert f"{resolved().lr} for the lstm on the built-in corpus" in lr


def test_keep_epochs_must_be_0_or_more():
    assert resolved().keep_epochs == 0
    with pytest.raises(UserError, match="^--keep-epochs must be 0 or more, got -1$"):
        resolved("--keep-epochs", -1)


def test_resume_keeps_the_resolved_flags_of_the_stopped_run(tmp_path):
    """A run on your corpus without --preset resolves --preset to kim-rush-student but takes none of
    its schedule; resuming it must not take that schedule either (it once added --decay-after 8)."""
    import torch

    import flags
    first = flags.parse_args(FILES + ["--optim", "adam", "--lr", "0.005", "--decay-on-plateau",
                                      "--save-dir", str(tmp_path)])
    assert first.preset == "kim-rush-student" and first.decay_after is None
    torch.save({"format": "seqkd", "model": {}, "args": vars(first)}, tmp_path / "last.pt")
    resumed = flags.parse_args(["--save-dir", str(tmp_path), "--resume"])
    assert resumed.decay_after is None
    assert {k: v for k, v in vars(resumed).items() if k != "resume"} == {
        k: v for k, v in vars(first).items() if k != "resume"}
