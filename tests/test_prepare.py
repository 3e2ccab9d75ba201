"""data/prepare.py: the user's own text (files, directories, JSONL) into speedrun shards that the trainer reads.

The expected token stream is built here from the documents in the documented order, each encoded on its own, and
compared with what the shards hold; the shards are then read with the trainer's own loader and validation set."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import BOS, ROOT, subprocess_env
from data import prepare as prep
from data.shards import read_shard
from data.tokenizer import gpt2_tokenizer

SCRIPT = ROOT / "data" / "prepare.py"
BOM = "\ufeff".encode("utf-8")
WORDS = ["the", "model", "speedrun", "tokens", "naïve", "café", "日本語", "🙂", "x=1;", "don't", "we'll", "end.",
         "<|endoftext|>", "\u00a0nbsp", "42", "3.14", "Zürich", "tab\there"]
GAPS = [" ", " ", " ", " ", "\n", "\n\n", " \n", "\r\n", ", "]


def encode(text: str) -> list[int]:
    """A document's ids as prepare.py makes them: special-token text is plain text."""
    return gpt2_tokenizer()[0].encode_ordinary(text)


def decode(ids) -> str:
    return gpt2_tokenizer()[0].decode(list(ids))


def doc_text(rng: random.Random) -> str:
    """A short document: words (some multi-byte, one that looks like the EOT special token) and varied whitespace."""
    parts = []
    for _ in range(rng.randint(4, 14)):
        parts += [rng.choice(WORDS), rng.choice(GAPS)]
    return "".join(parts[:-1])


def put(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def make_corpus(root: Path, seed: int = 0, jsonl_docs: int = 80) -> tuple[list[Path], list[str]]:
    """Input paths (a directory, a loose file, and one of the directory's files again) and the non-empty documents
    in the order the module docstring promises: the arguments in order, a directory's files sorted part by part."""
    rng = random.Random(seed)
    docs = root / "docs"
    expected = []

    def text_file(rel: str) -> None:
        expected.append(doc_text(rng))
        put(docs / rel, expected[-1])

    text_file("a.txt")
    text_file("b/one.txt")
    text_file("b/two.MD")  # the default globs match case-insensitively
    text_file("b-c.txt")  # after b/*: directories compare by name, although "-" sorts before "/"
    lines = []
    for i in range(jsonl_docs):
        expected.append(doc_text(rng))
        lines.append(json.dumps({"id": i, "text": expected[-1]}, ensure_ascii=i % 2 == 0))
        if i % 17 == 3:
            lines.append("   ")  # blank lines are ignored
    put(docs / "c.jsonl", "\n".join(lines) + "\n")
    put(docs / "empty.txt", "")  # an empty document: skipped and counted
    text_file("z/deep/er.md")
    put(docs / "notes.rst", "not matched by the default globs")
    put(docs / ".hidden.txt", "hidden files are skipped")
    put(docs / ".git" / "x.txt", "hidden directories are skipped")
    expected.append(doc_text(rng))
    loose = put(root / "loose.txt", BOM + expected[-1].encode("utf-8"))  # a byte-order mark is dropped
    return [docs, loose, docs / "a.txt"], expected  # a.txt a second time: read once


def expected_stream(texts) -> np.ndarray:
    parts = [[BOS] + encode(t) for t in texts if t]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def documents(stream) -> list[tuple[int, ...]]:
    """A shard stream's documents, each from its BOS; the stream must start with one."""
    stream = np.asarray(stream)
    starts = np.flatnonzero(stream == BOS)
    assert stream.size == 0 or (starts.size and starts[0] == 0), "the shard does not start at a document"
    return [tuple(d.tolist()) for d in np.split(stream, starts[1:])] if stream.size else []


def check_split(val, trains, want) -> tuple[int, int]:
    """The shards hold each document of the expected stream once: whole in the validation shard, or whole in the
    train shards, which keep the reading order, or cut in two, its start in one and its rest (after a BOS of its
    own) in the other (the document that filled the validation shard; one from the end of the corpus that
    completed it). Returns (whole documents in validation, documents cut)."""
    val_docs, train_docs = documents(val), documents(np.concatenate(trains) if trains else [])
    left = list(val_docs)
    t = whole = cut = 0
    for doc in documents(want):
        if t < len(train_docs) and train_docs[t] == doc:
            t += 1
        elif doc in left:
            left.remove(doc)
            whole += 1
        else:
            nxt = train_docs[t] if t < len(train_docs) else ()
            head = next((v for v in left if doc[:len(v)] == v and (BOS, *doc[len(v):]) == nxt), None)  # val, train
            tail = next((v for v in left if len(nxt) < len(doc) and nxt == doc[:len(nxt)]
                         and v == (BOS, *doc[len(nxt):])), None)  # train, then val
            assert head is not None or tail is not None, f"document {decode(doc[1:])[:60]!r} is not in the shards"
            left.remove(head if head is not None else tail)
            t, cut = t + 1, cut + 1
    assert t == len(train_docs) and not left, "the shards hold tokens that are not the corpus's"
    assert cut <= 2
    return whole, cut


def shard_files(out: Path, name: str) -> tuple[list[Path], list[Path]]:
    return sorted(out.glob(f"{name}_val_*.bin")), sorted(out.glob(f"{name}_train_*.bin"))


def read_tokens(files) -> list[np.ndarray]:
    return [read_shard(f).astype(np.int64) for f in files]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def run_cli(args, cwd, text: bool = True) -> subprocess.CompletedProcess:
    """The script as a user runs it: by path, from another directory, without the repository on PYTHONPATH. text
    False: stdout and stderr as bytes, as written (text mode would turn a carriage return into a newline)."""
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=text, timeout=120)


ADDRESS_SPACE = 2 << 30  # a wrapped run may map this much (a run that works maps under 1 GiB)


