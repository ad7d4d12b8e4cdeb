"""
Preparing a public corpus: python prepare.py NAME --out DIR [--mirror URL] [--no-progress]

Downloads the standard public release of a corpus, checks the line count of every file,
unpacks what is packed, and writes the line-aligned files that train.py reads:

    python prepare.py wmt14-en-de --out data/wmt14
      -> data/wmt14/train.en  train.de   (4,468,840 tokenized pairs)
         data/wmt14/valid.en  valid.de   (newstest2012 + newstest2013, 6,003 pairs)
         data/wmt14/test.en   test.de    (newstest2014, 2,737 pairs)
         data/wmt14/raw/                 (the downloads as published, vocabularies included)

Downloads go through DIR/raw/NAME.part: a download that stops (network, Ctrl-C) continues where it stopped
when the same command is run again (an HTTP Range request). A file put into DIR/raw/ by hand is used as it
is, after the same line-count check. `--mirror URL` (or the environment variable SEQKD_MIRROR) replaces the
corpus's base URL: a local copy of the files, or, in tests/test_prepare.py, a small HTTP server on
127.0.0.1. Only the standard library (urllib) is used for downloading.
"""

import argparse
import gzip
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

from data import UserError, plural
from runs import write_atomically


@dataclass(frozen=True)
class RemoteFile:
    """One file of a published corpus (a .gz file is gunzipped; a tar archive gives its `member`)."""

    url_path: str               # its path under the corpus's base URL; downloaded to DIR/raw/<its last part>
    name: str                   # the text file it gives in DIR/raw/: the download, or what is unpacked
    lines: int | None           # the number of lines that text file must have (None: not checked)
    member: str | None = None   # the path inside a tar archive (.tar, .tgz, .tar.gz) of the file to extract


@dataclass(frozen=True)
class Corpus:
    """A published parallel corpus: where its files are and how they make the three splits."""

    about: str
    base_url: str
    src: str
    tgt: str
    files: tuple
    splits: dict        # {"train" | "valid" | "test": [stem, ...]}: split.LANG joins their DIR/raw/stem.LANG
    tokenized: bool     # the text is already tokenized: BLEU with --bleu-tokenize none


def _both_sides(stem, lines, src, tgt, packed=""):
    """The RemoteFiles stem.SRC and stem.TGT of one line-aligned pair (`packed`: e.g. ".gz")."""
    return tuple(RemoteFile(f"{stem}.{lang}{packed}", f"{stem}.{lang}", lines) for lang in (src, tgt))


CORPORA = {
    # Luong et al. (2015)'s preprocessed WMT'14 English-German, the data of Kim & Rush (2016):
    # tokenized text, newstest2012/2013 for validation, newstest2014 (the filtered 2,737-sentence
    # version) for the test. vocab.50K.* are the 50k-word vocabularies the papers used;
    # train.py builds the same-size vocabulary from train.* itself (--src-vocab-size 50000).
    "wmt14-en-de": Corpus(
        about="WMT'14 English-German, preprocessed by the Stanford NLP group (Luong et al., 2015)",
        base_url="https://nlp.stanford.edu/projects/nmt/data/wmt14.en-de/", src="en", tgt="de",
        files=(*_both_sides("train", 4_468_840, "en", "de"),
               *_both_sides("newstest2012", 3_003, "en", "de"),
               *_both_sides("newstest2013", 3_000, "en", "de"),
               *_both_sides("newstest2014", 2_737, "en", "de"), *_both_sides("vocab.50K", None, "en", "de")),
        splits={"train": ["train"], "valid": ["newstest2012", "newstest2013"], "test": ["newstest2014"]},
        tokenized=True),
    # The same group's IWSLT'15 English-Vietnamese (TED talks): tst2012 to validate, tst2013 to test.
    "iwslt15-en-vi": Corpus(
        about="IWSLT'15 English-Vietnamese, preprocessed by the Stanford NLP group (Luong & Manning, 2015)",
        base_url="https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/", src="en", tgt="vi",
        files=(*_both_sides("train", 133_317, "en", "vi"), *_both_sides("tst2012", 1_553, "en", "vi"),
               *_both_sides("tst2013", 1_268, "en", "vi"), *_both_sides("vocab", None, "en", "vi")),
        splits={"train": ["train"], "valid": ["tst2012"], "test": ["tst2013"]},
        tokenized=True),
    # Multi30k task 1 (image captions), the raw (untokenized, cased) text, gzipped.
    "multi30k": Corpus(
        about="Multi30k task 1 English-German, raw text (Elliott et al., 2016)",
        base_url="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/",
        src="en", tgt="de",
        files=(*_both_sides("train", 29_000, "en", "de", packed=".gz"),
               *_both_sides("val", 1_014, "en", "de", packed=".gz"),
               *_both_sides("test_2016_flickr", 1_000, "en", "de", packed=".gz")),
        splits={"train": ["train"], "valid": ["val"], "test": ["test_2016_flickr"]},
        tokenized=False),
}

DOWNLOAD_CHUNK = 1 << 20     # bytes read per network read (1 MiB)


