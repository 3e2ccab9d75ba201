"""Shards, the token stream, the BOS-aligned train loader, the validation set, the schedules and the config checks."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import BOS, write_shard

CPU = torch.device("cpu")


def docs_corpus(n: int, min_len: int, max_len: int, seed: int) -> np.ndarray:
    """n tokens of documents (BOS + random non-BOS tokens) with lengths in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n:
        length = int(rng.integers(min_len, max_len + 1))
        doc = rng.integers(0, BOS, size=length)
        doc[0] = BOS
        parts.append(doc)
        total += length
    return np.concatenate(parts)[:n]


def split_shards(tmp_path, tokens: np.ndarray, cuts: list[int], prefix: str = "train") -> list[str]:
    """Write tokens as several shards split at the given positions; return the sorted paths."""
    bounds = [0, *cuts, tokens.size]
    paths = []
    for i in range(len(bounds) - 1):
        paths.append(str(write_shard(tmp_path / f"{prefix}_{i:06d}.bin", tokens[bounds[i]:bounds[i + 1]])))
    return paths


def step_starts_of(batch: list[tuple[torch.Tensor, torch.Tensor]], tokens: np.ndarray, seq_len: int) -> list[int]:
    """Recover where each (inputs, targets) pair came from in the stream (unique because tokens are random)."""
    starts = []
    for inputs, targets in batch:
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        assert inputs.shape == (seq_len,) and targets.shape == (seq_len,)
        assert torch.equal(inputs[1:].long(), targets[:-1])
        window = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
        full = np.concatenate([inputs.numpy().astype(np.int64), targets.numpy()[-1:]])
        hits = np.flatnonzero((window == full).all(axis=1))
        assert hits.size == 1, "sequence not found (or ambiguous) in the stream"
        starts.append(int(hits[0]))
    return starts


# ----------------------------------------------------------------------------------------------------------------------
# Shard headers


def test_read_shard_header_accepts_a_good_file(tmp_path):
    p = write_shard(tmp_path / "good.bin", np.arange(1234) % 50257)
    assert tg.read_shard_header(p) == 1234
    assert os.path.getsize(p) == 1024 + 2 * 1234
    np.testing.assert_array_equal(np.asarray(tg.load_shard(p)), np.arange(1234) % 50257)


def test_read_shard_header_accepts_an_empty_shard(tmp_path):
    p = write_shard(tmp_path / "empty.bin", np.array([], dtype=np.int64))
    assert tg.read_shard_header(p) == 0


def _corrupt(tmp_path, name, mutate) -> str:
    p = write_shard(tmp_path / name, np.arange(100))
    data = bytearray(p.read_bytes())
    data = mutate(data)
    p.write_bytes(bytes(data))
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
    with pytest.raises(tg.DataError) as exc:
        tg.read_shard_header(path)
    assert path in str(exc.value)
    with pytest.raises(tg.DataError):
        tg.load_shard(path)


def test_read_shard_header_messages_say_what_is_wrong(tmp_path):
    cases = {
        "short.bin": (lambda d: d[:100], "header"),
        "magic.bin": (lambda d: np.array([7], dtype="<i4").tobytes() + d[4:], "magic"),
        "version.bin": (lambda d: d[:4] + np.array([3], dtype="<i4").tobytes() + d[8:], "version"),
        "truncated.bin": (lambda d: d[:-2], "100 tokens"),
    }
    for name, (mutate, words) in cases.items():
        with pytest.raises(tg.DataError, match=words):
            tg.read_shard_header(_corrupt(tmp_path, name, mutate))


@pytest.mark.parametrize("size", [3, 1023])
def test_read_shard_header_rejects_odd_sized_partial_header(tmp_path, size):
    path = _corrupt(tmp_path, f"odd{size}.bin", lambda d: d[:size])
    with pytest.raises(tg.DataError) as exc:
        tg.read_shard_header(path)
    assert path in str(exc.value)