def wrapped(prelude: str, args) -> list[str]:
    """The command that runs prepare.main(args) in a fresh interpreter after `prelude` (code, with `prep` imported).
    SIGINT gets Python's handler back: a suite started in the background (nohup ... &) ignores SIGINT, and its
    children inherit that. The address space is limited, so that a run that reads without end (/dev/zero) fails with
    MemoryError instead of filling the machine."""
    code = "\n".join([
        "import pathlib, resource, signal, sys",
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE}))",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "from data import prepare as prep",
        prelude,
        "sys.exit(prep.main(sys.argv[1:]))",
    ])
    return [sys.executable, "-c", code, *map(str, args)]


HANG = 20  # a run that takes this many times cli_seconds is taken to hang


@pytest.fixture(scope="module")
def cli_seconds(tmp_path_factory) -> float:
    """How long a whole wrapped run on a small corpus takes here (start-up, tokenizer, two workers): the unit of this
    file's time bounds, so that they follow the machine and its load. A run that hangs takes many times this."""
    root = tmp_path_factory.mktemp("timing")
    paths, _ = make_corpus(root)
    start = time.monotonic()
    res = subprocess.run(wrapped("", [*paths, "--out-dir", root / "out", "--val-tokens", 256, "--workers", 2,
                                      "--quiet"]), cwd=root, env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return time.monotonic() - start


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root)


# ----------------------------------------------------------------------------------------------------------------------
# The token stream


