"""Tests of runs.py: atomic writes (a failed write changes nothing), the lock of a run folder or an
output file, the random-number state, the run record (SAVE_DIR/run.json), the CPU settings."""
import json
import os
import platform
import random
import re
import subprocess
import sys

import pytest
import torch

from data import UserError
from runs import (append_line, code_version, lock, restore_log, rng_states, set_cpu, set_rng_states,
                  write_atomically, write_json, write_run_record)


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the old checkpoint")

    def write_half_then_fail(f):
        f.write(b"half of a new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, write_half_then_fail)
    assert path.read_bytes() == b"the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]     # no temporary file left


def test_a_successful_write_replaces_the_file_and_creates_its_folder(tmp_path):
    path = tmp_path / "run" / "log.txt"                  # the folder does not exist yet
    write_atomically(path, lambda f: f.write("first\n"), mode="w")
    write_atomically(path, lambda f: f.write("second\n"), mode="w")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["log.txt"]
    write_json({"step": 3, "bleu": 81.5}, tmp_path / "metrics.json")
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text) == {"step": 3, "bleu": 81.5} and text.endswith("}\n")


def test_two_writers_of_one_file_use_two_temporary_files(tmp_path):
    """A second writer that starts and finishes while the first is writing: each writes its own
    temporary file, and the file holds the complete content of the one that finished last."""
    path = tmp_path / "best.pt"
    names = []

    def first(f):
        names.append(f.name)
        f.write(b"first, ")
        write_atomically(path, second)                  # the other writer, start to end
        assert path.read_bytes() == b"second"
        f.write(b"complete")

    def second(f):
        names.append(f.name)
        f.write(b"second")

    write_atomically(path, first)
    assert len(set(names)) == 2 and str(path) not in names
    assert path.read_bytes() == b"first, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_rng_states_round_trip_repeats_the_draws(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    states = rng_states()
    assert set(states) == {"torch", "cuda", "python"}
    draws = torch.rand(4), random.random(), torch.randint(0, 100, (3,))
    torch.rand(10)                                      # the streams move on ...
    random.random()
    set_rng_states(states)                              # ... and go back
    again = torch.rand(4), random.random(), torch.randint(0, 100, (3,))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and torch.equal(draws[2], again[2])
    # a checkpoint keeps them: saved, loaded with weights_only=True, set, the same draws again
    torch.save({"rng": states}, tmp_path / "last.pt")
    set_rng_states(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(4), draws[0]) and random.random() == draws[1]


def test_append_line_adds_one_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_line(path, '{"step": 5}')
    append_line(path, '{"step": 8}')
    assert path.read_text() == '{"step": 5}\n{"step": 8}\n'


