"""data/shards.py, the shard format: headers, reading, writing (atomically, with a full disk named), names and
globs; and that the data tools use it without importing torch or the trainer."""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_gpt as tg
from conftest import BOS, ROOT, write_shard
from data import shards


# ----------------------------------------------------------------------------------------------------------------------
# Headers


def test_read_shard_header_accepts_a_good_file(tmp_path):
    p = write_shard(tmp_path / "good.bin", np.arange(1234) % 50257)
    assert shards.read_shard_header(p) == 1234
    assert os.path.getsize(p) == shards.HEADER_BYTES + 2 * 1234 == 1024 + 2 * 1234
    np.testing.assert_array_equal(np.asarray(shards.load_shard(p)), np.arange(1234) % 50257)
    np.testing.assert_array_equal(shards.read_shard(p), np.arange(1234) % 50257)


def test_read_shard_header_accepts_an_empty_shard(tmp_path):
    p = write_shard(tmp_path / "empty.bin", np.array([], dtype=np.int64))
    assert shards.read_shard_header(p) == 0
    assert shards.read_shard(p, vocab_size=10).size == 0


def _corrupt(tmp_path, name, mutate) -> str:
    p = write_shard(tmp_path / name, np.arange(100))
    p.write_bytes(bytes(mutate(bytearray(p.read_bytes()))))
    return str(p)


@pytest.mark.parametrize("name,mutate", [
    ("truncated.bin", lambda d: d[:-10]),  # tokens cut short
    ("header_only_part.bin", lambda d: d[:500]),  # shorter than the 1024-byte header
    ("nothing.bin", lambda d: d[:0]),
    ("magic.bin", lambda d: b"\x01\x00\x00\x00" + d[4:]),
    ("version.bin", lambda d: d[:4] + np.array([2], dtype="<i4").tobytes() + d[8:]),
    ("extra.bin", lambda d: d + b"\x00\x00"),
    ("count.bin", lambda d: d[:8] + np.array([101], dtype="<i4").tobytes() + d[12:]),
    ("big_endian_magic.bin", lambda d: np.array([20240520], dtype=">i4").tobytes() + d[4:]),
])
def test_read_shard_header_rejects_bad_files(tmp_path, name, mutate):
    path = _corrupt(tmp_path, name, mutate)
    for read in (shards.read_shard_header, shards.read_shard, shards.load_shard):
        with pytest.raises(shards.DataError) as exc:
            read(path)
        assert path in str(exc.value)


def test_read_shard_header_messages_say_what_is_wrong(tmp_path):
    cases = {
        "short.bin": (lambda d: d[:100], "file is 100 bytes, shorter than the 1024-byte header"),
        "magic.bin": (lambda d: np.array([7], dtype="<i4").tobytes() + d[4:], "magic number 7 is not 20240520"),
        "version.bin": (lambda d: d[:4] + np.array([3], dtype="<i4").tobytes() + d[8:],
                        r"shard version 3 is not supported \(expected 1\)"),
        "truncated.bin": (lambda d: d[:-2], "file is 1222 bytes but its header announces 100 tokens"),
    }
    for name, (mutate, words) in cases.items():
        with pytest.raises(shards.DataError, match=words):
            shards.read_shard_header(_corrupt(tmp_path, name, mutate))


@pytest.mark.parametrize("size", [3, 1023])
def test_read_shard_header_rejects_odd_sized_partial_header(tmp_path, size):
    path = _corrupt(tmp_path, f"odd{size}.bin", lambda d: d[:size])
    with pytest.raises(shards.DataError) as exc:
        shards.read_shard_header(path)
    assert path in str(exc.value) and f"file is {size} bytes" in str(exc.value)


def test_read_shard_header_missing_file(tmp_path):
    path = str(tmp_path / "nope.bin")
    with pytest.raises(shards.DataError) as exc:
        shards.read_shard_header(path)
    assert str(exc.value) == f"{path}: cannot read shard (No such file or directory)"


# ----------------------------------------------------------------------------------------------------------------------
# Reading into memory


