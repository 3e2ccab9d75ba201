"""generate.py: the decode path computes the trained model's function, the KV cache changes nothing, sampling flags
behave, and the command line reports bad input without tracebacks."""

from __future__ import annotations

import dataclasses

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as g
from runlib import checkpoints
import train_gpt as tg
from conftest import ROOT, default_sigint, subprocess_env, tiny_hp

CPU = torch.device("cpu")
# A final window of 4 (long) / 2 (short) 128-token blocks that differs from the starting 1 (short 0: own block only),
# so the tests see which one is used; the test sequences span several blocks, with documents longer than 4 blocks.
WINDOWS = dict(window_tokens=512, num_iterations=12)
FINAL_BLOCKS = 4
BLOCK = tg.FLEX_BLOCK_SIZE


@pytest.fixture(scope="module")
def trained(shared_synthetic_data, tmp_path_factory) -> Path:
    """A run directory written by the trainer itself after 3 steps."""
    work = tmp_path_factory.mktemp("gen_trained")
    hp = tiny_hp(shared_synthetic_data, work, num_iterations=3, val_loss_every=0, run_name="T")
    tg.train(hp)
    return Path(hp.checkpoint_dir) / "T"


@pytest.fixture(scope="module")
def random_ckpt(shared_synthetic_data, tmp_path_factory) -> Path:
    """A checkpoint in the trainer's format (Trainer.checkpoint) of a model with large random weights everywhere,
    including the zero-initialised projections and attention gates and a block without attention, so every path
    shows in the logits (a zero gate is 1/2 for every head and token)."""
    work = tmp_path_factory.mktemp("gen_random")
    hp = tiny_hp(shared_synthetic_data, work, no_attn_layer=1, **WINDOWS)
    trainer = tg.Trainer(hp, CPU)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.ndim >= 2:
                scale = 0.5 if "embed" in name else (2.0 if name.endswith("attn.gate.weight") else 0.1)
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) * 0.7 + 0.3)
    path = Path(hp.checkpoint_dir) / "R" / "step_000012.pt"
    checkpoints.atomic_save(trainer.state_dict("R"), path)
    return path


@pytest.fixture(scope="module")
def loaded(random_ckpt) -> tg.LoadedModel:
    return tg.load_model(str(random_ckpt), CPU)


def documents(length: int, seed: int, bos_at=(0, 90, 97, 260)) -> torch.Tensor:
    """Random text ids with BOS at the given positions."""
    toks = torch.randint(0, g.TEXT_VOCAB - 1, (length,), generator=torch.Generator().manual_seed(seed))
    for p in bos_at:
        if p < length:
            toks[p] = g.EOT_ID
    return toks


# ----------------------------------------------------------------------------------------------------------------------
# Faithful to the training forward


def test_window_is_the_one_at_the_end_of_training(loaded):
    hp = tiny_hp("unused", "unused", **WINDOWS)
    assert loaded.window_blocks == tg.window_blocks(hp.num_iterations, hp) == FINAL_BLOCKS != tg.window_blocks(0, hp)


def gates(model: tg.GPT) -> list[torch.Tensor]:
    return [b.attn.gate.weight for b in model.blocks if b.attn is not None]