def test_restore_log_keeps_the_rows_a_checkpoint_counts(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 5}\n{"step": 8}\n{"step": 1')          # the last row half-written
    assert restore_log(path, 2, {"step": 8}) == 2 and path.read_text() == '{"step": 5}\n{"step": 8}\n'
    path.write_text('{"step": 5}\n{"step": 8}\n{"step": 1')          # its checkpoint holds it whole
    assert restore_log(path, 3, {"step": 10}) == 3
    assert path.read_text() == '{"step": 5}\n{"step": 8}\n{"step": 10}\n'
    assert restore_log(path, 1, {"step": 5}) == 1 and path.read_text() == '{"step": 5}\n'
    assert restore_log(path, None, None) == 1                          # (a checkpoint without the count)
    assert restore_log(tmp_path / "new" / "log.jsonl", 0, None) == 0    # a new run: an empty log
    assert (tmp_path / "new" / "log.jsonl").read_text() == ""


# ---- the lock ---------------------------------------------------------------------------------


@pytest.fixture
def other_process():
    """A live process other than this one (as a second run on the same folder would be)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def ended_process():
    """The id of a process that has ended (as a run killed with kill -9): its lock is stale."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_the_lock_holds_the_process_id_and_is_removed_on_return_error_and_ctrl_c(tmp_path):
    path = tmp_path / "run" / ".lock"                  # the folder does not exist yet
    with lock(path, "the run folder run"):
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()
    for error in (RuntimeError, KeyboardInterrupt, UserError):
        with pytest.raises(error):
            with lock(path, "the run folder run"):
                raise error("stopped")
        assert not path.exists()
    with lock(path, "the run folder run"):             # taken again in the same process
        pass


def test_a_second_holder_while_the_first_lives_is_refused_in_one_line(tmp_path, other_process):
    path = tmp_path / ".lock"
    path.write_text(f"{other_process}\n")
    with pytest.raises(UserError) as e:
        with lock(path, f"the run folder {tmp_path}"):
            pytest.fail("the block must not run")
    assert str(e.value) == (f"the run folder {tmp_path} is in use by process {other_process} (lock file "
                            f"{path}): wait for it to end, or stop it")
    assert path.read_text() == f"{other_process}\n"    # still the first one's


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    path, pid = tmp_path / "out.txt.lock", ended_process()
    path.write_text(f"{pid}\n")
    with lock(path, "--out out.txt"):
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()
    message = capsys.readouterr().err
    assert message == f"--out out.txt: taking over the stale lock {path} (process {pid} is no longer running)\n"


def test_under_torchrun_only_process_0_takes_the_lock(tmp_path, monkeypatch, other_process):
    path = tmp_path / ".lock"
    path.write_text(f"{other_process}\n")              # process 0 holds it
    monkeypatch.setenv("RANK", "1")
    with lock(path, "the run folder"):
        assert path.read_text() == f"{other_process}\n"
    assert path.read_text() == f"{other_process}\n"


# ---- the run record ---------------------------------------------------------------------------


def test_the_run_record_keeps_the_start_and_appends_each_resumption(tmp_path, monkeypatch):
    path, cpu = tmp_path / "run.json", torch.device("cpu")
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.5"])
    first = write_run_record(path, {"lr": 0.5, "init": tmp_path / "a.pt", "model": {"hidden": 16}}, cpu, 1)
    assert json.loads(path.read_text()) == first and first["step"] == 0 and first["resumptions"] == []
    assert first["command"] == [sys.executable, "train.py", "--lr", "0.5"]
    assert first["settings"] == {"lr": 0.5, "init": str(tmp_path / "a.pt"), "model": {"hidden": 16}}  # a path: text
    assert re.fullmatch("[0-9a-f]{40}", first["code"]["commit"]) and first["code"]["dirty"] in (True, False)
    assert first["versions"]["torch"] == torch.__version__ and first["versions"]["python"] == platform.python_version()
    assert (first["device"]["device"], first["device"]["processes"], first["device"]["threads"]) == (
        "cpu", 1, torch.get_num_threads())
    if sys.platform.startswith("linux"):     # the CPU's model, as /proc/cpuinfo names it
        assert f"model name\t: {first['device']['name']}" in open("/proc/cpuinfo").read()
    monkeypatch.setattr(sys, "argv", ["train.py", "--resume", "--lr", "0.25"])
    again = write_run_record(path, {"lr": 0.25, "init": tmp_path / "a.pt", "model": {"hidden": 16}}, cpu, 1, 30)
    assert json.loads(path.read_text()) == again
    assert {k: again[k] for k in ["started", "command", "settings", "step"]} == {
        k: first[k] for k in ["started", "command", "settings", "step"]}             # the start, kept
    resumptions = [(r["step"], r["changed"], r["command"][2]) for r in again["resumptions"]]
    assert resumptions == [(30, {"lr": 0.25}, "--resume")]
    other = write_run_record(tmp_path / "old" / "run.json", {"lr": 0.5}, cpu, 1, 30)  # resumed, no record yet
    assert other["step"] == 30 and other["resumptions"] == [] and other["settings"] == {"lr": 0.5}


def test_code_version_of_a_folder_outside_git_is_none(tmp_path):
    assert code_version(tmp_path) == {"commit": None, "dirty": None}


def test_free_folder_is_the_first_numbered_folder_that_does_not_exist(tmp_path):
    from runs import free_folder
    base = tmp_path / "builtin"
    assert free_folder(base) == f"{base}-2" == free_folder(f"{base}/")
    (tmp_path / "builtin-2").mkdir()
    assert free_folder(base) == f"{base}-3"
    (tmp_path / "builtin-3").write_text("a file is taken too")
    assert free_folder(base) == free_folder(tmp_path / "builtin-2") == f"{base}-4"   # NAME-k: the next after k


def test_epoch_checkpoints_are_ordered_by_epoch_number(tmp_path):
    from runs import epoch_checkpoints
    for name in ["epoch10.pt", "epoch9.pt", "epoch2.pt", "epoch3.pt.tmp", "epochs.pt", "best.pt"]:
        (tmp_path / name).write_text("x")
    assert epoch_checkpoints(tmp_path) == [str(tmp_path / f"epoch{e}.pt") for e in (2, 9, 10)]
    assert epoch_checkpoints(tmp_path / "gone") == []


def test_set_cpu_sets_the_thread_count_and_on_linux_the_heap():
    before = torch.get_num_threads()
    try:
        applied = set_cpu(1)
        assert torch.get_num_threads() == 1
        assert applied == sys.platform.startswith("linux")   # glibc's mallopt accepted both settings
        set_cpu(None)                                   # no count given: the count is kept
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