def test_read_tokens_reads_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=3000)
    bounds = [0, 1000, 1003, 2500, 3000]  # includes a 3-token shard
    files = [str(write_shard(tmp_path / f"t_{i:06d}.bin", tokens[a:b])) for i, (a, b) in
             enumerate(zip(bounds, bounds[1:]))]
    for n in (0, 1, 999, 1000, 1001, 1003, 1004, 2500, 3000):
        got = shards.read_tokens(files, n, vocab_size=50304)
        assert got.dtype == np.uint16 and not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, tokens[:n])
    with pytest.raises(shards.DataError, match="hold 3000 tokens, fewer than the 3001 needed"):
        shards.read_tokens(files, 3001)
    np.testing.assert_array_equal(shards.read_shard(files[1]), tokens[1000:1003])
    np.testing.assert_array_equal(shards.read_shard(files[3], count=7), tokens[2500:2507])
    assert shards.read_shard(files[1], count=10).size == 3  # a count past the end: the whole shard


@pytest.mark.parametrize("where", [0, 4321, 9999])
def test_ids_outside_the_vocabulary_are_named(tmp_path, where):
    tokens = np.arange(10_000) % 50257
    tokens[where] = 50304
    path = str(write_shard(tmp_path / "bad.bin", tokens))
    with pytest.raises(shards.DataError) as exc:
        shards.read_shard(path, vocab_size=50304)
    assert str(exc.value) == (f"{path}: token id 50304 at position {where} is outside the vocabulary (ids below "
                              "50304); the shard was made with another tokenizer, or is corrupt")
    assert shards.read_shard(path, vocab_size=50305)[where] == 50304  # a larger vocabulary has a row for it
    assert shards.read_shard(path).size == 10_000  # no vocabulary given: no check
    if where > 0:  # only the tokens read are checked
        assert shards.read_shard(path, vocab_size=50304, count=where).size == where


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def test_write_shard_matches_the_format(tmp_path):
    tokens = np.random.default_rng(11).integers(0, 65536, size=777)
    shards.write_shard(tmp_path / "a" / "mine.bin", tokens)
    write_shard(tmp_path / "ref.bin", tokens)  # the format written by hand in conftest
    assert (tmp_path / "a" / "mine.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mine.bin"]  # no temp file left
    for bad in ([0, 65536], [-1, 3]):
        with pytest.raises(shards.DataError, match="token ids must fit in uint16"):
            shards.write_shard(tmp_path / "bad.bin", np.array(bad))
    assert not (tmp_path / "bad.bin").exists()


