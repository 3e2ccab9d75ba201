"""The BOS-aligned train loader and the validation set over shards (the shard format: test_shards.py), the schedules
and the config checks."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from runlib import devices, errors
import train_gpt as tg
from conftest import BOS, write_shard
from data.shards import load_shard

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


# ----------------------------------------------------------------------------------------------------------------------
# Each shard checked when it is read (the format itself: test_shards.py)


def test_the_train_loader_checks_each_shard_when_it_reaches_it(tmp_path):
    """Shard 1 holds an id beyond the vocabulary: the loader opens fine and serves shard 0, and the step that moves
    into shard 1 raises the error naming it (checking every shard up front would read all 100 FineWeb shards)."""
    good = docs_corpus(3000, 20, 60, seed=1)
    bad = docs_corpus(3000, 20, 60, seed=2)
    bad[2000] = 60000
    paths = split_shards(tmp_path, np.concatenate([good, bad]), [3000])
    loader = tg.TrainLoader(paths, 64, 4, span_multiplier=2.0, vocab_size=50304)
    with pytest.raises(tg.DataError, match=f"{paths[1]}: token id 60000 at position 2000"):
        for _ in range(100):
            assert loader.shard == 0
            loader.next_batch(CPU)


def test_the_validation_set_checks_the_tokens_it_reads(tmp_path):
    tokens = docs_corpus(5000, 20, 60, seed=3)
    tokens[4500] = 50400
    path = str(write_shard(tmp_path / "val.bin", tokens))
    tg.ValidationSet([path], 4096, 1024, vocab_size=50304)  # the bad id lies beyond the tokens validated
    with pytest.raises(tg.DataError, match="token id 50400 at position 4500"):
        tg.ValidationSet([path], 4608, 512, vocab_size=50304)


def test_a_shard_truncated_during_the_run_is_a_named_error(tmp_path):
    """The loader holds the shard it reads in memory, so truncating that file changes nothing (a memory map would
    have died with SIGBUS), and a later shard truncated before the loader reaches it is a DataError naming it."""
    tokens = docs_corpus(6000, 20, 60, seed=4)
    paths = split_shards(tmp_path, tokens, [3000])
    loader = tg.TrainLoader(paths, 64, 4, span_multiplier=2.0, vocab_size=50304)
    first = loader.next_batch(CPU)
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(1024 + 2 * 1000)
    second = loader.next_batch(CPU)  # still shard 0, from memory
    assert loader.shard == 0 and not torch.equal(first[0][0], second[0][0])
    with pytest.raises(tg.DataError, match=f"{paths[1]}: file is 3024 bytes but its header announces 3000 tokens"):
        for _ in range(100):
            loader.next_batch(CPU)


# ----------------------------------------------------------------------------------------------------------------------
# TrainLoader


def located(batch: list[tuple[torch.Tensor, torch.Tensor]], shards: list[np.ndarray], seq_len: int
            ) -> list[tuple[int, int]]:
    """(shard, start) of each (inputs, targets) pair, searched in every shard (unique because tokens are random); a
    sequence never spans two shards."""
    out = []
    for inputs, targets in batch:
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        assert inputs.shape == (seq_len,) and targets.shape == (seq_len,)
        assert torch.equal(inputs[1:].long(), targets[:-1])
        full = np.concatenate([inputs.numpy().astype(np.int64), targets.numpy()[-1:]])
        hits = [(k, int(i)) for k, tokens in enumerate(shards) if tokens.size > seq_len
                for i in np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1) == full)
                                        .all(axis=1))]
        assert len(hits) == 1, "sequence not found (or ambiguous) in the shards"
        out.append(hits[0])
    return out


def assert_batch_reads(batch, tokens: np.ndarray, starts: list[int], seq_len: int) -> None:
    """The batch is the shard's tokens at the given starts: inputs, and the same shifted by one as targets."""
    assert len(batch) == len(starts)
    for (inputs, targets), s in zip(batch, starts):
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        want = tokens[s:s + seq_len + 1].astype(np.int64)
        assert want.size == seq_len + 1, "a sequence runs past the end of its shard"
        np.testing.assert_array_equal(inputs.numpy(), want[:-1])
        np.testing.assert_array_equal(targets.numpy(), want[1:])


def shards_of(files: list[str]) -> list[np.ndarray]:
    return [np.asarray(load_shard(f)).astype(np.int64) for f in files]