def test_read_shard_header_missing_file(tmp_path):
    path = str(tmp_path / "nope.bin")
    with pytest.raises(tg.DataError) as exc:
        tg.read_shard_header(path)
    assert path in str(exc.value)


def test_trainer_write_shard_matches_the_format(tmp_path):
    tokens = np.random.default_rng(11).integers(0, 65536, size=777)
    tg.write_shard(tmp_path / "a" / "mine.bin", tokens)
    write_shard(tmp_path / "ref.bin", tokens)  # the format written by hand in conftest
    assert (tmp_path / "a" / "mine.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mine.bin"]  # no temp file left
    for bad in ([0, 65536], [-1, 3]):
        with pytest.raises(tg.DataError):
            tg.write_shard(tmp_path / "bad.bin", np.array(bad))
    assert not (tmp_path / "bad.bin").exists()


def test_find_shards_sorted_and_error_names_the_glob(tmp_path):
    for i in (3, 1, 2):
        write_shard(tmp_path / f"x_train_{i:06d}.bin", np.arange(10))
    found = tg.find_shards(str(tmp_path), "x_train_*.bin", "train")
    assert found == [str(tmp_path / f"x_train_{i:06d}.bin") for i in (1, 2, 3)]
    # an absolute pattern ignores data_dir
    assert tg.find_shards("/nonexistent", str(tmp_path / "x_train_*.bin"), "train") == found
    with pytest.raises(tg.DataError) as exc:
        tg.find_shards(str(tmp_path), "y_val_*.bin", "validation")
    assert os.path.join(str(tmp_path), "y_val_*.bin") in str(exc.value)
    assert "validation" in str(exc.value)


def test_synthetic_corpus_fixture(synthetic_data):
    """The conftest corpus: BOS-led documents of arithmetic progressions mod 1000, in the shard format."""
    counts = {p.name: tg.read_shard_header(p) for p in sorted(synthetic_data.iterdir())}
    assert counts == {"syn_val_000000.bin": 40_000, "syn_train_000001.bin": 150_000, "syn_train_000002.bin": 150_000}
    for name in counts:
        tokens = np.asarray(tg.load_shard(synthetic_data / name)).astype(np.int64)
        assert tokens[0] == BOS
        starts = np.flatnonzero(tokens == BOS)
        lengths = np.diff(np.append(starts, tokens.size))
        assert lengths[:-1].min() >= 30 and lengths.max() <= 600 and len(starts) > 100
        doc = tokens[starts[0] + 1:starts[1]]
        assert len(set(np.diff(doc) % 1000)) == 1  # one stride per document
    assert tg.find_shards(str(synthetic_data), "syn_train_*.bin", "train")[0].endswith("syn_train_000001.bin")


# ----------------------------------------------------------------------------------------------------------------------
# TokenStream


def test_token_stream_reads_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=3000)
    files = split_shards(tmp_path, tokens, [1000, 1003, 2500])  # includes a 3-token shard
    stream = tg.TokenStream(files)
    assert stream.total == 3000
    for start, n in [(0, 3000), (990, 20), (999, 1), (1000, 3), (998, 10), (0, 1), (2999, 1), (1500, 1400),
                     (2490, 510)]:
        got = stream.read(start, n)
        np.testing.assert_array_equal(got, tokens[start:start + n])
    with pytest.raises(IndexError):
        stream.read(2990, 11)
    with pytest.raises(IndexError):
        stream.read(-1, 5)