def test_atomic_write_replaces_the_file_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "f.json"
    shards.atomic_write(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"

    def fails_half_way(f):
        f.write(b"half")
        raise ValueError("killed mid-write")

    with pytest.raises(ValueError, match="killed mid-write"):
        shards.atomic_write(target, fails_half_way)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["f.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_is_a_disk_full_error_in_one_line(tmp_path, code):
    target = tmp_path / "out" / "x_train_000001.bin"

    def no_space(f):
        f.write(b"some")
        raise OSError(code, os.strerror(code))

    with pytest.raises(shards.DiskFullError) as exc:
        shards.atomic_write(target, no_space)
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
    assert exc.value.strerror.startswith(f"cannot write {target}: the disk is full (") and "\n" not in \
        exc.value.strerror
    assert exc.value.strerror.endswith(f"MiB free in {target.parent}); free some space and run again (nothing was "
                                       "replaced)")
    assert list(target.parent.iterdir()) == []


def test_a_failure_on_a_nearly_full_disk_counts_as_disk_full(tmp_path, monkeypatch):
    """torch.save's "unexpected pos" (a RuntimeError) when the disk fills: named a full disk only when it is
    (nearly) full, else left as it was."""
    def like_torch_save(f):
        f.write(b"PK")
        raise RuntimeError("unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    target = tmp_path / "step.pt"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=shards.DISK_FULL_FREE_BYTES - 1))
    with pytest.raises(shards.DiskFullError, match="the disk is full"):
        shards.atomic_write(target, like_torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=shards.DISK_FULL_FREE_BYTES))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        shards.atomic_write(target, like_torch_save)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# Names and globs


def test_shard_names_and_their_glob():
    assert shards.shard_name("fineweb", "val", 0) == "fineweb_val_000000.bin"
    assert shards.shard_name("my.corpus", "train", 123456) == "my.corpus_train_123456.bin"
    names = [shards.shard_name("a", "train", i) for i in (1, 2, 10, 999_999)]
    assert names == sorted(names)  # zero-padded: glob order is index order
    glob = shards.shard_glob("a", "train")
    assert glob == "a_train_*.bin" and all(fnmatch.fnmatchcase(n, glob) for n in names)
    assert not fnmatch.fnmatchcase(shards.shard_name("a", "val", 0), glob)


def test_find_shards_sorted_and_error_names_the_glob(tmp_path):
    for i in (3, 1, 2):
        write_shard(tmp_path / shards.shard_name("x", "train", i), np.arange(10))
    found = shards.find_shards(str(tmp_path), shards.shard_glob("x", "train"), "train")
    assert found == [str(tmp_path / f"x_train_{i:06d}.bin") for i in (1, 2, 3)]
    # an absolute pattern ignores data_dir
    assert shards.find_shards("/nonexistent", str(tmp_path / "x_train_*.bin"), "train") == found
    with pytest.raises(shards.DataError) as exc:
        shards.find_shards(str(tmp_path), "y_val_*.bin", "validation")
    assert str(exc.value) == (f"no validation shards match {os.path.join(str(tmp_path), 'y_val_*.bin')}: check "
                              "--data-dir and the file glob")
    with pytest.raises(shards.DataError, match=r"python data/cached_fineweb10B\.py 8"):
        shards.find_shards(str(tmp_path), "fineweb_train_*.bin", "train")


def test_synthetic_corpus_fixture(synthetic_data):
    """The conftest corpus: BOS-led documents of arithmetic progressions mod 1000, in the shard format."""
    counts = {p.name: shards.read_shard_header(p) for p in sorted(synthetic_data.iterdir())}
    assert counts == {"syn_val_000000.bin": 40_000, "syn_train_000001.bin": 150_000, "syn_train_000002.bin": 150_000}
    for name in counts:
        tokens = shards.read_shard(synthetic_data / name).astype(np.int64)
        assert tokens[0] == BOS
        starts = np.flatnonzero(tokens == BOS)
        lengths = np.diff(np.append(starts, tokens.size))
        assert lengths[:-1].min() >= 30 and lengths.max() <= 600 and len(starts) > 100
        doc = tokens[starts[0] + 1:starts[1]]
        assert len(set(np.diff(doc) % 1000)) == 1  # one stride per document
    assert shards.find_shards(str(synthetic_data), "syn_train_*.bin", "train")[0].endswith("syn_train_000001.bin")


# ----------------------------------------------------------------------------------------------------------------------
# One definition, shared


def test_the_trainer_uses_the_same_definitions():
    """train_gpt's names are data/shards.py's objects, not copies: a DataError raised by the loader is the one
    main() and the data tools catch."""
    for name in ("DataError", "read_shard_header", "read_shard", "read_tokens", "find_shards", "shard_glob"):
        assert getattr(tg, name) is getattr(shards, name), name


# Run in a fresh interpreter: the data tools, through the functions that once imported train_gpt late (writing
# the built-in corpus and a prepared one, checking downloaded shards), must never load torch or the trainer.
ISOLATION_SCRIPT = """
import sys
from pathlib import Path

import numpy as np

from data import builtin, fineweb, prepare, shards

out = Path(sys.argv[1])
for name in fineweb.shard_names("fineweb10B", 1):
    shards.write_shard(out / "fw" / name, np.arange(100))
fineweb.download("fineweb10B", 1, data_dir=out / "fw", quiet=True)  # all there: checked, no network
builtin.build(out / "builtin", max_tokens=6_000, val_tokens=2_000, shard_tokens=2_000, quiet=True)
(out / "doc.txt").write_text("the quick brown fox jumps over the lazy dog\\n" * 200)
prepare.prepare([out / "doc.txt"], out / "mine", val_tokens=500, shard_tokens=600, workers=1, quiet=True)
print(sorted(m for m in ("torch", "train_gpt", "runlib") if m in sys.modules))
"""


def test_data_tools_never_import_torch_or_the_trainer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", ISOLATION_SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert (tmp_path / "mine" / "mine_train_000001.bin").is_file()
    assert (tmp_path / "builtin" / "builtin_train_000002.bin").is_file()