def unbounded(seq: torch.Tensor) -> int:
    """A long window covering the whole sequence (its short one too): no window binds."""
    return 2 * (seq.numel() // BLOCK + 1)


@pytest.mark.parametrize("window", [None, 1, 3])  # None: the final one (4 blocks, short 2); 1: short 0; 3: short 1
@pytest.mark.parametrize("which", ["random", "trained"])
def test_decode_logits_equal_training_forward(which, window, loaded, trained):
    model_info = loaded if which == "random" else tg.load_model(str(trained), CPU)
    model = model_info.model
    window = model_info.window_blocks if window is None else window
    assert set(model.window_kinds()) == {"L", "S"}
    assert all(torch.count_nonzero(w) == w.numel() for w in gates(model))  # the gates are part of the function
    # 8 blocks; a document of 753 tokens (blocks 0-6) longer than every window, and short ones
    seq = documents(1000, seed=0, bos_at=(0, 90, 97, 850, 852))
    ref = model(seq, window_blocks=window)  # the trainer's dense CPU path
    decoder = g.KVDecoder(model, window, batch=1, max_len=seq.numel())
    got = decoder.step(seq[None], all_logits=True)[0]
    assert ref.std() > 0.05  # non-trivial logits
    if which == "random":  # the window binds: an unbounded one gives other logits
        assert (model(seq, window_blocks=unbounded(seq)) - ref).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_equal_uncached_at_every_step(loaded, static):
    """Batch of 3 different sequences over 5+ blocks, prompts longer than the long window (4 blocks), BOS inside
    prompt and continuation; the one-token steps cross the block boundary at 640, where a block leaves the window."""
    model, window = loaded.model, loaded.window_blocks
    prompt_len, steps = 620, 30
    seqs = torch.stack([documents(prompt_len + steps, seed=s, bos_at=bos)
                        for s, bos in ((1, (0,)), (2, (0, 150, 630)), (3, (0, 619, 621)))])
    decoder = g.KVDecoder(model, window, batch=3, max_len=prompt_len + steps, static=static)
    logits = decoder.step(seqs[:, :prompt_len])
    win = torch.tensor(window, dtype=torch.int32)
    for t in range(prompt_len, prompt_len + steps + 1):
        # the training forward, with the head applied to the last position only (forward() applies it to all)
        ref = torch.stack([model.head_logits(model.hidden(row[:t], win)[0, -1]) for row in seqs])
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
        if t < prompt_len + steps:
            logits = decoder.step(seqs[:, t:t + 1])
    free = torch.tensor(unbounded(seqs[0]), dtype=torch.int32)  # the window binds at the last step
    assert (model.head_logits(model.hidden(seqs[0], free)[0, -1]) - ref[0]).abs().max() > 1e-2


def test_generate_greedy_equals_recomputing_everything(loaded):
    """A one-document prompt longer than the long window; the new tokens cross the block boundary at 640."""
    model, window = loaded.model, loaded.window_blocks
    n = 630
    prompt = documents(n, seed=4, bos_at=()).tolist()
    got = g.generate(model, window, prompt, g.SamplingConfig(max_tokens=12, num_samples=2, temperature=0))
    seq = [g.EOT_ID] + prompt
    for _ in range(12):
        logits = model(torch.tensor(seq), window_blocks=window)[-1]
        seq.append(int(logits[:g.TEXT_VOCAB].argmax()))
    assert got == [seq[n + 1:], seq[n + 1:]]


@pytest.mark.parametrize("static", [False, True])
def test_a_reused_decoder_gives_what_a_fresh_one_gives(loaded, static):
    """Stale cache entries of an earlier, longer call must not leak into the next one (benchmarks reuse decoders)."""
    model, window = loaded.model, loaded.window_blocks
    sc = g.SamplingConfig(max_tokens=8, num_samples=2, temperature=0.9, seed=5)
    long_prompt = documents(300, seed=6, bos_at=(90,)).tolist()  # 3 blocks
    short_prompt = [464, 3290, 318]
    decoder = g.KVDecoder(model, window, 2, len(long_prompt) + 1 + sc.max_tokens, static=static)
    g.generate(model, window, long_prompt, sc, decoder=decoder)
    assert g.generate(model, window, short_prompt, sc, decoder=decoder) == g.generate(model, window, short_prompt, sc)
    assert g.generate(model, window, long_prompt, sc, decoder=decoder) == g.generate(model, window, long_prompt, sc)
    with pytest.raises(ValueError, match="holds 2 x"):
        g.generate(model, window, long_prompt, dataclasses.replace(sc, max_tokens=50), decoder=decoder)


def test_decoding_runs_the_models_own_modules(loaded, monkeypatch):
    """Every step calls each Block and attention of the GPT with the decoder's cache, once: generate.py holds no copy
    of the model's arithmetic that a model change could miss."""
    model, window = loaded.model, loaded.window_blocks
    calls = []

    def spy(cls):
        real = cls.forward

        def forward(self, *args, **kw):
            calls.append((cls.__name__, self, args[-1] if args else None))
            return real(self, *args, **kw)
        monkeypatch.setattr(cls, "forward", forward)

    spy(tg.Block)
    spy(tg.CausalSelfAttention)
    decoder = g.KVDecoder(model, window, batch=2, max_len=40)
    seqs = torch.stack([documents(40, seed=s, bos_at=(0, 30)) for s in (7, 8)])
    decoder.step(seqs[:, :37])
    for t in range(37, 40):
        calls.clear()
        decoder.step(seqs[:, t:t + 1])
        blocks = [s for name, s, cache in calls if name == "Block" and cache is decoder.cache]
        attns = [s for name, s, cache in calls if name == "CausalSelfAttention" and cache is decoder.cache]
        assert blocks == list(model.blocks) and len(calls) == len(blocks) + len(attns)
        assert attns == [b.attn for b in model.blocks if b.attn is not None] and len(attns) < len(blocks)


def test_a_sequence_fed_in_uneven_chunks_through_the_forward(loaded):
    """GPT.forward with a cache, in chunks that start and end inside 128-token blocks, across documents, where the
    short window binds: the logits of the training forward."""
    model, window = loaded.model, loaded.window_blocks
    seq = documents(700, seed=9, bos_at=(0, 200, 555, 556))
    ref = model(seq, window_blocks=window)
    cache = g.KVCache(model, batch=1, max_len=seq.numel())
    got, start = [], 0
    with torch.no_grad():
        for n in (1, 130, 255, 7, 300, 7):
            cache.advance(n)
            got.append(model(seq[None, start:start + n], window_blocks=window, cache=cache)[0])
            start += n
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="exceed the cache's 700"):
        cache.advance(1)