def test_token_stream_find_bos(tmp_path):
    rng = np.random.default_rng(1)
    n = 150_000  # longer than find_bos's 65536-token read chunk
    tokens = rng.integers(0, BOS, size=n)
    bos_at = np.sort(rng.choice(n, size=12, replace=False))
    bos_at = np.concatenate([bos_at, [5, 6, 70_000, 65_536 + 7, n - 1]])
    tokens[bos_at] = BOS
    files = split_shards(tmp_path, tokens, [40_000, 100_000])
    stream = tg.TokenStream(files)

    def expected(start, limit):
        end = min(start + limit, n - 1)
        hits = np.flatnonzero(tokens[start:end + 1] == BOS)
        return start + int(hits[0]) if hits.size else -1

    queries = [(0, 10), (0, 4), (0, 5), (6, 0), (7, 0), (7, 100_000), (n - 1, 0), (n - 1, 10), (n - 5, 3),
               (66_000, 10_000), (65_536, 7), (65_536, 6), (39_990, 30), (1, 149_000)]
    queries += [(int(rng.integers(0, n)), int(rng.integers(0, 90_000))) for _ in range(30)]
    for start, limit in queries:
        assert stream.find_bos(start, limit) == expected(start, limit), (start, limit)


# ----------------------------------------------------------------------------------------------------------------------
# TrainLoader


def test_loader_sequences_are_bos_aligned_non_overlapping_and_within_the_span(tmp_path):
    T, S, mult = 64, 4, 2.0
    tokens = docs_corpus(20_000, 5, 40, seed=2)  # BOS always within reach
    files = split_shards(tmp_path, tokens, [7_777])
    loader = tg.TrainLoader(files, T, S, span_multiplier=mult)
    span = int(mult * S * T)
    for _ in range(15):
        step_start = loader.state_dict()["pos"]
        batch = loader.next_batch(CPU)
        assert len(batch) == S
        starts = step_starts_of(batch, tokens, T)
        prev_end = step_start
        for start in starts:
            assert tokens[start] == BOS
            # the first BOS at or after where the previous sequence ended: nothing skipped that could have been used
            assert start >= prev_end
            assert not (tokens[prev_end:start] == BOS).any()
            prev_end = start + T
        assert starts[-1] + T <= step_start + span
        assert loader.state_dict()["pos"] > starts[-1] + T - 1  # the next step starts after this one
    assert loader.state_dict()["epoch"] == 0


def reference_starts(tokens: np.ndarray, step_start: int, T: int, S: int, span: int) -> list[int]:
    """The docstring's rule: each sequence starts at the first BOS at or after the previous end as long as the
    remaining sequences still fit within the span (and the data); otherwise at the previous end."""
    pos, out = step_start, []
    for j in range(S):
        last_allowed = min(step_start + span - (S - j) * T, tokens.size - (S - j) * (T + 1))
        hits = np.flatnonzero(tokens[pos:max(pos, last_allowed + 1)] == BOS)
        start = pos + int(hits[0]) if hits.size else pos
        out.append(start)
        pos = start + T
    return out


