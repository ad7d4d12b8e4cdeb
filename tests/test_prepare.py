"""Tests for `python prepare.py` (prepare.py), without the internet.

A small HTTP server on 127.0.0.1 (a free port, in a thread) serves fixture files the tests
build in a temporary folder; it understands `Range: bytes=N-` requests (the standard library's
SimpleHTTPRequestHandler does not), can cut a response in half (a dropped connection) and can
ignore Range (a server without resume support). prepare_corpus runs against it with mirror=URL.
"""
import gzip
import http.server
import io
import os
import re
import socket
import sys
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import prepare  # noqa: E402
from data import UserError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The fixture server
# ---------------------------------------------------------------------------------------------


class FixtureServer:
    """Serves the files under `root` at http://127.0.0.1:PORT/NAME.
    requests: [(path, Range header or None)] of every GET, in order.
    cut:      paths whose response body is cut in half (the connection then closes).
    no_range: paths for which a Range header is ignored (the whole file, status 200)."""

    def __init__(self, root):
        self.root = Path(root)
        self.requests, self.cut, self.no_range = [], set(), set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                wanted = self.headers.get("Range")
                server.requests.append((self.path, wanted))
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                body = path.read_bytes()
                start = 0
                if wanted and self.path not in server.no_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if self.path in server.cut:
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)

            def log_message(self, *args):   # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # poll 50 ms

    def paths(self):
        return [path for path, _ in self.requests]


@pytest.fixture
def server(tmp_path):
    s = FixtureServer(tmp_path / "served")
    s.root.mkdir()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def lines_of(lang, stem, n):
    """n distinct fixture lines: 'en train 0', 'en train 1', ..."""
    return "".join(f"{lang} {stem} {i}\n" for i in range(n))