def test_loader_sequences_are_bos_aligned_non_overlapping_and_within_the_span(tmp_path):
    T, S, mult = 64, 4, 2.0
    tokens = docs_corpus(20_000, 5, 40, seed=2)  # BOS always within reach
    files = split_shards(tmp_path, tokens, [7_777])
    shards = shards_of(files)
    loader = tg.TrainLoader(files, T, S, span_multiplier=mult)
    span = int(mult * S * T)
    seen = set()
    for _ in range(40):
        before = loader.state_dict()
        batch = loader.next_batch(CPU)
        assert len(batch) == S
        where = located(batch, shards, T)
        (shard,) = {k for k, _ in where}  # a step reads one shard
        seen.add(shard)
        step_start = before["pos"] if shard == before["shard"] else 0  # a new shard is read from its start
        own = shards[shard]
        prev_end = step_start
        for _, start in where:
            assert own[start] == BOS
            # the first BOS at or after where the previous sequence ended: nothing skipped that could have been used
            assert start >= prev_end
            assert not (own[prev_end:start] == BOS).any()
            prev_end = start + T
        after = loader.state_dict()
        assert after["shard"] == shard
        # the loader moves to the first BOS at or after the last sequence's end, inside the step's look-ahead
        assert own[after["pos"]] == BOS and not (own[prev_end:after["pos"]] == BOS).any()
        assert prev_end <= after["pos"] < step_start + span
    assert seen == {0, 1} and loader.state_dict()["epoch"] == 0


def reference_steps(shards: list[np.ndarray], T: int, S: int, span: int):
    """The loader's rules as its docstring states them, as plain loops over positions: per step (epoch, shard,
    starts, aligned, position after). The record's chain of BOS at least T apart inside the look-ahead (cut to a
    fresh shard that is shorter); else each sequence at the first BOS that leaves room for the rest back to back,
    else right after the previous one; a tail without room for the look-ahead dropped, shards too small for a
    step skipped, the first shard again after the last."""
    holds = [len(t) >= S * T + 1 for t in shards]
    epoch, k, pos = 0, 0, 0
    while True:
        if not holds[k] or (pos > 0 and pos + span + 1 >= len(shards[k])):
            pos = 0
            k += 1
            while k == len(shards) or not holds[k]:
                if k == len(shards):
                    k, epoch = 0, epoch + 1
                else:
                    k += 1
        tokens = shards[k]
        view_end = min(pos + span, len(tokens) - 1)  # BOS positions used are below this
        bos = [i for i in range(pos, view_end) if tokens[i] == BOS]
        chain = []
        for b in bos:
            if not chain or b - chain[-1] >= T:
                chain.append(b)
        if len(chain) > S:
            starts, pos, aligned = chain[:S], chain[S], True
        else:
            starts, cur = [], pos
            for j in range(S):
                room = [b for b in bos if cur <= b <= view_end - (S - j) * T]
                starts.append(room[0] if room else cur)
                cur = starts[-1] + T
            pos, aligned = cur, False
        yield epoch, k, starts, aligned, pos


def test_loader_matches_the_reference_rule_with_long_and_short_documents(tmp_path):
    T, S, mult = 64, 4, 1.5
    span = int(mult * S * T)
    rng = np.random.default_rng(3)
    parts = []
    for _ in range(40):  # runs of short documents, where the BOS chain fits, between long ones, where it cannot
        for length in [*rng.integers(3, 31, size=int(rng.integers(10, 60))), int(rng.choice([90, 200, 700]))]:
            doc = rng.integers(0, BOS, size=int(length))
            doc[0] = BOS
            parts.append(doc)
    tokens = np.concatenate(parts)
    assert tokens.size > 12_000
    # shard 0 holds a step but not the look-ahead (read with the look-ahead cut, first as the loader starts, then
    # after a shard switch), shard 1 not even a step (skipped)
    cuts = [span - 40, span - 40 + S * T, span - 40 + S * T + 9_000]
    files = split_shards(tmp_path, tokens, cuts)
    shards = shards_of(files)
    assert S * T + 1 <= len(shards[0]) < span + 1 and len(shards[1]) == S * T
    loader = tg.TrainLoader(files, T, S, span_multiplier=mult)
    reference = reference_steps(shards, T, S, span)
    kinds, visited = {True: 0, False: 0}, set()
    while loader.state_dict()["epoch"] < 2:
        epoch, k, starts, aligned, pos = next(reference)
        assert_batch_reads(loader.next_batch(CPU), shards[k], starts, T)
        assert (loader.state_dict()["epoch"], loader.state_dict()["shard"], loader.state_dict()["pos"]) == (
            epoch, k, pos)
        kinds[aligned] += 1
        visited.add(k)
    assert kinds[True] > 10 and kinds[False] > 10  # both rules were exercised
    assert (loader.aligned_steps, loader.unaligned_steps) == (kinds[True], kinds[False])
    assert visited == {0, 2, 3}