@pytest.mark.slow
def test_compiled_decode_step_equals_the_eager_one(loaded):
    """The compiled one-token step (--compile, one sample) on the CPU's inductor, across a block boundary: one graph,
    compiled once, the eager logits. (A 400-position cache of one sequence is where torch 2.13's CPU inductor got
    positions // 128 wrong.)"""
    from torch._dynamo.utils import counters

    model, window = loaded.model, loaded.window_blocks
    seq = documents(400, seed=10, bos_at=(0, 100, 260))[None]
    eager = g.KVDecoder(model, window, 1, seq.size(1), static=True)
    compiled = g.KVDecoder(model, window, 1, seq.size(1), static=True)
    compiled.compile()
    torch._dynamo.reset()
    counters.clear()
    a, b = eager.step(seq[:, :370]), compiled.step(seq[:, :370])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(370, 400):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
            a, b = eager.step(seq[:, t:t + 1]), compiled.step(seq[:, t:t + 1])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def run(loaded, prompt=(464, 3290), **kw) -> list[list[int]]:
    sc = g.SamplingConfig(**{"max_tokens": 10, **kw})
    return g.generate(loaded.model, loaded.window_blocks, list(prompt), sc)


def test_greedy_is_deterministic_and_ignores_the_seed(loaded):
    a = run(loaded, temperature=0, seed=0)
    assert a == run(loaded, temperature=0, seed=0) == run(loaded, temperature=0, seed=123)
    assert len(a[0]) == 10


def test_seeds(loaded):
    a = run(loaded, temperature=1.0, seed=5, num_samples=2)
    assert a == run(loaded, temperature=1.0, seed=5, num_samples=2)
    assert a != run(loaded, temperature=1.0, seed=6, num_samples=2)
    assert a[0] != a[1]  # samples of one batch differ