def test_shards_hold_the_documents_in_order_each_after_a_bos(corpus, tmp_path):
    assert encode("Hello world") == [15496, 995]  # GPT-2's ids, whichever source the vocabulary came from
    paths, texts = corpus
    out = tmp_path / "mine"
    result = prep.prepare(paths, out, val_tokens=512, shard_tokens=300, workers=1, quiet=True)
    want = expected_stream(texts)
    assert want.size >= 2 * 512 + 1, "corpus too small for this test"

    val_files, train_files = shard_files(out, "mine")  # the name defaults to the directory's
    assert [f.name for f in val_files] == ["mine_val_000000.bin"]
    assert [f.name for f in train_files] == [f"mine_train_{i:06d}.bin" for i in range(1, len(train_files) + 1)]
    val, trains = read_tokens(val_files)[0], read_tokens(train_files)
    assert val.size == 512 + 1  # val_tokens predictions need one more token for the last target
    assert all(t.size == 300 for t in trains[:-1]) and 0 < trains[-1].size <= 300
    whole, cut = check_split(val, trains, want)
    # "<|endoftext|>" inside a document is plain text, never token 50256: one BOS per document, one more per cut
    assert sum(len(documents(x)) for x in [val, np.concatenate(trains)]) == len(texts) + cut
    assert {decode(d[1:]) for d in documents(np.concatenate(trains))} < set(texts) | {""} or cut
    # validation documents come from across the corpus, not from its start only
    where = [texts.index(decode(d[1:])) for d in documents(val) if decode(d[1:]) in texts]
    assert whole >= 3 and max(where) - min(where) > len(texts) // 2, where

    manifest = json.loads((out / "manifest.json").read_text())
    assert result["out_dir"] == str(out) and {k: result[k] for k in manifest} == manifest
    assert manifest["name"] == "mine" and manifest["bos_id"] == BOS
    assert manifest["documents"] == len(texts) and manifest["empty_documents"] == 1  # empty.txt
    assert manifest["files"] == 8  # a, b/one, b/two, b-c, c.jsonl, empty, z/deep/er, loose: not rst, not hidden
    assert manifest["tokens"] == want.size and manifest["val_tokens"] == 512
    assert manifest["train_tokens"] == want.size - 513 + cut  # a BOS before each cut document's rest
    assert manifest["val_documents"] >= whole and manifest["val_tail_tokens"] == 0
    assert manifest["shards"] == [f.name for f in val_files + train_files]
    assert manifest["shard_sizes"] == [513] + [t.size for t in trains]
    assert [(i["type"], i["files"]) for i in manifest["inputs"]] == [("directory", 7), ("file", 1), ("file", 0)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_output_is_identical_for_one_and_two_workers(corpus, tmp_path, monkeypatch):
    # Tiny batches and pieces: many batches in flight at once, and documents split into pieces, so that order matters.
    monkeypatch.setattr(prep, "BATCH_ITEMS", 2)
    monkeypatch.setattr(prep, "BATCH_BYTES", 200)
    monkeypatch.setattr(prep, "PIECE_CHARS", 30)
    monkeypatch.setattr(prep, "READ_BYTES", 16)
    paths, texts = corpus
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        prep.prepare(paths, outs[workers], name="corpus", val_tokens=256, shard_tokens=500, workers=workers,
                     quiet=True)
    one, two = snapshot(outs[1]), snapshot(outs[2])
    assert one.keys() == two.keys() and len(one) >= 4
    for name in one:
        assert one[name] == two[name], f"{name} differs between --workers 1 and 2"
    val_files, train_files = shard_files(outs[2], "corpus")
    check_split(read_tokens(val_files)[0], read_tokens(train_files), expected_stream(texts))


def cuts(pieces) -> list[int]:
    """Where text_pieces cut the document: the character offsets between its pieces."""
    ends = np.cumsum([len(p) for p, _ in pieces]).tolist()
    return ends[:-1]


def test_a_long_document_is_tokenised_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PIECE_CHARS", 60)
    monkeypatch.setattr(prep, "READ_BYTES", 7)  # splits multi-byte characters across reads
    rng = random.Random(5)
    atoms = ["word", " word", "Word", "\n", "\n\n", "\r\n", " \n", "\n ", "\t", "don't", "'s", "\n's", "\u3000", "é",
             "日本", "🙂", ".", "!!", "42", "\u00a0", "\u2028", "\x85", "  ", " 's"]
    text = "".join(rng.choice(atoms) for _ in range(4000))
    path = put(tmp_path / "in" / "long.txt", BOM + text.encode("utf-8"))

    pieces = list(prep.text_pieces(path))
    assert len(pieces) > 100 and max(len(p) for p, _ in pieces) <= 60
    assert "".join(p for p, _ in pieces) == text
    assert sum(n for _, n in pieces) == path.stat().st_size
    assert all(text[c] in " \n" and not text[c + 1].isspace() for c in cuts(pieces))  # every cut a safe one
    assert sum((encode(p) for p, _ in pieces), []) == encode(text)

    out = tmp_path / "out"
    m = prep.prepare([path], out, val_tokens=100, shard_tokens=10_000, workers=2, quiet=True)
    val_files, train_files = shard_files(out, "out")
    assert check_split(read_tokens(val_files)[0], read_tokens(train_files), [BOS] + encode(text))[1] == 1
    assert m["val_documents"] + (m["val_tail_tokens"] > 0) == 1  # one document: it gives the validation its part


def prose_line(rng: random.Random, chars: int) -> str:
    """One line of prose-like text, no newline: words (contractions, numbers, accents, CJK), punctuation, runs of
    spaces, tabs and no-break spaces between them."""
    words = ["the", "speedrun", "naïve", "don't", "it's", "we'll", "42", "3.14", "日本語", "🙂", "x=1;", "(see", "it)",
             "—", "'quoted'", "end.", "Zürich", "<|endoftext|>"]
    gaps = [" "] * 8 + ["  ", "   ", "\t", " \t", "\u00a0", ", ", ". "]
    parts, n = [], 0
    while n < chars:
        parts += [rng.choice(words), rng.choice(gaps)]
        n += len(parts[-2]) + len(parts[-1])
    return "".join(parts)


def test_a_line_without_end_is_cut_before_spaces_and_tokenises_as_read_whole(tmp_path, monkeypatch):
    """One 40,000-character line read in pieces of at most 50: cut before a space, so each piece's tokens joined are
    the tokens of the line read whole (GPT-2 joins a space to the word after it: the cut goes before it)."""
    monkeypatch.setattr(prep, "PIECE_CHARS", 50)
    monkeypatch.setattr(prep, "READ_BYTES", 7)
    text = prose_line(random.Random(8), 40_000)
    path = put(tmp_path / "in" / "line.txt", text)
    pieces = list(prep.text_pieces(path))
    assert "\n" not in text and len(pieces) > 40_000 // 50 and max(len(p) for p, _ in pieces) <= 50
    assert "".join(p for p, _ in pieces) == text and sum(n for _, n in pieces) == path.stat().st_size
    assert all(text[c] == " " for c in cuts(pieces))
    assert sum((encode(p) for p, _ in pieces), []) == encode(text)


def test_text_without_whitespace_is_cut_at_the_piece_size(tmp_path, monkeypatch):
    """No space or newline anywhere: pieces of exactly PIECE_CHARS characters (never a split character), nothing
    lost, and the document's tokens (one BOS, then its pieces') still decode to its text."""
    monkeypatch.setattr(prep, "PIECE_CHARS", 50)
    monkeypatch.setattr(prep, "READ_BYTES", 7)
    text = "".join(random.Random(9).choice(["日本語", "🙂", "abc", "é", "-+", "42"]) for _ in range(2_000))
    path = put(tmp_path / "in" / "blob.txt", text)
    pieces = list(prep.text_pieces(path))
    assert [len(p) for p, _ in pieces[:-1]] == [50] * (len(text) // 50 - (len(text) % 50 == 0))
    assert "".join(p for p, _ in pieces) == text and sum(n for _, n in pieces) == path.stat().st_size
    work = [(prep.TEXT_START if i == 0 else prep.TEXT_MORE, piece) for i, (piece, _) in enumerate(pieces)]
    tokens, outcomes = prep.tokenise_batch(work, "text")
    assert tokens[0] == BOS and BOS not in tokens[1:] and sum(outcomes) == tokens.size
    assert gpt2_tokenizer()[0].decode_bytes(tokens[1:].tolist()) == text.encode("utf-8")


def test_safe_cut_before_a_space_or_newline_that_a_non_space_follows():
    assert prep.safe_cut("ab\ncd\nef") == 5  # the last newline before a non-space: the cut is just before it
    assert prep.safe_cut("ab cd ef") == 5 and prep.safe_cut("ab  cd") == 3  # before the space that joins "cd"
    assert prep.safe_cut("ab\ncd\n ef") == 6  # the space before "ef" (a newline before a space is not a cut)
    assert prep.safe_cut("ab \t\ncd") == 4  # after any run of whitespace
    assert prep.safe_cut("ab cd\t") == 2 and prep.safe_cut("abcd ") == 0  # nothing after the last space yet
    assert prep.safe_cut(" ab") == 0 and prep.safe_cut("abcd") == 0  # never at 0, and none without whitespace
    assert prep.safe_cut("ab cd ef", lo=3) == 5 and prep.safe_cut("ab cd ef", lo=6) == 0
    assert prep.safe_cut("ab cd ef", hi=4) == 2 and prep.safe_cut("ab cd ef", hi=5) == 5  # a cut at hi counts


def test_safe_cuts_keep_the_tokens():
    """At every position safe_cut allows, the two parts' tokens are the whole's, over texts of whitespace of all
    kinds, contractions and punctuation; and it allows the last such position."""
    rng = random.Random(11)
    atoms = ["word", " word", "\n", "\n\n", "\r\n", " \n", "\t", "  ", " ", "'s", " 's", "'ll", "don't", "\u3000",
             "\u00a0", "\x85", "\x1c", ".", " .", "42", " 42", "日本", "🙂", "\x0b", "\x0c", "\r"]
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(2, 25)))
        allowed = [c for c in range(1, len(text)) if prep.safe_cut(text, c, c) == c]
        assert prep.safe_cut(text) == max(allowed, default=0)
        for c in allowed:
            assert encode(text[:c]) + encode(text[c:]) == encode(text), (text, c)
        checked += len(allowed)
    assert checked > 1000