def test_loader_matches_the_reference_rule_with_long_and_short_documents(tmp_path):
    T, S, mult = 64, 4, 1.5
    rng = np.random.default_rng(3)
    parts = []
    for _ in range(120):
        length = int(rng.choice([3, 20, 90, 200, 700]))
        doc = rng.integers(0, BOS, size=length)
        doc[0] = BOS
        parts.append(doc)
    tokens = np.concatenate(parts)
    files = split_shards(tmp_path, tokens, [tokens.size // 3, 2 * tokens.size // 3])
    loader = tg.TrainLoader(files, T, S, span_multiplier=mult)
    span = int(mult * S * T)
    aligned = unaligned = 0
    for _ in range(40):
        step_start = loader.state_dict()["pos"]
        if loader.state_dict()["epoch"] > 0:
            break
        starts = step_starts_of(loader.next_batch(CPU), tokens, T)
        if loader.state_dict()["epoch"] > 0:
            break
        assert starts == reference_starts(tokens, step_start, T, S, span)
        aligned += sum(tokens[s] == BOS for s in starts)
        unaligned += sum(tokens[s] != BOS for s in starts)
    assert aligned > 10 and unaligned > 10  # both cases were exercised


def test_loader_starts_unaligned_inside_a_long_document(tmp_path):
    T, S = 32, 2
    tokens = np.random.default_rng(4).integers(0, BOS, size=5_000)
    tokens[0] = BOS
    tokens[4_000] = BOS  # far beyond any step's reach from the start
    files = split_shards(tmp_path, tokens, [])
    loader = tg.TrainLoader(files, T, S, span_multiplier=2.0)
    starts = step_starts_of(loader.next_batch(CPU), tokens, T)
    assert starts == [0, T]  # the first is at the BOS at 0, the second continues where it ended
    starts = step_starts_of(loader.next_batch(CPU), tokens, T)
    assert starts == [2 * T + 1, 3 * T + 1]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loader_split_over_ranks_takes_the_same_sequences(tmp_path, world_size):
    T, S, steps = 48, 4, 8
    tokens = docs_corpus(30_000, 10, 300, seed=5)
    files = split_shards(tmp_path, tokens, [10_000, 20_000])
    single = tg.TrainLoader(files, T, S)
    reference = [single.next_batch(CPU) for _ in range(steps)]
    loaders = [tg.TrainLoader(files, T, S, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(steps):
        per_rank = [ld.next_batch(CPU) for ld in loaders]
        assert all(len(b) == S // world_size for b in per_rank)
        merged = [per_rank[j % world_size][j // world_size] for j in range(S)]
        for (xi, yi), (xr, yr) in zip(merged, reference[step]):
            assert torch.equal(xi, xr) and torch.equal(yi, yr)
        assert len({ld.state_dict()["pos"] for ld in loaders}) == 1


def test_loader_state_dict_resumes_at_the_same_place(tmp_path):
    T, S = 40, 2
    tokens = docs_corpus(12_000, 10, 150, seed=6)
    files = split_shards(tmp_path, tokens, [5_000])
    a = tg.TrainLoader(files, T, S)
    for _ in range(7):
        a.next_batch(CPU)
    state = a.state_dict()
    assert state["files"] == [os.path.basename(f) for f in files]
    expected = [a.next_batch(CPU) for _ in range(150)]  # runs into the next epoch too
    assert a.state_dict()["epoch"] >= 1
    b = tg.TrainLoader(files, T, S)
    assert b.next_batch(CPU)[0][0].tolist() != expected[0][0][0].tolist()
    b = tg.TrainLoader(files, T, S)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(CPU)
        for (x1, y1), (x2, y2) in zip(got, want):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.state_dict() == a.state_dict()


def test_loader_wraps_around_to_a_new_epoch(tmp_path):
    T, S = 50, 2
    tokens = docs_corpus(2_000, 20, 60, seed=7)
    files = split_shards(tmp_path, tokens, [1_000])
    loader = tg.TrainLoader(files, T, S)
    first = step_starts_of(loader.next_batch(CPU), tokens, T)
    epochs, previous_end = [], 0
    for _ in range(60):
        starts = step_starts_of(loader.next_batch(CPU), tokens, T)
        epochs.append(loader.state_dict()["epoch"])
        assert all(s + T + 1 <= tokens.size for s in starts)
        if epochs[-1] != (epochs[-2] if len(epochs) > 1 else 0):
            # a new pass starts from the beginning of the stream, exactly like the first step did
            assert starts == first
            assert previous_end + S * (T + 1) > tokens.size  # only when the data had run out
        previous_end = loader.state_dict()["pos"]
    assert epochs[-1] >= 2
    assert epochs == sorted(epochs)


def test_loader_with_span_multiplier_one_wraps_instead_of_reading_past_the_end(tmp_path):
    T, S = 8, 2
    tokens = np.arange(33)  # no BOS: sequences are unaligned; after one step exactly S * T tokens remain
    files = split_shards(tmp_path, tokens, [])
    loader = tg.TrainLoader(files, T, S, span_multiplier=1.0)
    for _ in range(4):
        for x, y in loader.next_batch(CPU):
            assert x.numel() == T and y.numel() == T


def test_loader_errors_when_the_stream_is_shorter_than_one_step(tmp_path):
    T, S = 64, 4
    files = split_shards(tmp_path, docs_corpus(S * (T + 1) - 1, 10, 50, seed=8), [100])
    with pytest.raises(tg.DataError, match=str(S * (T + 1))):
        tg.TrainLoader(files, T, S)
    ok = split_shards(tmp_path / "ok", docs_corpus(S * (T + 1), 10, 50, seed=8), [])
    loader = tg.TrainLoader(ok, T, S)
    assert len(loader.next_batch(CPU)) == S
    assert loader.state_dict()["epoch"] == 0  # the smallest accepted stream serves its first step in the first pass


def test_token_stream_read_of_nothing(tmp_path):
    stream = tg.TokenStream(split_shards(tmp_path, np.arange(50), [20]))
    assert stream.read(20, 0).size == 0
    with pytest.raises(IndexError):
        stream.read(45, 6)


# ----------------------------------------------------------------------------------------------------------------------
# ValidationSet


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_set_reads_exactly_val_tokens(tmp_path, world_size):
    val_tokens, seq_len = 1_000, 100
    tokens = np.random.default_rng(9).integers(0, 50257, size=1_500)
    files = split_shards(tmp_path, tokens, [333, 950], prefix="val")
    chunks = {}
    for r in range(world_size):
        vs = tg.ValidationSet(files, val_tokens, seq_len, rank=r, world_size=world_size)
        assert vs.val_tokens == val_tokens
        got = list(vs.batches(CPU))
        ks = list(range(r, val_tokens // seq_len, world_size))
        assert len(got) == len(ks)
        for k, (x, y) in zip(ks, got):
            chunks[k] = (x, y)
    assert sorted(chunks) == list(range(val_tokens // seq_len))
    inputs = torch.cat([chunks[k][0] for k in sorted(chunks)])
    targets = torch.cat([chunks[k][1] for k in sorted(chunks)])
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
    np.testing.assert_array_equal(inputs.numpy(), tokens[:val_tokens])
    np.testing.assert_array_equal(targets.numpy(), tokens[1:val_tokens + 1])


def test_validation_set_errors_when_the_shard_is_too_small(tmp_path):
    tokens = np.arange(1_000)
    files = split_shards(tmp_path, tokens, [], prefix="val")
    with pytest.raises(tg.DataError) as exc:
        tg.ValidationSet(files, 1_000, 100)
    assert files[0] in str(exc.value) and "1001" in str(exc.value)
    vs = tg.ValidationSet(split_shards(tmp_path / "b", np.arange(1_001), [], prefix="val"), 1_000, 100)
    assert sum(x.numel() for x, _ in vs.batches(CPU)) == 1_000


# ----------------------------------------------------------------------------------------------------------------------
# Schedules


def test_lr_multiplier():
    hp = tg.Hyperparameters()  # speedrun: 1695 steps, cool-down over the last 45%
    N, cd = hp.num_iterations, hp.cooldown_frac
    cool_start = N * (1 - cd)
    for step in range(0, N + 1):
        got = tg.lr_multiplier(step, hp)
        if step < cool_start:
            assert got == 1.0
        else:  # straight line from (cool_start, 1.0) to (N, 0.1)
            assert got == pytest.approx(1.0 - 0.9 * (step - cool_start) / (N - cool_start), abs=1e-12)
    assert tg.lr_multiplier(N, hp) == pytest.approx(0.1)
    assert tg.lr_multiplier(0, hp) == 1.0
    mid = tg.lr_multiplier(round(N - N * cd / 2), hp)
    assert mid == pytest.approx(0.55, abs=0.9 / (N * cd))
    values = [tg.lr_multiplier(s, hp) for s in range(N + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    small = dataclasses.replace(hp, num_iterations=10, cooldown_frac=0.5)
    assert [round(tg.lr_multiplier(s, small), 6) for s in range(11)] == [
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1]
    no_cool = dataclasses.replace(hp, cooldown_frac=0.0)
    assert all(tg.lr_multiplier(s, no_cool) == 1.0 for s in range(0, N + 1, 50))


def test_muon_momentum_warmup():
    hp = tg.Hyperparameters()
    W = hp.muon_momentum_warmup_steps
    assert (hp.muon_momentum_start, hp.muon_momentum, W) == (0.85, 0.95, 300)
    assert tg.muon_momentum(0, hp) == pytest.approx(0.85)
    assert tg.muon_momentum(W // 2, hp) == pytest.approx(0.90)
    assert tg.muon_momentum(W // 3, hp) == pytest.approx(0.85 + 0.1 / 3)
    assert tg.muon_momentum(W, hp) == pytest.approx(0.95)
    assert tg.muon_momentum(W + 500, hp) == pytest.approx(0.95)
    values = [tg.muon_momentum(s, hp) for s in range(0, 2 * W)]
    assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))
    assert tg.muon_momentum(0, dataclasses.replace(hp, muon_momentum_warmup_steps=0)) == pytest.approx(0.95)


def test_window_size_schedule():
    hp = tg.Hyperparameters()
    N = hp.num_iterations
    values = [tg.window_size(s, hp) for s in range(N + 1)]
    assert values[0] == 128 and values[-1] == 1792
    assert all(v % 128 == 0 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert set(values) == set(range(128, 1793, 128))  # grows one block at a time, skipping none
    for s in range(0, N + 1, 37):  # within half a block of the straight line
        assert abs(values[s] - (128 + (1792 - 128) * s / N)) <= 64
    assert tg.window_size(2 * N, hp) == 1792
    tiny = tg.preset_hyperparameters("tiny")
    assert tg.window_size(0, tiny) == 128 and tg.window_size(tiny.num_iterations, tiny) == 512


# ----------------------------------------------------------------------------------------------------------------------
# Config checks


def test_check_hyperparameters_accepts_the_presets():
    for name in tg.PRESETS:
        hp = tg.preset_hyperparameters(name)
        for world in (1, 2):
            tg.check_hyperparameters(hp, world)
    tg.check_hyperparameters(tg.Hyperparameters(), 8)
    tg.check_hyperparameters(dataclasses.replace(tg.Hyperparameters(), attention="flex"), 8)


@pytest.mark.parametrize("changes,world,words", [
    (dict(seqs_per_step=3), 2, "--seqs-per-step 3"),
    (dict(seqs_per_step=8), 3, "--seqs-per-step 8"),
    (dict(val_tokens=1000, val_seq_len=300), 1, "--val-tokens 1000"),
    (dict(attention="flex", train_seq_len=1000), 1, "--train-seq-len"),
    (dict(attention="flex", val_seq_len=4100, val_tokens=4100), 1, "--val-seq-len"),
    (dict(attention="bogus"), 1, "--attention"),
    (dict(num_iterations=0), 1, "--num-iterations"),
    (dict(vocab_size=50000), 1, "--vocab-size"),
    (dict(cooldown_frac=1.5), 1, "--cooldown-frac"),
])
def test_check_hyperparameters_rejects(changes, world, words):
    hp = dataclasses.replace(tg.preset_hyperparameters("tiny"), **changes)
    with pytest.raises(tg.ConfigError) as exc:
        tg.check_hyperparameters(hp, world)
    assert words in str(exc.value)


def test_dense_attention_accepts_any_seq_len():
    hp = dataclasses.replace(tg.preset_hyperparameters("tiny"), attention="dense", train_seq_len=1000,
                             val_seq_len=100, val_tokens=1000)
    tg.check_hyperparameters(hp, 1)


def test_preset_unknown():
    with pytest.raises(tg.ConfigError, match="unknown preset"):
        tg.preset_hyperparameters("huge")
    assert math.isclose(tg.preset_hyperparameters("a10").global_batch_tokens,
                        tg.preset_hyperparameters("speedrun").global_batch_tokens)