def test_top_k_1_and_tiny_top_p_are_greedy(loaded):
    greedy = run(loaded, temperature=0)
    assert run(loaded, temperature=1.0, top_k=1, seed=3) == greedy
    assert run(loaded, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_empty_prompt_starts_from_bos(loaded):
    assert len(run(loaded, prompt=(), temperature=0)[0]) == 10


def test_sample_next_never_picks_padding_ids():
    logits = torch.zeros(4, 50304)
    logits[:, g.TEXT_VOCAB:] = 100.0  # padding rows would win everything if they were allowed
    logits[:, 7] = 1.0
    gen = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=1.0, top_k=5),
               dict(temperature=1.0, top_p=0.5)):
        kw = {"top_k": 0, "top_p": 1.0, **kw}
        for _ in range(20):
            assert (g.sample_next(logits, generator=gen, **kw) < g.TEXT_VOCAB).all()
    assert g.sample_next(logits, 0, 0, 1.0, None).tolist() == [7] * 4


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.full((1, 50304), -10.0)
    logits[0, [3, 4, 5]] = torch.tensor([5.0, 4.9, 4.8])
    gen = torch.Generator().manual_seed(0)
    picks = {int(g.sample_next(logits, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert picks == {3, 4}
    picks = {int(g.sample_next(logits, 1.0, 0, 0.5, gen)) for _ in range(200)}
    assert picks == {3, 4}  # 3 alone holds ~0.37 < 0.5, 3 and 4 ~0.7


def test_stops_at_eot_unless_told_not_to(loaded, monkeypatch):
    """Sample 0 draws EOT at its 3rd token, sample 1 at its 6th; each stops there, the other goes on."""
    real = g.sample_next
    calls = []

    def scripted(logits, *args):
        out = real(logits, *args)
        n = len(calls)
        calls.append(n)
        if n == 2:
            out[0] = g.EOT_ID
        if n == 5:
            out[1] = g.EOT_ID
        return out

    monkeypatch.setattr(g, "sample_next", scripted)
    a = run(loaded, temperature=0, num_samples=2, max_tokens=10)
    assert [len(s) for s in a] == [2, 5] and g.EOT_ID not in a[0] + a[1]
    assert len(calls) == 6  # nothing more is generated once every sample has stopped
    calls.clear()
    b = run(loaded, temperature=0, num_samples=2, max_tokens=10, stop_at_eot=False)
    assert [len(s) for s in b] == [10, 10] and b[0][2] == g.EOT_ID and b[1][5] == g.EOT_ID
    assert all(t < g.TEXT_VOCAB for s in a + b for t in s)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and the command line


def cli(*args, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=subprocess_env(**env), timeout=120)


@pytest.mark.slow
def test_cli_generates_from_a_run_directory(trained):
    r = cli("--checkpoint", str(trained), "--prompt", "def", "--max-tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def") and "Traceback" not in r.stderr
    assert "step_000003.pt" in r.stderr


@pytest.mark.slow
def test_cli_prompt_from_stdin_and_world_size_does_not_matter(trained):
    """The same greedy text from --prompt and from stdin, even with a torchrun-like environment of 2 processes."""
    flags = ["--checkpoint", str(trained), "--max-tokens", "8", "--temperature", "0", "--device", "cpu"]
    a = cli(*flags, "--prompt", "import os")
    b = cli(*flags, "--prompt", "-", stdin="import os", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("import os")


def test_checkpoint_weights_are_full_whatever_the_process_count(trained):
    ckpt = checkpoints.load_checkpoint(checkpoints.resolve_checkpoint(str(trained)))
    full = tg.GPT(tg.GPTConfig(**ckpt["model_config"])).state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in full.items()}
    assert "world_size" not in ckpt["hyperparameters"]


def test_several_samples_print_headers(random_ckpt, capsys):
    assert g.main(["--checkpoint", str(random_ckpt), "--prompt", "x", "--num-samples", "2", "--max-tokens", "3",
                   "--device", "cpu", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "----- sample 1 of 2 -----" in out and "----- sample 2 of 2 -----" in out


def test_run_name_picks_a_run_and_the_default_says_it_is_the_newest_of_any(random_ckpt, tmp_path, capsys):
    root = tmp_path / "checkpoints"
    for run in ("older", "newer"):  # two runs; latest points at the newer one's checkpoint
        (root / run).mkdir(parents=True)
        shutil.copy(random_ckpt, root / run / "step_000012.pt")
    checkpoints.point_latest(root, root / "newer" / "step_000012.pt")
    common = ["--checkpoint-dir", str(root), "--device", "cpu", "--max-tokens", "1", "--temperature", "0"]
    assert g.main(common) == 0
    err = capsys.readouterr().err
    assert f"generate.py: {root / 'newer' / 'step_000012.pt'}" in err
    assert f"the newest checkpoint of any run ({root / 'latest'}): --run NAME picks a run" in err
    assert "1 sample(s) of up to 1 tokens, temperature 0, top-k off, top-p 1, seed 0" in err
    assert g.main([*common, "--run", "older"]) == 0
    err = capsys.readouterr().err
    assert f"generate.py: {root / 'older' / 'step_000012.pt'}" in err and "--run NAME picks" not in err
    assert g.main([*common, "--run", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (f"generate.py: error: no checkpoint of run 'nope' in {root / 'nope'}; "
                                               "runs with checkpoints there: newer, older")


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and "--top-p" in r.stdout and "--checkpoint" in r.stdout


def bad_files(tmp_path, random_ckpt) -> dict[str, tuple[Path, str]]:
    truncated = tmp_path / "truncated.pt"
    data = random_ckpt.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {"missing": (tmp_path / "nope.pt", "does not exist"),
            "truncated": (truncated, "not a readable checkpoint"),
            "foreign": (foreign, "not written by this trainer"),
            "text": (text, "not a readable checkpoint"),
            "empty dir": (tmp_path, "no step_*.pt")}


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign", "text", "empty dir"])
def test_bad_checkpoints_exit_2(kind, tmp_path, random_ckpt, capsys):
    path, words = bad_files(tmp_path, random_ckpt)[kind]
    assert g.main(["--checkpoint", str(path), "--device", "cpu", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path.name) in err and "Traceback" not in err


def test_a_checkpoint_with_non_finite_weights_is_one_line(tmp_path, random_ckpt, capsys):
    ckpt = torch.load(random_ckpt, weights_only=True)
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")
    path = tmp_path / "step_000003.pt"
    checkpoints.atomic_save(ckpt, path)
    assert g.main(["--checkpoint", str(path), "--device", "cpu", "--max-tokens", "2"]) == 2
    assert capsys.readouterr().err == (f"generate.py: error: {path} holds weights that are not finite "
                                       "(lm_head.weight): nothing can be sampled from it; use an earlier checkpoint "
                                       "of the run\n")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_sampling_is_one_line(random_ckpt, sig):
    """Stopped without a terminal (timeout -s INT, a supervisor): one line, exit 128 + the signal, no traceback."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(random_ckpt), "--device",
                             "cpu", "--max-tokens", "100000", "--no-stop-at-eot"], cwd=ROOT, env=subprocess_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        assert proc.stderr.readline().startswith("generate.py: ")  # the settings line: sampling has begun
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.splitlines() == [f"generate.py: stopped by {sig.name} while sampling; no file is written, so nothing "
                                "is lost"]


def test_a_mistyped_flag_names_the_flag_it_was_probably_meant_to_be(capsys):
    with pytest.raises(SystemExit) as exc:
        g.main(["--promt", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("generate.py: error: unrecognized arguments: --promt x; did you mean --prompt? "
                                       "(see --help)\n")


@pytest.mark.slow
def test_truncated_checkpoint_from_the_command_line(tmp_path, random_ckpt):
    path, _ = bad_files(tmp_path, random_ckpt)["truncated"]
    r = cli("--checkpoint", str(path), "--device", "cpu")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-2"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file"),
    (["--compile"], "--compile"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),  # the trainer's device rule
])
def test_bad_flags_exit_2(flags, words, random_ckpt, capsys):
    assert g.main(["--checkpoint", str(random_ckpt), "--device", "cpu", *flags]) == 2
    assert words in capsys.readouterr().err


def test_import_has_no_side_effects():
    """Importing parses no arguments, prints nothing and reads no stdin (a test or a notebook may import it)."""
    r = subprocess.run([sys.executable, "-c", "import generate", "--bogus-flag"], capture_output=True, text=True,
                       cwd=ROOT, env=subprocess_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