# ----------------------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_with_a_custom_field(tmp_path):
    rng = random.Random(2)
    texts = [doc_text(rng) for _ in range(60)]
    lines = [json.dumps({"body": t, "text": "not this one", "meta": {"n": i}}) for i, t in enumerate(texts)]
    lines.insert(10, json.dumps({"body": ""}))  # an empty document
    path = put(tmp_path / "rows.jsonl", "\r\n".join(lines) + "\r\n\r\n")
    out = tmp_path / "out"
    m = prep.prepare([path], out, name="rows", field="body", val_tokens=128, workers=1, quiet=True)
    val_files, train_files = shard_files(out, "rows")
    check_split(read_tokens(val_files)[0], read_tokens(train_files), expected_stream(texts))
    assert (m["documents"], m["empty_documents"], m["bad_lines"], m["field"]) == (60, 1, 0, "body")


BAD_LINES = [
    ("this is not json", "not valid JSON"),
    ('{"text": "unterminated', "not valid JSON"),
    ('{"txt": "typo"}', "no 'text' field"),
    ('{"text": 42}', "is a number, not a string"),
    ('["text", "in", "an", "array"]', "not a JSON object"),
]


@pytest.mark.parametrize("line,words", BAD_LINES)
def test_a_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, words, capsys):
    path = put(tmp_path / "rows.jsonl", "\n".join(['{"text": "fine"}', "", line, '{"text": "also fine"}']) + "\n")
    out = tmp_path / "out"
    assert prep.main([str(path), "--out-dir", str(out), "--val-tokens", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: " in err and words in err and "--skip-bad-lines" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_skip_bad_lines_counts_them(tmp_path):
    rng = random.Random(3)
    texts = [doc_text(rng) for _ in range(30)]
    lines = [json.dumps({"text": t}) for t in texts]
    for i, (bad, _) in enumerate(BAD_LINES):
        lines.insert(3 * i + 1, bad)
    path = put(tmp_path / "rows.jsonl", "\n".join(lines))
    out = tmp_path / "out"
    m = prep.prepare([path], out, val_tokens=64, workers=1, skip_bad_lines=True, quiet=True)
    assert (m["documents"], m["bad_lines"]) == (30, len(BAD_LINES))
    assert m["inputs"][0]["bad_lines"] == len(BAD_LINES)
    val_files, train_files = shard_files(out, "out")
    check_split(read_tokens(val_files)[0], read_tokens(train_files), expected_stream(texts))


def test_a_jsonl_line_over_the_limit_is_a_bad_line_read_past_in_pieces(tmp_path, monkeypatch, capsys):
    """A JSON line is parsed whole, so one longer than JSONL_LINE_BYTES is refused, naming file and line; with
    --skip-bad-lines it is skipped and counted, and the lines after it are read as usual. The reader never holds
    more than the limit of it."""
    monkeypatch.setattr(prep, "JSONL_LINE_BYTES", 64)
    texts = ["short one", "x" * 40, "after the long line"]
    lines = [json.dumps({"text": texts[0]}), json.dumps({"text": "y" * 1000}), json.dumps({"text": texts[1]}),
             json.dumps({"text": "z" * 200}), json.dumps({"text": texts[2]})]
    path = put(tmp_path / "rows.jsonl", "\n".join(lines) + "\n")
    read = list(prep.jsonl_lines(path))
    assert [(n, line is None) for n, line, _ in read] == [(1, False), (2, True), (3, False), (4, True), (5, False)]
    assert sum(size for _, _, size in read) == path.stat().st_size

    args = [str(path), "--out-dir", str(tmp_path / "out"), "--val-tokens", "4", "--workers", "1"]
    assert prep.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2: longer than 64 bytes, the longest JSON line read" in err
    assert "save a document that long as one" in err and "--skip-bad-lines" in err
    assert prep.main([*args, "--skip-bad-lines"]) == 0
    assert "3 documents" in capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["documents"], m["bad_lines"]) == (3, 2)
    val_files, train_files = shard_files(tmp_path / "out", "out")
    check_split(read_tokens(val_files)[0], read_tokens(train_files), expected_stream(texts))


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n"])
def test_a_jsonl_line_at_the_limit_is_read(tmp_path, monkeypatch, tail):
    """The limit counts the line's bytes with its line end: a line of exactly JSONL_LINE_BYTES is read, one byte
    more is too long, whether or not the file ends there."""
    line = json.dumps({"text": "a" * 40}).encode("utf-8") + tail
    lines = [line, line] if tail else [line]  # without a line end, the last line of the file
    path = put(tmp_path / "rows.jsonl", b"".join(lines))
    monkeypatch.setattr(prep, "JSONL_LINE_BYTES", len(line))
    assert [text for _, text, _ in prep.jsonl_lines(path)] == lines
    monkeypatch.setattr(prep, "JSONL_LINE_BYTES", len(line) - 1)
    assert [(text, size) for _, text, size in prep.jsonl_lines(path)] == [(None, len(line))] * len(lines)


def test_a_long_json_document_is_tokenised_in_pieces_with_the_same_tokens(monkeypatch):
    """A JSON line's text is tokenised PIECE_CHARS at a time in the worker (never one long list of ints), with the
    tokens of the whole."""
    monkeypatch.setattr(prep, "PIECE_CHARS", 50)
    text = prose_line(random.Random(12), 5_000)
    tokens, outcomes = prep.tokenise_batch([(prep.JSONL, json.dumps({"text": text}).encode("utf-8"))], "text")
    assert tokens.tolist() == [BOS] + encode(text) and outcomes == [tokens.size]


# ----------------------------------------------------------------------------------------------------------------------
# The command line and its errors


@pytest.mark.slow
def test_command_line_run_matches_the_function(corpus, tmp_path):
    paths, texts = corpus
    ref = tmp_path / "ref"
    prep.prepare(paths, ref, name="mine", val_tokens=512, shard_tokens=300, workers=1, quiet=True)
    out = tmp_path / "cli" / "mine"
    res = run_cli([*paths, "--out-dir", out, "--val-tokens", 512, "--shard-tokens", 300, "--workers", 2], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "tokenising" in res.stderr  # the progress bar
    assert f"{len(texts):,} documents" in res.stdout and "documents sampled across the corpus" in res.stdout
    assert snapshot(out) == snapshot(ref)


def printed_commands(stdout: str) -> dict[str, list[str]]:
    """The commands prepare.py prints after "train on it", by their first two words."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("train on it"))
    commands = [line.split(":  ", 1)[1].split() for line in lines[start + 1:]]
    return {" ".join(c[:2]) if c[0] == "python" else " ".join(c[:2]) + (" local" if "--local" in c else ""): c
            for c in commands}


@pytest.mark.slow
@pytest.mark.parametrize("val_tokens", [None, 1000])
def test_the_printed_commands_run_as_printed(tmp_path, val_tokens):
    """The printed trainer command trains on the corpus (here for 2 of its steps), the ./train.sh forms are the same
    words, and the GPU form's --val-tokens suits --preset auto on any GPUs."""
    paths, _ = make_corpus(tmp_path / "c", seed=4, jsonl_docs=700)
    out = tmp_path / "my texts" / "mine"  # a space: the commands quote the path
    flags = [] if val_tokens is None else ["--val-tokens", val_tokens]
    res = run_cli([*paths, "--out-dir", out, "--workers", 1, *flags], tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val_tokens"] == (prep.VAL_MIN_TOKENS if val_tokens is None else val_tokens)
    cmds = printed_commands(res.stdout.replace(f"'{out}'", "OUT"))
    python = cmds["python train_gpt.py"]
    assert cmds["./train.sh --local local"][1:] == ["--local", *python[2:]]
    words = [str(out) if w == "OUT" else w for w in python[2:]]
    run = subprocess.run([sys.executable, "train_gpt.py", *words, "--num-iterations", "2", "--log-dir",
                          str(tmp_path / "logs"), "--checkpoint-dir", str(tmp_path / "ck"), "--run-name", "r"],
                         cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "its manifest names" in run.stderr and "step:2/2 val_loss:" in run.stdout
    gpu = [str(out) if w == "OUT" else w for w in cmds["./train.sh --data-dir"][1:]]
    hp = tg.parse_args(["--preset", "auto", *gpu])
    for count in (1, 8):
        h100 = [tg.GPUInfo("NVIDIA H100 80GB HBM3", 79.2, 78.6, (9, 0))] * count
        tg.check_hyperparameters(tg.fit_to_gpus(hp, h100, count)[0], count)


def test_the_tiny_training_tokens_are_the_presets():
    """prepare.py does not import the trainer: its copy of the tiny preset's numbers must agree with the preset."""
    hp = tg.preset_hyperparameters("tiny")
    assert prep.TINY_TRAIN_TOKENS == hp.num_iterations * hp.global_batch_tokens == 409_600
    assert prep.VAL_MIN_TOKENS == hp.val_seq_len


@pytest.mark.parametrize("shard,tiny", [
    (prep.default_val_tokens(int(3.8 * 2**20)), 40_960),  # a 3.8 MiB corpus: a shard of 49,152, validated 9 times
    (prep.VAL_TOKENS, 40_960),  # the most: a tenth of 409,600 in 4,096-token chunks
    (40_960, 40_960), (12_288, 12_288), (10_000, 8_192), (4_096, 4_096),  # no more than the shard holds
])
def test_the_tiny_command_validates_on_at_most_a_tenth_of_its_training(tmp_path, shard, tiny):
    cmds = dict(prep.train_commands(tmp_path, shard))
    local, gpu = cmds["the tiny model, minutes on a CPU"], cmds["GPUs: the record's recipe fitted to them"]
    assert local.endswith(f"--preset tiny --data-dir {tmp_path} --val-tokens {tiny}")
    assert tiny <= shard and tiny % 4096 == 0 and tiny <= 0.1 * prep.TINY_TRAIN_TOKENS
    assert gpu.endswith(f"--val-tokens {shard // 128 * 128}")  # on GPUs: the whole shard, as before


def test_a_shard_below_one_tiny_chunk_validates_in_one_chunk_of_its_size(tmp_path):
    cmds = dict(prep.train_commands(tmp_path, 1000))
    assert cmds["the tiny model, minutes on a CPU"].endswith("--val-tokens 1000 --val-seq-len 1000")


def test_the_summary_says_why_the_tiny_run_validates_on_less(tmp_path, capsys):
    put(tmp_path / "in" / "a.txt", prose_line(random.Random(14), 250_000))  # about 130,000 tokens
    assert prep.main([str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"), "--val-tokens", "8192"]) == 0
    assert "train on it:" in capsys.readouterr().out  # the whole shard: nothing to explain
    assert prep.main([str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"), "--val-tokens", "49152",
                      "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "train on it (the tiny run validates on 40,960 of the 49,152 validation tokens: at most a tenth of the " \
           "409,600 it trains on):" in out
    assert printed_commands(out)["python train_gpt.py"][-2:] == ["--val-tokens", "40960"]


def test_progress_on_a_pipe_is_whole_lines(tmp_path):
    """Where stderr is not a terminal (a pipe here, a log file), the progress bar writes whole lines: no carriage
    return redraws."""
    paths, _ = make_corpus(tmp_path / "c", seed=15)
    res = run_cli([*paths, "--out-dir", tmp_path / "out", "--val-tokens", 256, "--workers", 1], tmp_path, text=False)
    assert res.returncode == 0, res.stderr
    assert b"tokenising" in res.stderr and b"\r" not in res.stderr
    assert all(line.startswith(b"tokenising") for line in res.stderr.splitlines())


def test_help_prints_the_docstring_and_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: prepare.py")
    assert prep.__doc__.splitlines()[0] in out and "(default: 5% of the corpus's estimated tokens" in out


def test_abbreviated_flags_are_errors(tmp_path, capsys):
    """--val-token is not silently --val-tokens."""
    path = put(tmp_path / "a.txt", "some text " * 50)
    with pytest.raises(SystemExit) as exit_info:
        prep.main([str(path), "--out-dir", str(tmp_path / "out"), "--val-token", "8"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --val-token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_val_tokens_follow_the_corpus_size():
    assert prep.default_val_tokens(0) == prep.default_val_tokens(300_000) == 4096  # at least 4,096
    assert prep.default_val_tokens(10 << 20) == 131_072 - 131_072 % 4096 == 131_072  # 10 MiB: ~2.6M tokens, 5%
    assert prep.default_val_tokens(1 << 30) == prep.VAL_TOKENS  # at most the trainer's
    for size in (1, 12345, 10**7, 10**9):
        assert prep.default_val_tokens(size) % 4096 == 0


def test_sampling_is_a_fixed_draw_at_the_rate():
    n = 100_000
    for rate in (0.0, 0.01, 0.3, 1.0):
        picked = sum(prep.sampled(i, rate) for i in range(n))
        # a binomial count: within 5 standard deviations of n x rate
        assert abs(picked - n * rate) <= 5 * (n * rate * (1 - rate)) ** 0.5 + 1e-9, (rate, picked)
    assert [prep.sampled(i, 0.5) for i in range(50)] == [prep.sampled(i, 0.5) for i in range(50)]


def test_a_short_validation_shard_is_completed_from_the_end(corpus, tmp_path, monkeypatch):
    """Sampling far too slowly (as a corpus much larger in tokens than its bytes suggest would): the shard takes
    the end of the corpus, from a document start, and every document stays whole or cut once."""
    monkeypatch.setattr(prep, "VAL_SPARE", 0.01)
    paths, texts = corpus
    m = prep.prepare(paths, tmp_path / "out", val_tokens=600, shard_tokens=400, workers=1, quiet=True)
    val_files, train_files = shard_files(tmp_path / "out", "out")
    val = read_tokens(val_files)[0]
    assert val.size == 601 and m["val_tail_tokens"] > 0
    check_split(val, read_tokens(train_files), expected_stream(texts))
    assert decode(documents(val)[-1][1:]) in texts[-3:] or m["val_tail_tokens"] < 601  # the tail is the corpus's end


def test_skip_bad_files_leaves_them_out_with_a_warning(corpus, tmp_path, capsys):
    paths, texts = corpus
    bad = put(tmp_path / "more" / "latin1.txt", "café crème".encode("latin-1"))
    put(tmp_path / "more" / "fine.txt", "fine text")
    args = [*map(str, paths), str(tmp_path / "more"), "--out-dir", str(tmp_path / "out"), "--val-tokens", "256"]
    assert prep.main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not UTF-8 text (invalid byte at offset 3)" in err and "--skip-bad-files" in err
    assert prep.main([*args, "--skip-bad-files"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {bad}: not UTF-8 text (invalid byte at offset 3); skipped (--skip-bad-files)" in err
    assert "and 1 non-UTF-8 file" in out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["bad_files"], m["documents"], m["inputs"][-1]["bad_files"], m["inputs"][-1]["files"]) == \
        (1, len(texts) + 1, 1, 1)


@pytest.mark.slow
def test_bad_jsonl_line_from_the_command_line_exits_2_without_traceback(tmp_path):
    path = put(tmp_path / "in" / "rows.jsonl", '{"text": "a"}\n{"text": "b"\n')
    res = run_cli([tmp_path / "in", "--out-dir", tmp_path / "out"], tmp_path)
    assert res.returncode == 2
    assert f"{path}:2: not valid JSON" in res.stderr and "Traceback" not in res.stderr


def test_missing_input_path_exits_2(tmp_path):
    res = run_cli([tmp_path / "nowhere.txt", "--out-dir", tmp_path / "out"], tmp_path)
    assert res.returncode == 2
    assert "nowhere.txt: no such file or directory" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_too_small_corpus_for_val_tokens_exits_2_with_a_hint(corpus, tmp_path, capsys):
    paths, _ = corpus
    out = tmp_path / "out"
    for flags, asked in (([], "4,096"), (["--val-tokens", "10485760"], "10,485,760")):  # the default: 4,096 here
        assert prep.main([*map(str, paths), "--out-dir", str(out), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert f"fewer than twice --val-tokens {asked}" in err and "lower --val-tokens (e.g. --val-tokens " in err
        assert list(out.iterdir()) == [], "a failed run must leave nothing behind"


def test_existing_output_is_refused_unless_overwrite(corpus, tmp_path, capsys):
    paths, _ = corpus
    out = tmp_path / "out"
    prep.prepare(paths, out, val_tokens=512, shard_tokens=300, workers=1, quiet=True)
    before = snapshot(out)
    assert len(before) > 4
    assert prep.main([*map(str, paths), "--out-dir", str(out), "--val-tokens", "512", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a prepared corpus" in err and "--overwrite" in err
    assert snapshot(out) == before

    assert prep.main([*map(str, paths), "--out-dir", str(out), "--val-tokens", "512", "--overwrite", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == ["out_val_000000.bin", "out_train_000001.bin"]  # no stale shards from the first run
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["shards"] + ["manifest.json"])


def _latin1_file(tmp_path: Path) -> list[str]:
    return [str(put(tmp_path / "in" / "latin1.txt", "café".encode("latin-1")))]


def _only_unmatched_files(tmp_path: Path) -> list[str]:
    put(tmp_path / "in" / "code.py", "print('hi')")
    return [str(tmp_path / "in")]


def _only_empty_documents(tmp_path: Path) -> list[str]:
    put(tmp_path / "in" / "a.txt", "")
    put(tmp_path / "in" / "b.jsonl", '{"text": ""}\n')
    return [str(tmp_path / "in")]


def _one_doc(tmp_path: Path) -> list[str]:
    return [str(put(tmp_path / "in" / "a.txt", "some text " * 50))]


@pytest.mark.parametrize("make_inputs,flags,words", [
    (_one_doc, ["--val-tokens", "0"], ["--val-tokens must be between 1 and"]),
    (_one_doc, ["--shard-tokens", "-5"], ["--shard-tokens must be between 1 and"]),
    (_one_doc, ["--workers", "0"], ["--workers must be at least 1"]),
    (_one_doc, ["--name", "my*corpus"], ["'my*corpus'", "pass --name"]),
    (_only_unmatched_files, ["--glob", "*.txt"], ["no input files in", "check the paths or --glob"]),
    (_only_empty_documents, [], ["no documents", "only empty documents"]),
    (_latin1_file, [], ["latin1.txt: not UTF-8 text (invalid byte at offset 3)", "convert it to UTF-8"]),
])
def test_bad_arguments_and_inputs_exit_2(tmp_path, capsys, make_inputs, flags, words):
    inputs = make_inputs(tmp_path)
    out = tmp_path / "out"
    assert prep.main([*inputs, "--out-dir", str(out), "--val-tokens", "8", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare.py: error: ") and "Traceback" not in err
    for w in words:
        assert w in err
    assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Inputs that are not regular files, signals, and memory


def special_files(where: Path) -> list[Path]:
    """A FIFO, a link to /dev/zero and a socket, each named like text: read, the first would block for ever and the
    second never end."""
    where.mkdir(parents=True, exist_ok=True)
    os.mkfifo(where / "fifo.txt")
    (where / "zero.txt").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(where / "sock.txt"))
    sock.close()  # the socket file stays
    return [where / "fifo.txt", where / "zero.txt", where / "sock.txt"]


def test_files_found_that_are_not_regular_are_skipped_with_a_warning(tmp_path, cli_seconds):
    """In a directory, a FIFO, a link to /dev/zero and a socket named *.txt are skipped with one warning line each
    and counted (before, the FIFO blocked the run for ever); links to regular files are read; no staging directory
    is left."""
    paths, texts = make_corpus(tmp_path / "c", seed=6)
    more = special_files(tmp_path / "more")
    (tmp_path / "more" / "link.txt").symlink_to(paths[1])  # the loose file again, by a link: read once
    (tmp_path / "more" / "other.txt").symlink_to(put(tmp_path / "elsewhere" / "other.txt", "a linked document"))
    out = tmp_path / "out"
    res = subprocess.run(wrapped("", [*paths, tmp_path / "more", "--out-dir", out, "--val-tokens", 256, "--workers",
                                      2]),
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=HANG * cli_seconds)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("prepare.py: warning: ")]
    assert warnings == [f"prepare.py: warning: {more[0]}: a FIFO, not a regular file; skipped",
                        f"prepare.py: warning: {more[2]}: a socket, not a regular file; skipped",
                        f"prepare.py: warning: {more[1]} (a link to /dev/zero): a character device, not a regular "
                        "file; skipped"]
    assert f"{len(texts) + 1:,} documents" in res.stdout and "and 3 non-regular files" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert (m["documents"], m["non_regular_files"]) == (len(texts) + 1, 3)
    assert (m["inputs"][-1]["files"], m["inputs"][-1]["non_regular_files"]) == (1, 3)  # other.txt; link.txt: seen
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_given_paths_that_are_not_regular_files_are_skipped_too(tmp_path, cli_seconds):
    fifo, zero, _ = special_files(tmp_path / "in")
    text = put(tmp_path / "a.txt", "some text " * 500)
    res = subprocess.run(wrapped("", [fifo, text, zero, "--out-dir", tmp_path / "out", "--val-tokens", 64]),
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=HANG * cli_seconds)
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if "warning" in line] == [
        f"prepare.py: warning: {fifo}: a FIFO, not a regular file; skipped",
        f"prepare.py: warning: {zero} (a link to /dev/zero): a character device, not a regular file; skipped"]
    assert "1 documents from 1 files" in res.stdout and "skipped 2 non-regular files" in res.stdout


def test_only_paths_that_are_not_regular_files_is_the_usual_error(tmp_path, cli_seconds):
    given = special_files(tmp_path / "in")
    out = tmp_path / "out"
    res = subprocess.run(wrapped("", [tmp_path / "in", given[0], "--out-dir", out, "--quiet"]), cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=HANG * cli_seconds)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"prepare.py: error: no input files in {tmp_path / 'in'}, {given[0]}: a directory is searched for "
        "*.txt,*.md and *.jsonl files; check the paths or --glob (3 not a regular file, skipped)"]
    assert not out.exists() or list(out.iterdir()) == []


@contextlib.contextmanager
def within(seconds: float):
    """Fail instead of hanging when the block takes longer: the timer's signal interrupts a blocking open or read."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds:.1f} s")
    before = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_a_file_that_stops_being_regular_is_an_error_not_a_hang(tmp_path, cli_seconds):
    """collect_inputs saw a regular file; a FIFO put in its place by the time it is read is refused at once."""
    path = put(tmp_path / "a.txt", "text")
    files, _ = prep.collect_inputs([path], prep.DEFAULT_GLOBS)
    path.unlink()
    os.mkfifo(path)
    with within(HANG * cli_seconds), pytest.raises(prep.PrepareError, match=r"a\.txt: a FIFO now, not a regular "
                                                                          "file; leave it out"):
        list(prep.work_items(files))


HOLD = """
def hold(self, tokens, nbytes=0):  # the first batch: say where the staging directory is, then wait for a signal
    pathlib.Path({marker!r}).with_suffix(".tmp").write_text(str(self.directory))
    pathlib.Path({marker!r}).with_suffix(".tmp").replace({marker!r})
    signal.pause()
prep.ShardWriter.add = hold
"""


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                            (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_removes_the_staging_directory_and_exits_with_its_status(tmp_path, cli_seconds, sig, code, words):
    """Ctrl-C or SIGTERM while the workers tokenise: the staging directory is removed, the output directory is as it
    was, one line says so, and the exit status is 128 + the signal's number."""
    paths, _ = make_corpus(tmp_path / "c", seed=7)
    out, marker = tmp_path / "out", tmp_path / "staging"
    proc = subprocess.Popen(wrapped(HOLD.format(marker=str(marker)), [*paths, "--out-dir", out, "--val-tokens", 256,
                                                                     "--workers", 2, "--quiet"]),
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + HANG * cli_seconds
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), proc.communicate() if proc.poll() is not None else "no batch in time"
        staging = Path(marker.read_text())
        assert staging.is_dir() and staging.parent == out and staging.name.startswith(".out.partial-")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG * cli_seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err.splitlines()) == (code, [f"prepare.py: {words}; the output directory was left as "
                                                          "it was"])
    assert list(out.iterdir()) == []


MEASURE = """
import json
def kib(field):  # VmHWM, not ru_maxrss: that one keeps the peak from before the exec, the forking pytest's
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
prep.READ_BYTES = prep.PIECE_CHARS = {piece}
prep.gpt2_tokenizer()[0].encode_ordinary("warm up")  # the tokenizer and numpy loaded: what any run holds
base = kib("VmRSS")
_main = prep.main
def main(argv):
    rc = _main(argv)
    print(json.dumps({{"growth": (kib("VmHWM") - base) * 1024}}))
    return rc
prep.main = main
"""


def peak_growth(path: Path, out: Path, piece: int, shard_tokens: int) -> int:
    """How much a run on path, in one process, grows its peak resident memory beyond what it holds once started."""
    res = subprocess.run(wrapped(MEASURE.format(piece=piece), [path, "--out-dir", out, "--workers", 1, "--val-tokens",
                                                             4096, "--shard-tokens", shard_tokens, "--quiet"]),
                         cwd=out.parent, env=subprocess_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["bytes"] == path.stat().st_size
    return json.loads(res.stdout.splitlines()[-1])["growth"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_bounded_for_a_file_of_one_long_line(tmp_path):
    """A 64 MiB file of one line, read and tokenised in 256 KiB pieces: its peak memory grows no more than a 4 MiB
    file's, give or take what the piece size bounds, and stays far below the file's size (read whole, it would take
    several times its size)."""
    piece, shard_tokens = 1 << 18, 1 << 18
    chunk = prose_line(random.Random(13), 1 << 20).replace("\t", " ").encode("utf-8")[:1 << 20]
    sizes = {"small": 4 << 20, "large": 64 << 20}
    growth = {}
    for name, size in sizes.items():
        path = tmp_path / f"{name}.txt"
        with open(path, "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
        growth[name] = peak_growth(path, tmp_path / name, piece, shard_tokens)
        path.unlink()
    # what the piece size bounds: the block read and decoded, the text pending (up to a piece and a block) and its
    # copy when cut, the piece and its UTF-8 bytes, about a byte a character here; the piece's tokens, at most one a
    # character, 8 bytes of list and a 32-byte int each, then 2 bytes in an array
    pieces = 8 * piece + (8 + 32 + 2) * piece
    assert growth["large"] < growth["small"] + pieces, growth
    assert growth["large"] < sizes["large"] / 2, growth


# ----------------------------------------------------------------------------------------------------------------------
# The trainer reads the output


def test_trainer_loader_and_validation_set_read_the_output(corpus, tmp_path):
    paths, texts = corpus
    out = tmp_path / "out"
    prep.prepare(paths, out, val_tokens=512, shard_tokens=1_000, workers=1, quiet=True)
    val_files, train_files = [list(map(str, f)) for f in shard_files(out, "out")]
    shards = read_tokens(train_files)
    seq_len, seqs = 128, 2
    span = 2 * seqs * seq_len  # the loader's default look-ahead
    # every sequence finds its BOS: a chain of seqs + 1 BOS at least seq_len apart, each within a document's length
    # of the previous one's end, fits in the look-ahead of every shard that holds a step (the small last one not)
    longest = max(len(encode(t)) + 1 for t in texts)
    assert (seqs + 1) * (longest - 1) + seqs * seq_len < span
    assert [len(t) > span for t in shards] == [len(t) >= seqs * seq_len + 1 for t in shards] == [True, True, False]

    loader = tg.TrainLoader(train_files, seq_len, seqs)
    twin = tg.TrainLoader(train_files, seq_len, seqs)  # tells where each of the loader's sequences starts
    read = []
    while loader.state_dict()["epoch"] == 0:
        batch, starts = loader.next_batch(torch.device("cpu")), twin.step_starts()
        assert len(batch) == seqs and twin.state_dict() == loader.state_dict()
        tokens = shards[twin.shard]
        for (inputs, targets), start in zip(batch, starts):
            assert inputs[0].item() == BOS, "sequence does not start at a document"
            np.testing.assert_array_equal(inputs.numpy(), tokens[start:start + seq_len])
            np.testing.assert_array_equal(targets.numpy(), tokens[start + 1:start + seq_len + 1])
        read.append(twin.shard)
    assert read[-1] == 0 and sorted(read[:-1]) == read[:-1] and set(read[:-1]) == {0, 1}  # in order, then again
    assert twin.unaligned_steps == 0

    val_seq_len, val_tokens = 64, 512  # the --val-tokens given to prepare: the trainer can use all of it
    val = tg.ValidationSet(val_files, val_tokens, val_seq_len)
    val_stream = read_tokens(val_files)[0]
    chunks = list(val.batches(torch.device("cpu")))
    assert len(chunks) == val_tokens // val_seq_len
    assert chunks[0][0][0].item() == BOS
    for k, (inputs, targets) in enumerate(chunks):
        np.testing.assert_array_equal(inputs.numpy(), val_stream[k * val_seq_len:(k + 1) * val_seq_len])
        np.testing.assert_array_equal(targets.numpy(), val_stream[k * val_seq_len + 1:(k + 1) * val_seq_len + 1])


def test_default_workers_is_bounded():
    assert 1 <= prep.default_workers() <= min(8, os.cpu_count() or 1)


def test_a_worker_forked_before_its_initializer_ends_at_a_signal():
    """prepare.py's SIGTERM handler, inherited by a pool worker until its initializer resets it, ends such a worker
    at once: raised there, it would climb out of the fork into a copy of the caller (the test suite once ran on in one).
    """
    replaced = prep._handle_stops()
    try:
        pid = os.fork()
        if pid == 0:  # the child: the handler must end it here, not raise into this code
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        for s, handler in replaced.items():
            signal.signal(s, handler)
    assert os.waitstatus_to_exitcode(status) == 143
