"""deploy.py: the deployment table, each configuration decoded in a process of its own, on the
tiny random LSTM of test_beam.py (a teacher, the same model as student, and its 80%-pruned
sparse export)."""
import json
import os
from dataclasses import asdict

import deploy
import model as seqmodel
import prune
from test_beam import REF, SRC, tiny_lstm


def test_every_model_and_precision_gets_a_greedy_and_a_beam_row(tmp_path):
    m, sv, tv, cfg = tiny_lstm()
    ckpt = {"format": "seqkd", "arch": "lstm", "config": asdict(cfg),
            "vocab": {"src": sv.to_dict(), "tgt": tv.to_dict()}, "model": m.state_dict(), "args": {}}
    seqmodel.save_checkpoint(ckpt, tmp_path / "model.pt")
    prune.main(["--ckpt", str(tmp_path / "model.pt"), "--amount", "0.8", "--out", str(tmp_path / "pruned.pt"),
                "--export", str(tmp_path / "sparse.pt")])
    (tmp_path / "src.txt").write_text("\n".join(SRC) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REF) + "\n", encoding="utf-8")
    out = tmp_path / "deploy.md"
    rows = deploy.main(["--teacher", str(tmp_path / "model.pt"), "--student", str(tmp_path / "model.pt"),
                        "--pruned", str(tmp_path / "sparse.pt"), "--src", str(tmp_path / "src.txt"),
                        "--ref", str(tmp_path / "ref.txt"), "--rounds", "1", "--threads", "1", "--out", str(out)])
    assert [(r["model"], r["precision"], r["search"]) for r in rows] == [
        (name, precision, search) for name in ("teacher", "student", "pruned")
        for precision in ("fp32", "int8") for search in ("greedy", "beam 5")]
    by = {(r["model"], r["precision"], r["search"]): r for r in rows}
    for key in by:            # the teacher and the student are one checkpoint: the same numbers
        if key[0] == "student":
            assert by[key]["bleu"] == by[("teacher",) + key[1:]]["bleu"]
    fp32_beam = by["teacher", "fp32", "beam 5"]["words_per_s"]
    assert all(r["peak_mib"] > 50 and r["words_per_s"] > 0 for r in rows)     # torch alone is more than 50 MiB
    assert by["pruned", "fp32", "greedy"]["file_mib"] == os.path.getsize(tmp_path / "sparse.pt") / 2 ** 20
    table = out.read_text().splitlines()
    assert len(table) == 2 + len(rows) + 1
    assert f"| teacher | fp32 | beam 5 | {by['teacher', 'fp32', 'beam 5']['bleu']:.2f} | {fp32_beam:,.0f} " in table[3]
    assert "| 1.0x |" in table[3]
    assert len(json.loads(out.with_suffix(".json").read_text())) == len(rows)