def count_lines(path):
    """Lines of a file counted as read_lines() does: the "\\n"s, plus one for a last line
    without "\\n". Reads in blocks, so a multi-GB file needs little memory."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def download(url, path, progress=True):
    """Download `url` to `path` through `path`.part, continuing an existing .part with an HTTP Range
    request (a server that ignores Range sends the whole file: we start over). UserError when the
    server cannot be reached or answers with an error, or the connection stops early (the .part stays)."""
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "seqkd-data-prepare (Python urllib)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    by_hand = f"download it by hand to {path} and rerun"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:      # "range not satisfiable": the .part is already complete
            os.replace(part, path)
            return
        raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}; check the URL "
                        f"(--mirror / SEQKD_MIRROR) or {by_hand}") from None
    except (OSError, ValueError) as e:     # URLError is an OSError; ValueError: a malformed URL
        reason = getattr(e, "reason", e)
        raise UserError(f"could not reach {url}: {reason}; check your connection or {by_hand}") from None
    with response:
        if have and response.status != 206:    # Range ignored: the whole file comes again
            have = 0
        size = response.headers.get("Content-Length")
        total = have + int(size) if size is not None else None
        done = have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=os.path.basename(path), disable=None if progress else True)
        try:
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:     # connection reset, timeout
            raise UserError(f"download of {url} stopped after {done:,} bytes ({e}); run the same "
                            f"command again to resume it") from None
        finally:
            bar.close()
    if total is not None and done != total:
        raise UserError(f"download of {url} stopped after {done:,} of {total:,} bytes; run the "
                        f"same command again to resume it")
    os.replace(part, path)


def unpack(packed_path, remote, path):
    """Write the text file `path` from a downloaded .gz file or tar archive (remote.member)."""
    try:
        if remote.member is not None:
            with tarfile.open(packed_path) as archive:
                source = archive.extractfile(remote.member)
                if source is None:
                    raise KeyError(remote.member)
                _copy_to(source, path)
        else:
            with gzip.open(packed_path, "rb") as source:
                _copy_to(source, path)
    except KeyError:
        raise UserError(f"{packed_path} holds no {remote.member}; delete it and rerun to download "
                        f"it again") from None
    except (OSError, EOFError, tarfile.TarError) as e:     # gzip.BadGzipFile is an OSError
        raise UserError(f"{packed_path} cannot be unpacked ({e}); delete it and rerun to download "
                        f"it again") from None


def _copy_to(source, path):
    write_atomically(path, lambda out: shutil.copyfileobj(source, out, DOWNLOAD_CHUNK))


def fetch(remote, base_url, raw_dir, progress=True):
    """DIR/raw/remote.name, downloaded (and unpacked) unless it is there already; checks its
    line count (UserError naming the file when it differs). Returns its number of lines."""
    path = os.path.join(raw_dir, remote.name)
    if not os.path.exists(path):
        url = base_url.rstrip("/") + "/" + remote.url_path
        downloaded = os.path.join(raw_dir, os.path.basename(remote.url_path))
        if not os.path.exists(downloaded):
            download(url, downloaded, progress)
        if downloaded != path:
            unpack(downloaded, remote, path)
    n = count_lines(path)
    if remote.lines is not None and n != remote.lines:
        raise UserError(f"{path} has {n:,} lines, expected {remote.lines:,}: the file is incomplete "
                        f"or not the published one; delete it and rerun to download it again")
    return n


def _join_files(paths, out_path):
    """Concatenate text files into out_path (atomically), ending every file's last line."""
    def write(out):
        for path in paths:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, DOWNLOAD_CHUNK)
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        out.write(b"\n")
    write_atomically(out_path, write)


def prepare_corpus(name, out_dir, mirror=None, progress=True):
    """Download corpus NAME (a key of CORPORA), check it, and write OUT_DIR/{split}.{lang} for train, valid
    and test. mirror: a base URL used instead of the corpus's own (default: $SEQKD_MIRROR, else the
    official URL). Returns {split: (source path, target path, number of line pairs)}."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    base_url = mirror or os.environ.get("SEQKD_MIRROR") or corpus.base_url
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    print(f"{name}: {corpus.about}\n  from {base_url} into {raw_dir}")
    lines = {remote.name: fetch(remote, base_url, raw_dir, progress) for remote in corpus.files}

    written = {}
    for split, stems in corpus.splits.items():
        paths, counts = [], []
        for lang in (corpus.src, corpus.tgt):
            path = os.path.join(out_dir, f"{split}.{lang}")
            _join_files([os.path.join(raw_dir, f"{stem}.{lang}") for stem in stems], path)
            paths.append(path)
            counts.append(sum(lines[f"{stem}.{lang}"] for stem in stems))
        if counts[0] != counts[1]:
            raise UserError(f"{paths[0]} has {plural(counts[0], 'line')} but {paths[1]} has {counts[1]:,}; "
                            f"delete {raw_dir} and rerun")
        written[split] = (paths[0], paths[1], counts[0])
        print(f"  {split}: {paths[0]}, {paths[1]}: {counts[0]:,} line pairs ({' + '.join(stems)})")

    def flags(split):
        return f"--{split}-src {written[split][0]} --{split}-tgt {written[split][1]}"
    bleu = " --bleu-tokenize none" if corpus.tokenized else ""
    print(f"train on it with:\n  python train.py {flags('train')} {flags('valid')} {flags('test')}{bleu}")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="prepare.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download a public parallel corpus, check every file's line count, and write\n"
                    "DIR/{train,valid,test}.{SRC,TGT} for train.py (downloads to DIR/raw/ resume on rerun).",
        epilog="corpora:\n" + "\n".join(f"  {n}: {c.about}\n    {c.base_url}" for n, c in CORPORA.items()))
    parser.add_argument("name", choices=list(CORPORA), help="the corpus")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--mirror", metavar="URL",
                        help="download from URL/<file>, not the corpus's own site (default: $SEQKD_MIRROR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        return prepare_corpus(args.name, args.out, mirror=args.mirror, progress=not args.no_progress)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