@pytest.mark.parametrize("bos_at,step_61,step_62", [
    (4_000, [3_904, 4_000], [4_032, 4_064]),  # from 3,904 the look-ahead ends at 4,032: room for the second only
    (3_968, [3_968, 4_000], [4_032, 4_064]),  # room for both back to back: the first starts there
    (4_020, [3_904, 3_936], [4_020, 4_052]),  # room for neither at first, for both one step later
])
def test_loader_starts_unaligned_inside_a_long_document(tmp_path, bos_at, step_61, step_62):
    T, S = 32, 2  # look-ahead 128 tokens
    tokens = np.random.default_rng(4).integers(0, BOS, size=5_000)
    tokens[0] = BOS
    tokens[bos_at] = BOS  # far beyond the first steps' reach
    files = split_shards(tmp_path, tokens, [])
    loader = tg.TrainLoader(files, T, S, span_multiplier=2.0)
    # no chain of BOS: the first sequence at the BOS at 0, the second right after it, and on back to back
    for k in range(61):
        assert_batch_reads(loader.next_batch(CPU), tokens, [2 * T * k, 2 * T * k + T], T)
    # then a sequence starts at the BOS once it leaves room for the rest of the step before the look-ahead's end
    assert_batch_reads(loader.next_batch(CPU), tokens, step_61, T)
    assert loader.state_dict()["pos"] == step_61[1] + T
    assert_batch_reads(loader.next_batch(CPU), tokens, step_62, T)
    assert loader.state_dict()["pos"] == step_62[1] + T
    assert (loader.aligned_steps, loader.unaligned_steps) == (0, 63)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loader_split_over_ranks_takes_the_same_sequences(tmp_path, world_size):
    """Process r takes sequence j of each step as its micro-step j // world_size when j % world_size == r."""
    T, S, steps = 48, 4, 40
    tokens = docs_corpus(30_000, 10, 300, seed=5)
    files = split_shards(tmp_path, tokens, [10_000, 20_000])
    single = tg.TrainLoader(files, T, S)
    reference, visited = [], set()
    for _ in range(steps):
        reference.append(single.next_batch(CPU))
        visited.add(single.state_dict()["shard"])
    assert len(visited) >= 2  # the split holds across a shard switch
    loaders = [tg.TrainLoader(files, T, S, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(steps):
        per_rank = [ld.next_batch(CPU) for ld in loaders]
        assert all(len(b) == S // world_size for b in per_rank)
        merged = [per_rank[j % world_size][j // world_size] for j in range(S)]
        for (xi, yi), (xr, yr) in zip(merged, reference[step]):
            assert torch.equal(xi, xr) and torch.equal(yi, yr)
        assert all(ld.state_dict() == loaders[0].state_dict() for ld in loaders)
    assert loaders[0].state_dict() == single.state_dict()


def test_loader_state_dict_resumes_at_the_same_place(tmp_path):
    T, S = 40, 2
    tokens = docs_corpus(12_000, 10, 150, seed=6)
    files = split_shards(tmp_path, tokens, [5_000])
    a = tg.TrainLoader(files, T, S)
    states, batches = [], []
    for _ in range(200):  # runs into the next epoch
        states.append(a.state_dict())
        batches.append(a.next_batch(CPU))
    assert a.state_dict()["epoch"] >= 1
    for k in (7, 45):
        state = states[k]
        assert set(state) == {"shard", "pos", "epoch", "files"}
        assert state["files"] == [os.path.basename(f) for f in files]
        b = tg.TrainLoader(files, T, S)
        assert b.next_batch(CPU)[0][0].tolist() != batches[k][0][0].tolist()  # a fresh loader is elsewhere
        b = tg.TrainLoader(files, T, S)
        b.load_state_dict(state)
        assert b.state_dict() == state
        for want in batches[k:]:
            got = b.next_batch(CPU)
            for (x1, y1), (x2, y2) in zip(got, want):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert b.state_dict() == a.state_dict()
    assert [states[k]["shard"] for k in (7, 45)] == [0, 1]  # a place in each shard


def test_loader_wraps_around_to_a_new_epoch(tmp_path):
    """After the last shard the first again, epoch + 1, each pass the same; shards too small for a step skipped."""
    T, S = 50, 2
    span = 2 * S * T
    tokens = docs_corpus(2_280, 20, 60, seed=7)
    files = split_shards(tmp_path, tokens, [1_000, 1_080])  # shard 1: 80 tokens, less than one step's 101
    shards = shards_of(files)
    loader = tg.TrainLoader(files, T, S)
    steps = []  # (epoch, shard, starts) of every step
    while loader.state_dict()["epoch"] < 2:
        before = loader.state_dict()
        where = located(loader.next_batch(CPU), shards, T)
        (shard,) = {k for k, _ in where}
        after = loader.state_dict()
        assert after["shard"] == shard
        assert all(s + T + 1 <= len(shards[shard]) for _, s in where)
        if (after["epoch"], shard) != (before["epoch"], before["shard"]):
            # a switch only where the rest of the shard had no room for the look-ahead, to the next shard that holds
            # a step, which is read from its start
            assert before["pos"] + span + 1 >= len(shards[before["shard"]])
            assert (before["shard"], shard, after["epoch"] - before["epoch"]) in {(0, 2, 0), (2, 0, 1)}
            assert shards[shard][where[0][1]] == BOS and not (shards[shard][:where[0][1]] == BOS).any()
        else:
            assert before["pos"] + span + 1 < len(shards[shard])
        steps.append((after["epoch"], shard, [s for _, s in where]))
    passes = [[step[1:] for step in steps if step[0] == e] for e in range(3)]  # the last: one step
    assert {shard for _, shard, _ in steps} == {0, 2}
    assert len(passes[0]) > 10 and passes[1] == passes[0] and passes[2] == passes[0][:1]


@pytest.mark.parametrize("extra", [0, 1])
def test_loader_drops_a_shards_tail_without_room_for_the_look_ahead(tmp_path, extra):
    """Documents of exactly T tokens: each step takes S of them and moves S x T on. A step at pos > 0 needs
    pos + span + 1 < len(shard): at the 4th step's pos shard 0 holds exactly pos + span + 1 tokens (extra = 0: the
    rest is dropped) or one more (extra = 1: the step is taken)."""
    T, S = 16, 2
    span = 2 * S * T
    rng = np.random.default_rng(12)
    shard0 = rng.integers(0, BOS, size=3 * S * T + span + 1 + extra)
    shard0[::T] = BOS
    shard1 = rng.integers(0, BOS, size=400)
    shard1[5::T] = BOS  # the new shard's first step starts at its first BOS
    files = [str(write_shard(tmp_path / f"train_{i:06d}.bin", t)) for i, t in enumerate((shard0, shard1))]
    loader = tg.TrainLoader(files, T, S)
    kept = 3 + extra
    for k in range(kept):
        assert loader.step_starts() == [S * T * k + T * j for j in range(S)] and loader.shard == 0
    assert loader.step_starts() == [5, 5 + T] and loader.state_dict() == dict(
        shard=1, pos=5 + S * T, epoch=0, files=[os.path.basename(f) for f in files])


def test_loader_with_span_multiplier_one_wraps_instead_of_reading_past_the_end(tmp_path):
    T, S = 8, 2
    tokens = np.arange(33)  # no BOS: sequences are unaligned; after one step exactly S * T + 1 tokens remain
    files = split_shards(tmp_path, tokens, [])
    loader = tg.TrainLoader(files, T, S, span_multiplier=1.0)
    for epoch in range(4):  # pos 16 + span 16 + 1 reaches the end: the rest is dropped, a new epoch begins
        assert_batch_reads(loader.next_batch(CPU), tokens, [0, T], T)
        assert loader.state_dict()["epoch"] == epoch


def test_loader_errors_when_no_shard_holds_one_step(tmp_path):
    T, S = 64, 4
    need = S * T + 1  # the step's S x T inputs and the last target
    small = docs_corpus(3 * (need - 1), 10, 50, seed=8)
    files = split_shards(tmp_path, small, [need - 1, 2 * (need - 1)])  # together long enough, none alone
    with pytest.raises(tg.DataError, match=f"{need} tokens.*largest holds {need - 1}"):
        tg.TrainLoader(files, T, S)
    # the smallest accepted shard, between two too small: its step is the only one, each pass
    tokens = docs_corpus(3 * need - 2, 10, 50, seed=9)
    ok = split_shards(tmp_path / "ok", tokens, [need - 1, 2 * need - 1])
    shards = shards_of(ok)
    assert [len(t) for t in shards] == [need - 1, need, need - 1]
    loader = tg.TrainLoader(ok, T, S)
    first = located(loader.next_batch(CPU), shards, T)
    assert {k for k, _ in first} == {1} and loader.state_dict()["epoch"] == 0  # served in the first pass
    for epoch in (1, 2):
        assert located(loader.next_batch(CPU), shards, T) == first and loader.state_dict()["epoch"] == epoch


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
        rounds = list(vs.batches(CPU))
        assert len(rounds) == -(-(val_tokens // seq_len) // world_size)  # every process takes as many rounds
        got = [(x, y) for x, y in rounds if x is not None]
        assert all(x is None for x, _ in rounds[len(got):])  # a process without a chunk waits out the last round
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


def record_window(step: int, hp: tg.Hyperparameters) -> int:
    """The record's long window in blocks, as it computes it: next_multiple_of_n(1728 * step / num_iterations, 128)
    (the smallest of 128, 256, ... not below the float product) // 128, with the preset's window_tokens for 1728."""
    x = hp.window_tokens * (step / hp.num_iterations)
    return next(m for m in range(128, int(x) + 1 + 128, 128) if m >= x) // 128


def test_window_blocks_schedule():
    hp = tg.Hyperparameters()
    N = hp.num_iterations
    assert (hp.window_tokens, N) == (1728, 1695)
    values = [tg.window_blocks(s, hp) for s in range(N + 1)]
    assert values == [record_window(s, hp) for s in range(N + 1)]
    assert values[:126] == [1] * 126 and values[126] == 2 and values[-1] == 14  # 1 block (128) to 14 (1,792)
    assert all(0 <= b - a <= 1 for a, b in zip(values, values[1:]))  # never shrinks, one block at a time
    assert set(values) == set(range(1, 15))
    tiny = tg.preset_hyperparameters("tiny")
    assert (tiny.window_tokens, tiny.num_iterations) == (448, 200)
    small = [tg.window_blocks(s, tiny) for s in range(tiny.num_iterations + 1)]
    assert small == [record_window(s, tiny) for s in range(tiny.num_iterations + 1)]
    assert small[0] == 1 and small[-1] == 4  # ceil(448 / 128) = 4 blocks at the end
    assert all(a <= b for a, b in zip(small, small[1:]))


# ----------------------------------------------------------------------------------------------------------------------
# Config checks


def test_check_hyperparameters_accepts_the_presets():
    h100 = devices.GPUInfo("NVIDIA H100 80GB HBM3", 79.2, 78.6, (9, 0))
    for name in tg.PRESETS:
        hp = tg.preset_hyperparameters(name)
        for world in (1, 2):
            if name == "auto":  # auto is whatever fit_to_gpus makes of the GPUs found: none, or H100s
                for gpus in ([], [h100] * world):
                    tg.check_hyperparameters(tg.fit_to_gpus(hp, gpus, world)[0], world)
                with pytest.raises(errors.ConfigError, match="must be positive"):
                    tg.check_hyperparameters(hp, world)  # unresolved, its zeros are not settings
                continue
            tg.check_hyperparameters(hp, world)
    tg.check_hyperparameters(tg.Hyperparameters(), 8)
    tg.check_hyperparameters(dataclasses.replace(tg.Hyperparameters(), attention="flex"), 8)


@pytest.mark.parametrize("changes,world,words", [
    (dict(seqs_per_step=3), 2, "--set seqs_per_step 3"),
    (dict(seqs_per_step=8), 3, "--set seqs_per_step 8"),
    (dict(val_tokens=1000, val_seq_len=300), 1, "--val-tokens 1000"),
    (dict(attention="flex", train_seq_len=1000), 1, "--train-seq-len"),
    (dict(attention="flex", val_seq_len=4100, val_tokens=4100), 1, "--val-seq-len"),
    (dict(attention="bogus"), 1, "--set attention"),
    (dict(num_iterations=0), 1, "--num-iterations"),
    (dict(vocab_size=50000), 1, "--set vocab_size"),
    (dict(cooldown_frac=1.5), 1, "--set cooldown_frac"),
])
def test_check_hyperparameters_rejects(changes, world, words):
    hp = dataclasses.replace(tg.preset_hyperparameters("tiny"), **changes)
    with pytest.raises(errors.ConfigError) as exc:
        tg.check_hyperparameters(hp, world)
    assert words in str(exc.value)


def test_dense_attention_accepts_any_seq_len():
    hp = dataclasses.replace(tg.preset_hyperparameters("tiny"), attention="dense", train_seq_len=1000,
                             val_seq_len=100, val_tokens=1000)
    tg.check_hyperparameters(hp, 1)


def test_preset_unknown():
    with pytest.raises(errors.ConfigError, match="unknown preset"):
        tg.preset_hyperparameters("huge")
    assert math.isclose(tg.preset_hyperparameters("a10").global_batch_tokens,
                        tg.preset_hyperparameters("speedrun").global_batch_tokens)
