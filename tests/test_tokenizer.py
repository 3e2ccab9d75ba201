"""The GPT-2 tokenizer and its offline sources, and the built-in standard-library corpus."""

import json
import subprocess
import sys

import numpy as np
import pytest

import train_gpt as tg
from conftest import ROOT
from data import builtin, shards, tokenizer


@pytest.fixture(autouse=True)
def fresh_tokenizer_cache():
    tokenizer.gpt2_tokenizer.cache_clear()
    yield
    tokenizer.gpt2_tokenizer.cache_clear()


def test_known_gpt2_ids():
    enc, _ = tokenizer.gpt2_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT_ID] == [50256]
    assert enc.n_vocab == 50257


def test_special_text_is_plain_text():
    """encode_ordinary, which prepare.py and the built-in corpus use: the special token's text is plain text."""
    enc, _ = tokenizer.gpt2_tokenizer()
    ids = enc.encode_ordinary("a<|endoftext|>b")
    assert tokenizer.EOT_ID not in ids
    assert enc.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("text", ["déjà vu — naïve café", "日本語のテキスト", "emoji 🚀🧪 and tabs\t\n\n  spaces",
                                  "def f(x):\n    return x ** 2  # ünïcode\n"])
def test_round_trip_on_unicode(text):
    enc, _ = tokenizer.gpt2_tokenizer()
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < 50256 for i in ids)
    assert enc.decode(ids) == text


def test_ranks_file_from_environment_wins(monkeypatch):
    path = tokenizer.whisper_ranks_file()
    assert path is not None, "the test environment installs openai-whisper (--no-deps) for its gpt2.tiktoken"
    monkeypatch.setenv(tokenizer.RANKS_ENV, str(path))
    monkeypatch.setattr(tokenizer, "tiktoken_can_load", lambda *a, **k: pytest.fail("must not touch the network"))
    enc, source = tokenizer.gpt2_tokenizer()
    assert str(path) in source and tokenizer.RANKS_ENV in source
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_environment_naming_a_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(tokenizer.RANKS_ENV, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(tokenizer.TokenizerUnavailable, match="does not name a file"):
        tokenizer.gpt2_tokenizer()


def test_wrong_ranks_file_is_rejected(monkeypatch, tmp_path):
    bad = tmp_path / "small.tiktoken"
    bad.write_text("YQ== 0\nYg== 1\n")  # "a" and "b": a valid ranks file, but not GPT-2's
    monkeypatch.setenv(tokenizer.RANKS_ENV, str(bad))
    with pytest.raises(tokenizer.TokenizerUnavailable, match="2 ranks"):
        tokenizer.gpt2_tokenizer()


def test_whisper_asset_is_used_when_tiktoken_cannot_fetch(monkeypatch):
    monkeypatch.delenv(tokenizer.RANKS_ENV, raising=False)
    monkeypatch.setattr(tokenizer, "tiktoken_can_load", lambda *a, **k: False)
    enc, source = tokenizer.gpt2_tokenizer()
    assert source.startswith("openai-whisper asset")
    assert enc.encode_ordinary("Hello world") == [15496, 995]


def test_tiktoken_failure_falls_back(monkeypatch):
    import tiktoken

    def broken(name):
        raise ConnectionError("no route to host")

    monkeypatch.delenv(tokenizer.RANKS_ENV, raising=False)
    monkeypatch.setattr(tokenizer, "tiktoken_can_load", lambda *a, **k: True)
    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    _, source = tokenizer.gpt2_tokenizer()
    assert source.startswith("openai-whisper asset")


def test_no_source_names_both_remedies(monkeypatch):
    monkeypatch.delenv(tokenizer.RANKS_ENV, raising=False)
    monkeypatch.setattr(tokenizer, "tiktoken_can_load", lambda *a, **k: False)
    monkeypatch.setattr(tokenizer, "whisper_ranks_file", lambda: None)
    with pytest.raises(tokenizer.TokenizerUnavailable) as exc:
        tokenizer.gpt2_tokenizer()
    msg = str(exc.value)
    assert tokenizer.RANKS_ENV in msg and "pip install --no-deps -r requirements-vocab.txt" in msg and "network" in msg


def test_tiktoken_cache_is_recognised_without_network(monkeypatch, tmp_path):
    import hashlib

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer.socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    assert tokenizer.tiktoken_can_load() is False
    for url in tokenizer.TIKTOKEN_GPT2_FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("cached")
    assert tokenizer.tiktoken_can_load() is True


# ----------------------------------------------------------------------------------------------------------------------
# The built-in corpus


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    files = builtin.build(out, max_tokens=60_000, val_tokens=10_000, shard_tokens=20_000, quiet=True)
    return out, files


def test_builtin_corpus_layout(small_corpus):
    out, files = small_corpus
    names = [f.name for f in files]
    assert names == ["builtin_val_000000.bin", "builtin_train_000001.bin", "builtin_train_000002.bin",
                     "builtin_train_000003.bin", "builtin_train_000004.bin"][:len(names)]
    sizes = [shards.read_shard_header(f) for f in files]
    assert sizes[0] == 10_000 and sum(sizes) == 60_000 and all(s <= 20_000 for s in sizes[1:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == names and manifest["tokens"] == 60_000
    assert builtin.is_built(out)


def test_builtin_corpus_is_python_source(small_corpus):
    out, files = small_corpus
    tokens = np.concatenate([shards.read_shard(f) for f in files])
    assert tokens[0] == tokenizer.EOT_ID
    docs = np.split(tokens, np.flatnonzero(tokens == tokenizer.EOT_ID)[1:])
    assert len(docs) >= 2
    first = tokenizer.gpt2_tokenizer()[0].decode(docs[0][1:].tolist())
    compile(first, "<first document>", "exec")  # a whole standard-library module: valid Python
    expected = builtin.stdlib_sources()[0].read_text(encoding="utf-8")
    assert first == expected


def test_builtin_corpus_is_deterministic(small_corpus, tmp_path):
    _, files = small_corpus
    again = builtin.build(tmp_path, max_tokens=60_000, val_tokens=10_000, shard_tokens=20_000, quiet=True)
    assert [f.read_bytes() for f in again] == [f.read_bytes() for f in files]


def test_incomplete_corpus_is_rebuilt(small_corpus, tmp_path):
    out, files = small_corpus
    copy = tmp_path / "c"
    copy.mkdir()
    for f in files:
        (copy / f.name).write_bytes(f.read_bytes())
    assert not builtin.is_built(copy)  # no manifest: an interrupted build
    (copy / "manifest.json").write_text((out / "manifest.json").read_text())
    assert builtin.is_built(copy)
    (copy / files[-1].name).unlink()
    assert not builtin.is_built(copy)


def test_tiny_preset_builds_the_corpus_on_first_use(tmp_path, monkeypatch):
    real_build, calls = builtin.build, []

    def small_build(out, **kwargs):
        calls.append(str(out))
        return real_build(out, max_tokens=40_000, val_tokens=8_192, quiet=True)

    monkeypatch.setattr(builtin, "build", small_build)
    data_dir = tmp_path / "data" / "builtin"
    tg.ensure_builtin_corpus(str(data_dir))
    assert calls == [str(data_dir)] and builtin.is_built(data_dir)
    tg.ensure_builtin_corpus(str(data_dir))  # second time: found, not rebuilt
    assert calls == [str(data_dir)]


def test_builtin_cli_help():
    out = subprocess.run([sys.executable, str(ROOT / "data" / "builtin.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--max-tokens" in out.stdout
