"""data/prepare.py: the user's own text (files, directories, JSONL) into speedrun shards that the trainer reads.

The expected token stream is built here from the documents in the documented order, each encoded on its own, and
compared with what the shards hold; the shards are then read with the trainer's own loader and validation set."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    """The script as a user runs it: by path, from another directory, without the repository on PYTHONPATH."""
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


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


def test_a_long_document_is_tokenised_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PIECE_CHARS", 40)
    monkeypatch.setattr(prep, "READ_BYTES", 7)  # splits multi-byte characters across reads
    rng = random.Random(5)
    atoms = ["word", " word", "Word", "\n", "\n\n", "\r\n", " \n", "\n ", "\t", "don't", "'s", "\n's", "\u3000", "é",
             "日本", "🙂", ".", "!!", "42", "\u00a0", "\u2028", "\x85"]
    text = "".join(rng.choice(atoms) for _ in range(4000))
    path = put(tmp_path / "in" / "long.txt", BOM + text.encode("utf-8"))

    pieces = list(prep.text_pieces(path))
    assert len(pieces) > 20
    assert "".join(p for p, _ in pieces) == text
    assert sum(n for _, n in pieces) == path.stat().st_size
    assert sum((encode(p) for p, _ in pieces), []) == encode(text)

    out = tmp_path / "out"
    m = prep.prepare([path], out, val_tokens=100, shard_tokens=10_000, workers=2, quiet=True)
    val_files, train_files = shard_files(out, "out")
    assert check_split(read_tokens(val_files)[0], read_tokens(train_files), [BOS] + encode(text))[1] == 1
    assert m["val_documents"] + (m["val_tail_tokens"] > 0) == 1  # one document: it gives the validation its part


def test_safe_cut_only_between_non_space_characters():
    assert prep.safe_cut("ab\ncd\nef") == 6
    assert prep.safe_cut("ab\ncd\n ef") == 3  # a newline before a space joins the space's piece
    assert prep.safe_cut("ab \ncd") == 0  # ... and one after a space belongs to a whitespace run
    assert prep.safe_cut("abcd\n") == 0 and prep.safe_cut("ab\ncd\n") == 3  # nothing after the last one yet
    assert prep.safe_cut("ab\ncd\nef", lo=4) == 6 and prep.safe_cut("ab\ncd ef", lo=3) == 0


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
    """The commands prepare.py prints after "train on it:", by their first two words."""
    lines = stdout.splitlines()
    commands = [line.split(":  ", 1)[1].split() for line in lines[lines.index("train on it:") + 1:]]
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
        h100 = [tg.kit.GPUInfo("NVIDIA H100 80GB HBM3", 79.2, 78.6, (9, 0))] * count
        tg.check_hyperparameters(tg.fit_to_gpus(hp, h100, count)[0], count)


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