def closed_port_url():
    """http://127.0.0.1:PORT/ for a port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# A small corpus in the layout of the WMT14 release: plain text files, valid = two test sets.
TOY_COUNTS = {"train": 40, "newstest2012": 3, "newstest2013": 2, "newstest2014": 4}


@pytest.fixture
def small_wmt14(server, monkeypatch):
    """The real wmt14-en-de entry with the line counts of small fixture files, served."""
    real = prepare.CORPORA["wmt14-en-de"]
    files = tuple(replace(f, lines=TOY_COUNTS[f.name.rsplit(".", 1)[0]])
                  if f.lines is not None else f for f in real.files)
    monkeypatch.setitem(prepare.CORPORA, "wmt14-en-de", replace(real, files=files))
    for stem, n in TOY_COUNTS.items():
        for lang in ("en", "de"):
            (server.root / f"{stem}.{lang}").write_text(lines_of(lang, stem, n))
    for lang in ("en", "de"):
        (server.root / f"vocab.50K.{lang}").write_text("<unk>\n<s>\n</s>\nthe\n")
    # newstest2012.de without a final newline: joining it with newstest2013 must not merge lines
    (server.root / "newstest2012.de").write_text(lines_of("de", "newstest2012", 3).rstrip("\n"))
    return server


# ---------------------------------------------------------------------------------------------
# The corpus table
# ---------------------------------------------------------------------------------------------


def test_corpus_table_is_consistent():
    for name, corpus in prepare.CORPORA.items():
        by_name = {f.name: f for f in corpus.files}
        assert set(corpus.splits) == {"train", "valid", "test"}, name
        for stems in corpus.splits.values():
            for stem in stems:
                for lang in (corpus.src, corpus.tgt):
                    assert by_name[f"{stem}.{lang}"].lines > 0      # every split file is checked
        assert corpus.base_url.startswith("https://")
    wmt = prepare.CORPORA["wmt14-en-de"]
    assert wmt.splits["valid"] == ["newstest2012", "newstest2013"]
    assert {f.name: f.lines for f in wmt.files}["train.de"] == 4_468_840


def test_count_lines_matches_read_lines(tmp_path):
    for content in ["", "a\n", "a\nb", "a\n\nb\n", "x\r\ny\n"]:
        path = tmp_path / "f.txt"
        path.write_text(content)
        expected = len(data.read_lines(path)) if content.strip() else content.count("\n")
        assert prepare.count_lines(path) == expected, content


# ---------------------------------------------------------------------------------------------
# Preparing a corpus
# ---------------------------------------------------------------------------------------------


def test_multi30k_with_its_real_table_end_to_end(server, tmp_path):
    # The real multi30k entry: gzipped files with the real line counts (29,000 / 1,014 / 1,000).
    for stem, n in [("train", 29_000), ("val", 1_014), ("test_2016_flickr", 1_000)]:
        for lang in ("en", "de"):
            (server.root / f"{stem}.{lang}.gz").write_bytes(gzip.compress(lines_of(lang, stem, n).encode()))
    out = tmp_path / "m30k"
    written = prepare.prepare_corpus("multi30k", str(out), mirror=server.url, progress=False)

    assert {split: n for split, (_, _, n) in written.items()} == {"train": 29_000, "valid": 1_014,
                                                                  "test": 1_000}
    assert (out / "valid.de").read_text() == lines_of("de", "val", 1_014)
    assert (out / "test.en").read_text() == lines_of("en", "test_2016_flickr", 1_000)
    assert data.read_parallel(out / "train.en", out / "train.de")[28_999] == ("en train 28999",
                                                                             "de train 28999")
    assert sorted(server.paths()) == sorted(f"/{s}.{l}.gz" for s in ("train", "val", "test_2016_flickr")
                                            for l in ("en", "de"))
    assert not list((out / "raw").glob("*.part")) and not list((out / "raw").glob("*.tmp"))

    # A second run downloads nothing: the files in raw/ are checked and reused.
    server.requests.clear()
    prepare.prepare_corpus("multi30k", str(out), mirror=server.url, progress=False)
    assert server.requests == []


def test_wmt14_layout_valid_is_newstest2012_then_2013(small_wmt14, tmp_path, capsys):
    out = tmp_path / "wmt14"
    written = prepare.prepare_corpus("wmt14-en-de", str(out), mirror=small_wmt14.url, progress=False)
    assert written["valid"] == (str(out / "valid.en"), str(out / "valid.de"), 5)
    assert (out / "valid.de").read_text() == lines_of("de", "newstest2012", 3) + lines_of("de", "newstest2013", 2)
    assert (out / "test.en").read_text() == lines_of("en", "newstest2014", 4)
    assert (out / "raw" / "vocab.50K.de").exists()          # downloaded, not a split
    printed = capsys.readouterr().out
    assert f"--valid-src {out / 'valid.en'}" in printed and "--bleu-tokenize none" in printed


def test_an_interrupted_download_resumes_from_its_part_file(small_wmt14, tmp_path):
    full = (small_wmt14.root / "train.en").read_bytes()
    raw = tmp_path / "wmt14" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.en.part").write_bytes(full[: len(full) // 2])  # what an earlier run had fetched

    prepare.prepare_corpus("wmt14-en-de", str(tmp_path / "wmt14"), mirror=small_wmt14.url, progress=False)
    assert ("/train.en", f"bytes={len(full) // 2}-") in small_wmt14.requests
    assert (tmp_path / "wmt14" / "train.en").read_bytes() == full
    assert not (raw / "train.en.part").exists()


def test_a_dropped_connection_keeps_the_part_and_the_rerun_finishes_it(small_wmt14, tmp_path):
    out = str(tmp_path / "wmt14")
    small_wmt14.cut.add("/train.de")
    with pytest.raises(UserError, match=r"download of .*/train\.de stopped after .* bytes; run the "
                                        r"same command again to resume it") as e:
        prepare.prepare_corpus("wmt14-en-de", out, mirror=small_wmt14.url, progress=False)
    assert "\n" not in str(e.value)
    full = (small_wmt14.root / "train.de").read_bytes()
    part = Path(out) / "raw" / "train.de.part"
    assert part.read_bytes() == full[: len(full) // 2]

    small_wmt14.cut.clear()
    prepare.prepare_corpus("wmt14-en-de", out, mirror=small_wmt14.url, progress=False)
    assert ("/train.de", f"bytes={len(full) // 2}-") in small_wmt14.requests
    assert (Path(out) / "train.de").read_bytes() == full


def test_a_server_that_ignores_range_sends_everything_again(small_wmt14, tmp_path):
    full = (small_wmt14.root / "train.en").read_bytes()
    raw = tmp_path / "wmt14" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.en.part").write_bytes(b"garbage that must not stay at the front")
    small_wmt14.no_range.add("/train.en")
    prepare.prepare_corpus("wmt14-en-de", str(tmp_path / "wmt14"), mirror=small_wmt14.url, progress=False)
    assert (tmp_path / "wmt14" / "train.en").read_bytes() == full


def test_a_complete_part_file_is_taken_when_the_server_says_416(small_wmt14, tmp_path):
    raw = tmp_path / "wmt14" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.en.part").write_bytes((small_wmt14.root / "train.en").read_bytes())
    prepare.prepare_corpus("wmt14-en-de", str(tmp_path / "wmt14"), mirror=small_wmt14.url, progress=False)
    assert (tmp_path / "wmt14" / "train.en").read_text() == lines_of("en", "train", 40)


def test_a_wrong_line_count_is_reported(small_wmt14, tmp_path):
    (small_wmt14.root / "newstest2014.de").write_text(lines_of("de", "newstest2014", 5))   # 5, not 4
    with pytest.raises(UserError) as e:
        prepare.prepare_corpus("wmt14-en-de", str(tmp_path / "w"), mirror=small_wmt14.url, progress=False)
    msg = str(e.value)
    assert f"{tmp_path / 'w' / 'raw' / 'newstest2014.de'} has 5 lines, expected 4" in msg
    assert "delete it and rerun" in msg and "\n" not in msg


def test_a_file_put_into_raw_by_hand_is_used(small_wmt14, tmp_path):
    raw = tmp_path / "wmt14" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.en").write_text(lines_of("en", "by-hand", 40))
    prepare.prepare_corpus("wmt14-en-de", str(tmp_path / "wmt14"), mirror=small_wmt14.url, progress=False)
    assert "/train.en" not in small_wmt14.paths()
    assert (tmp_path / "wmt14" / "train.en").read_text() == lines_of("en", "by-hand", 40)


def test_a_tar_archive_member_is_extracted(server, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for lang in ("xx", "yy"):
            for stem, n in [("train", 6), ("dev", 2), ("test", 3)]:
                blob = lines_of(lang, stem, n).encode()
                info = tarfile.TarInfo(f"toy/{stem}.{lang}")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
    (server.root / "toy.tgz").write_bytes(buffer.getvalue())
    files = tuple(prepare.RemoteFile("toy.tgz", f"{stem}.{lang}", n, member=f"toy/{stem}.{lang}")
                  for stem, n in [("train", 6), ("dev", 2), ("test", 3)] for lang in ("xx", "yy"))
    toy = prepare.Corpus(about="toy", base_url="https://example.invalid/", src="xx", tgt="yy",
                      files=files, splits={"train": ["train"], "valid": ["dev"], "test": ["test"]},
                      tokenized=False)
    monkeypatch.setitem(prepare.CORPORA, "toy", toy)
    prepare.prepare_corpus("toy", str(tmp_path / "toy"), mirror=server.url, progress=False)
    assert server.paths() == ["/toy.tgz"]                  # one download for all six files
    assert (tmp_path / "toy" / "valid.yy").read_text() == lines_of("yy", "dev", 2)


# ---------------------------------------------------------------------------------------------
# Errors and the command line
# ---------------------------------------------------------------------------------------------


def test_an_unreachable_server_gives_one_line(tmp_path):
    url = closed_port_url()
    with pytest.raises(UserError) as e:
        prepare.prepare_corpus("multi30k", str(tmp_path / "m"), mirror=url, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"could not reach {url}train.en.gz: ")
    assert msg.endswith(f"check your connection or download it by hand to "
                        f"{tmp_path / 'm' / 'raw' / 'train.en.gz'} and rerun")
    assert "\n" not in msg


def test_a_missing_file_on_the_server_names_the_http_error(server, tmp_path):
    with pytest.raises(UserError, match=r"could not download http://127\.0\.0\.1:\d+/train\.en\.gz: "
                                        r"HTTP 404"):
        prepare.prepare_corpus("multi30k", str(tmp_path / "m"), mirror=server.url, progress=False)


def test_cli_uses_seqkd_mirror_and_reports_errors_in_one_line(small_wmt14, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQKD_MIRROR", small_wmt14.url)
    written = prepare.main(["wmt14-en-de", "--out", str(tmp_path / "w"), "--no-progress"])
    assert written["train"][2] == 40

    monkeypatch.setenv("SEQKD_MIRROR", closed_port_url())
    with pytest.raises(SystemExit) as e:
        prepare.main(["multi30k", "--out", str(tmp_path / "m"), "--no-progress"])
    assert str(e.value).startswith("error: could not reach ") and "\n" not in str(e.value)

    with pytest.raises(SystemExit):                          # argparse: unknown corpus name
        prepare.main(["wmt99", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'wmt99'" in capsys.readouterr().err
