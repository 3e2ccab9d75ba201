"""The default preset against the public record it reproduces: track 1, record 28 (2025-08-23, "SparseAttnGate").

The authority is the record's log, records/track_1_short/2025-08-23_SparseAttnGate/
020630eb-2191-4ba2-9ee4-4cdc94316943.txt in the modded-nanogpt repository (it begins with the training script).
Every expectation below is derived in this file from that record's formulas, not from train_gpt's code: the window
schedule at every step, the layer pattern, the half-truncated rotary tables, a float64 forward of the full 12 x 768
architecture (gate, windows, skips, soft cap) and of small ones, the loss reduction, the FP8 constants, the step's
gradient at the record's scale (for any split over processes and micro-steps), Adam's and Muon's first update, and
the loader's sequence starts across shard switches.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import BOS, tiny_hp, write_shard

CPU = torch.device("cpu")
RECORD_STEPS = 1695
RECORD_PATTERN = "LSSSLSSLSSSL"  # the record's block_masks list: long, short, short, short, long, ...


def speedrun() -> tg.Hyperparameters:
    return tg.preset_hyperparameters("speedrun")


# ---------------------------------------------------------------------------------------------------------------------
# The window schedule and the layer pattern


def record_window_blocks(step: int, num_iterations: int = RECORD_STEPS) -> int:
    """The record's long window: the smallest multiple of 128, at least 128, not below 1728 * step / num_iterations
    (in floating point, as the record computes it), counted in 128-token blocks."""
    target = 1728 * (step / num_iterations)
    size = 128
    while size < target:
        size += 128
    return size // 128


def test_window_schedule_is_the_records_at_every_step():
    got = [tg.window_blocks(s, speedrun()) for s in range(RECORD_STEPS + 1)]
    assert got == [record_window_blocks(s) for s in range(RECORD_STEPS + 1)]
    assert got[:126] == [1] * 126 and got[126] == 2 and got[-1] == 14
    assert [w // 2 for w in got].count(0) == 126  # the short window: a query's own block only, for 126 steps
    # the a10 preset changes the sequence length and the accumulation, never the schedule
    a10 = tg.preset_hyperparameters("a10")
    assert [tg.window_blocks(s, a10) for s in range(RECORD_STEPS + 1)] == got


def test_layer_pattern_value_embeddings_and_shapes_of_the_record():
    with torch.device("meta"):
        model = tg.GPT(tg.GPTConfig.from_hyperparameters(speedrun()))
    assert "".join(model.window_kinds()) == RECORD_PATTERN
    assert [b.attn is None for b in model.blocks] == [i == 7 for i in range(12)]  # block 7 has no attention
    assert model.value_embed_layers() == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["blocks.0.attn.qkv_w"] == (3, 768, 768) and shapes["blocks.0.attn.c_proj.weight"] == (768, 768)
    assert shapes["blocks.0.attn.gate.weight"] == (6, 12)  # num_heads outputs from model_dim / 64 inputs
    # the MLP input matrix as (768, 3072), as since record 27: Muon's shape scale sqrt(max(1, rows / cols)) is 1
    assert shapes["blocks.0.mlp.c_fc"] == (768, 3072) and shapes["blocks.0.mlp.c_proj.weight"] == (768, 3072)
    assert shapes["lm_head.weight"] == (50304, 768) and shapes["embed.weight"] == (50304, 768)
    muon = {n for n, _ in model.param_groups()["muon"]}
    assert {"blocks.0.attn.gate.weight", "blocks.0.mlp.c_fc"} <= muon


# ---------------------------------------------------------------------------------------------------------------------
# Rotary tables


def record_rotary_angles(seq_len: int, head_dim: int) -> torch.Tensor:
    """(seq_len, head_dim / 2) angles in float64: head_dim / 4 frequencies (1/1024)^(k / (head_dim/4 - 1)), then
    head_dim / 4 zero frequencies."""
    quarter = head_dim // 4
    freq = [(1 / 1024) ** (k / (quarter - 1)) for k in range(quarter)] + [0.0] * quarter
    return torch.arange(seq_len, dtype=torch.float64)[:, None] * torch.tensor(freq, dtype=torch.float64)


def test_rotary_tables_are_half_truncated():
    T, hd = 4096, 128
    cos, sin = tg.rotary_tables(T, hd, CPU)
    angles = record_rotary_angles(T, hd)
    # fp32 tables: the frequency, the product and cos/sin each rounded once (2^-24 relative), angles up to T rad
    tol = 4 * T * 2.0 ** -24
    torch.testing.assert_close(cos.double(), angles.cos(), atol=tol, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=tol, rtol=0)
    assert (cos[:, hd // 4:] == 1).all() and (sin[:, hd // 4:] == 0).all()  # a quarter of the pairs never rotate
    # what the record replaced (head_dim / 2 frequencies base^(-2k / head_dim)) is far outside that tolerance
    old = torch.arange(T, dtype=torch.float64)[:, None] * 1024.0 ** (-torch.arange(hd // 2) / (hd // 2))[None, :]
    assert (old.cos() - cos.double()).abs().max() > 100 * tol


# ---------------------------------------------------------------------------------------------------------------------
# The forward: a float64 reference written from the record's formulas


def rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def record_logits(model: tg.GPT, tokens: torch.Tensor, window_blocks: int, pattern: str = RECORD_PATTERN,
                  no_attn: int = 7, gate: bool = True, rotary: str = "record", windows: str = "blocks",
                  vocab: int | None = None) -> torch.Tensor:
    """Soft-capped logits (T, vocab) of the record's forward in float64, from the model's weights: the blocks'
    windows from pattern (repeated to the depth), no attention in block no_attn; vocab: only the first rows of the
    head (for speed).

    gate, rotary and windows switch parts back to what the kit computed before it followed the record (no gate,
    full rotary with base 1024, token-exact windows of 128 x w tokens): they show the test can tell them apart.
    """
    cfg = model.cfg
    L, H, hd, d = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.model_dim
    params = dict(model.named_parameters())
    toks = tokens.long()

    def P(name):
        return params[name].detach().double()

    def rows(name):  # only the rows of the tokens, before converting: the tables are large
        return params[name].detach()[toks].double()

    T = toks.numel()
    docs = (toks == BOS).cumsum(0)
    pos = torch.arange(T)
    causal_doc = (pos[:, None] >= pos[None, :]) & (docs[:, None] == docs[None, :])

    def visible(w: int) -> torch.Tensor:
        if windows == "blocks":  # the query's block and the max(w, 1) - 1 blocks before it
            return causal_doc & ((pos[:, None] // 128 - pos[None, :] // 128) < max(w, 1))
        return causal_doc & ((pos[:, None] - pos[None, :]) < max(w, 1) * 128)

    masks = {"L": visible(window_blocks), "S": visible(window_blocks // 2)}
    if rotary == "record":
        angles = record_rotary_angles(T, hd)
    else:
        angles = pos.double()[:, None] * 1024.0 ** (-torch.arange(hd // 2, dtype=torch.float64) / (hd // 2))
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rope(x):  # (T, H, hd): pairs (x[k], x[k + hd / 2]) rotated by the angle of their position and frequency k
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)

    ve = [rows(f"value_embeds.{t}.weight") for t in range(3)]
    ve_of_block = [0, 1, 2] + [None] * (L - 6) + [0, 1, 2]
    x = x0 = rms(rows("embed.weight"))
    skips = []
    for i in range(L):
        if i >= L // 2:  # U-net: the latest unused output of the first half
            x = x + P("skip_weights")[i - L // 2] * skips.pop()
        lam = P(f"blocks.{i}.lambdas")
        x = lam[0] * x + lam[1] * x0
        if i != no_attn:
            a = f"blocks.{i}.attn."
            h = rms(x)
            w = P(a + "qkv_w")
            q, k, v = ((h @ w[j].T).view(T, H, hd) for j in range(3))
            q, k = rope(rms(q)), rope(rms(k))
            sa = P(a + "lambdas")
            v = sa[0] * v + (sa[1] * ve[ve_of_block[i]].view(T, H, hd) if ve_of_block[i] is not None else 0)
            mask = masks[pattern[i % len(pattern)]]
            scores = torch.einsum("qhd,khd->hqk", q, k) * 0.12
            y = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
            if gate:  # sigmoid of a linear map of the first model_dim / 64 channels, one factor per head
                y = y * torch.sigmoid(h[:, :max(1, d // 64)] @ P(a + "gate.weight").T)[..., None]
            x = x + y.reshape(T, H * hd) @ P(a + "c_proj.weight").T
        m = f"blocks.{i}.mlp."
        x = x + F.relu(rms(x) @ P(m + "c_fc")).square() @ P(m + "c_proj.weight").T
        if i < L // 2:
            skips.append(x)
    head = params["lm_head.weight"].detach()[:vocab].double()
    return 30 * torch.sigmoid(rms(x) @ head.T / 7.5)


def randomise(model: tg.GPT, seed: int) -> None:
    """Random values for the zero-initialised weights (head, output projections, gates) and every scalar, so that
    each part of the function shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(1)))
            elif name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim < 2:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def documents(T: int, bos_at: tuple[int, ...], seed: int, vocab: int = BOS) -> torch.Tensor:
    toks = torch.randint(0, min(vocab, BOS), (T,), generator=torch.Generator().manual_seed(seed))
    toks[list(bos_at)] = BOS
    return toks.to(torch.int32)


# fp32 against float64: each of the 12 blocks adds sums of up to 3,072 products with relative rounding 2^-24 to a
# residual stream of norm about 1 per channel. Raw logits come out with errors of order 1e-5 and the soft cap's
# slope is at most 1, so 1e-3 is a wide margin that still sits two orders of magnitude under the smallest
# difference each part of the function makes (checked by the switched-off references below).
LOGIT_TOL = 1e-3


@pytest.mark.parametrize("window_blocks", [3, 1])  # 1: the first steps' windows (short = 0: own block only)
@pytest.mark.slow
def test_full_size_forward_is_the_records(window_blocks):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig.from_hyperparameters(speedrun())).configure(CPU)
    randomise(model, seed=1)
    T = 640  # five blocks; a 520-token document crosses all of them, so both windows bind
    tokens = documents(T, bos_at=(0, 3, 100, 120), seed=2)
    with torch.no_grad():
        logits = model(tokens, window_blocks=window_blocks)
    ref = record_logits(model, tokens, window_blocks)
    assert logits.shape == (T, 50304) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), ref, atol=LOGIT_TOL, rtol=0)
    # every part matters: each earlier form of it differs by far more than the tolerance
    for change in (dict(gate=False), dict(rotary="full"), dict(windows="tokens")):
        other = record_logits(model, tokens, window_blocks, vocab=2048, **change)
        assert (other - ref[:, :2048]).abs().max() > 100 * LOGIT_TOL, change


@pytest.mark.parametrize("layers,dim,heads,head_dim,no_attn,pattern", [
    (6, 64, 2, 32, 2, "LS"), (8, 128, 2, 64, -1, "LSS"), (12, 64, 1, 64, 7, RECORD_PATTERN)])
def test_small_forwards_are_the_records(layers, dim, heads, head_dim, no_attn, pattern):
    torch.manual_seed(3)
    cfg = tg.GPTConfig(num_layers=layers, model_dim=dim, num_heads=heads, head_dim=head_dim, no_attn_layer=no_attn,
                       window_pattern=pattern)
    model = tg.GPT(cfg).configure(CPU)
    randomise(model, seed=4)
    tokens = documents(512, bos_at=(0, 129, 130, 300), seed=5)
    with torch.no_grad():
        logits = model(tokens, window_blocks=2)
    ref = record_logits(model, tokens, 2, pattern=pattern, no_attn=no_attn)
    torch.testing.assert_close(logits.double(), ref, atol=LOGIT_TOL, rtol=0)


def test_loss_is_summed_in_training_and_averaged_in_validation():
    """The record's cross-entropy: reduction "sum" while training (its gradients are then large enough that Adam's
    eps of 1e-10 is negligible and FP8's fixed gradient scale fits), "mean" in eval mode."""
    torch.manual_seed(6)
    model = tg.GPT(tg.GPTConfig(num_layers=6, model_dim=64, num_heads=1, head_dim=64, no_attn_layer=-1))
    model.configure(CPU)
    randomise(model, seed=7)
    tokens = documents(257, bos_at=(0, 90), seed=8)
    inputs, targets = tokens[:-1], tokens[1:].long()
    ref = record_logits(model, inputs, 1, pattern=model.cfg.window_pattern, no_attn=-1)
    per_token = -ref.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        total = model(inputs, targets, window_blocks=1)
        model.eval()
        mean = model(inputs, targets, window_blocks=1)
    assert total.item() == pytest.approx(per_token.sum().item(), rel=1e-5)
    assert mean.item() == pytest.approx(per_token.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Precision: FP8 head while training only, fixed scales, bf16 embeddings on GPUs


def test_fp8_scales_are_the_records_constants():
    assert tg.fp8_x_scale(768) == 768 ** 0.5 / 448  # x_s: RMS-normalised input, |x| <= sqrt(768)
    assert tg.FP8_W_SCALE == 2.0 ** -9 and tg.FP8_GRAD_SCALE == 1 / 448


def test_fp8_head_while_training_bf16_head_in_validation(monkeypatch):
    model = tg.GPT(tg.GPTConfig(num_layers=1, model_dim=64, num_heads=1, head_dim=64, no_attn_layer=-1))
    model.configure(CPU)
    model.head_precision = "fp8"  # what configure chooses on compute capability >= 8.9
    calls = []
    real = tg.fp8_linear
    monkeypatch.setattr(tg, "fp8_linear", lambda *a, **k: calls.append(a[2:]) or real(*a, **k))
    x = rms(torch.randn(16, 64)).float()
    model.head_logits(x)
    assert calls == [(tg.fp8_x_scale(64), tg.FP8_W_SCALE, tg.FP8_GRAD_SCALE)]
    model.eval()
    model.head_logits(x)
    assert len(calls) == 1  # validation: the plain head


def test_trainer_scales_the_fp8_gradient_scale_with_the_loss(shared_synthetic_data, tmp_path):
    """The head's gradient reaches the FP8 cast multiplied by the loss scale: so is the gradient scale, which keeps
    gradient / scale, and so the e5m2 codes, those of the record's 8-GPU run."""
    hp = tiny_hp(shared_synthetic_data, tmp_path)
    trainer = tg.Trainer(hp, CPU)
    assert trainer.model.fp8_grad_scale == tg.FP8_GRAD_SCALE * tg.loss_scale(hp, 1)


def test_embeddings_are_bf16_on_bf16_gpus_and_the_rest_stays_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model = tg.GPT(tg.GPTConfig(num_layers=2, model_dim=64, num_heads=1, head_dim=64, no_attn_layer=-1))
    model.configure(torch.device("cuda", 0))  # reads the capability only: no GPU needed
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    tables = {"embed.weight"} | {f"value_embeds.{t}.weight" for t in range(3)}
    assert all(dtypes[n] == torch.bfloat16 for n in tables)
    assert all(dt == torch.float32 for n, dt in dtypes.items() if n not in tables)
    cpu = tg.GPT(tg.GPTConfig(num_layers=2, model_dim=64, num_heads=1, head_dim=64)).configure(CPU)
    assert all(p.dtype == torch.float32 for p in cpu.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# The update: the record's 8-GPU gradient, for any split; Adam's and Muon's first step


def test_loss_scale_gives_the_records_gradient_for_every_split():
    """The record averages, over its 8 GPUs, each GPU's loss summed over 49,152 tokens: the step's gradient is the
    per-token gradients summed over the 393,216 tokens and divided by 8. A process here averages over the processes
    too, so it scales each micro-step's sum by processes / 8."""
    for world in (1, 2, 4, 8):
        assert tg.loss_scale(speedrun(), world) == world / 8
    a10 = tg.preset_hyperparameters("a10")
    assert a10.global_batch_tokens == speedrun().global_batch_tokens
    assert tg.loss_scale(a10, 1) == 1 / 8 and tg.loss_scale(a10, 2) == 1 / 4


def captured_step(trainer: tg.Trainer, batch) -> tuple[dict, dict, dict]:
    """(weights before, gradients the optimisers received, weights after) of one train_step."""
    names = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    grads = {}
    for opt in trainer.optimizers.values():
        step = opt.step

        def stepped(step=step):
            grads.update({n: p.grad.detach().clone() for n, p in names.items() if p.grad is not None})
            step()
        opt.step = stepped
    trainer.train_step(batch)
    return before, grads, {n: p.detach().clone() for n, p in names.items()}


def sequence_grads(model: tg.GPT, inputs, targets, window_blocks: int) -> dict:
    """Gradient of one sequence's summed cross-entropy, computed here from the logits."""
    model.zero_grad(set_to_none=True)
    logits = model(inputs, window_blocks=window_blocks)
    (-logits.log_softmax(-1).gather(1, targets[:, None].long())).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def small_trainer(**changes) -> tg.Trainer:
    base = dict(num_layers=6, model_dim=128, num_heads=2, head_dim=64, no_attn_layer=-1, vocab_size=50304,
                device="cpu", attention="dense", compile=False, seed=0)
    hp = dataclasses.replace(tg.preset_hyperparameters("speedrun"), **{**base, **changes})
    trainer = tg.Trainer(hp, CPU)
    randomise(trainer.model, seed=11)
    return trainer


def grad_close(got: dict, expected: dict, rtol: float = 1e-4) -> None:
    """Each gradient within rtol of its own norm (fp32 sums of a few thousand token gradients)."""
    assert set(got) == set(expected)
    for n, g in expected.items():
        scale = g.norm().item()
        assert (got[n] - g).norm().item() <= rtol * scale + 1e-12, n


def test_step_gradient_is_the_records_8_gpu_gradient():
    """One process with 4 sequences of 256 tokens, loss_sum_tokens 256: the record's rule with 4 GPUs of 256 tokens.
    The optimisers must receive the mean over the sequences of each sequence's summed-loss gradient."""
    trainer = small_trainer(train_seq_len=256, seqs_per_step=4, loss_sum_tokens=256)
    tokens = documents(4 * 257, bos_at=(0, 200, 257, 600, 900), seed=12)
    batch = [(tokens[j * 257:j * 257 + 256], tokens[j * 257 + 1:(j + 1) * 257].long()) for j in range(4)]
    reference = copy.deepcopy(trainer.model)
    _, grads, _ = captured_step(trainer, batch)
    per_seq = [sequence_grads(reference, x, y, tg.window_blocks(0, trainer.hp)) for x, y in batch]
    expected = {n: sum(g[n] for g in per_seq) / 4 for n in per_seq[0]}
    grad_close(grads, expected)
    # a mean loss (the kit before) gives gradients 256 times smaller: far outside the tolerance
    assert grads["lm_head.weight"].norm() > 100 * (expected["lm_head.weight"] / 256).norm()


def test_a10_split_gives_the_same_gradient():
    """The a10 preset's rule: the same tokens as 2 sequences of 512 or as 8 of 128 (documents that never cross a
    128-token boundary, so both see the same attention) give the same step gradient."""
    tokens = documents(1025, bos_at=tuple(range(0, 1025, 128)) + (50, 700), seed=13)
    long = small_trainer(train_seq_len=512, seqs_per_step=2, loss_sum_tokens=512)
    short = small_trainer(train_seq_len=128, seqs_per_step=8, loss_sum_tokens=512)
    short.model.load_state_dict(long.model.state_dict())
    split = lambda T: [(tokens[s:s + T], tokens[s + 1:s + T + 1].long()) for s in range(0, 1024, T)]  # noqa: E731
    _, g_long, _ = captured_step(long, split(512))
    _, g_short, _ = captured_step(short, split(128))
    grad_close(g_short, g_long)


def record_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """Five quintic iterations (3.4445, -4.7750, 2.0315) on the wide orientation after dividing by the Frobenius
    norm, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def test_newton_schulz_is_the_records_iteration():
    """The kit's bf16 iteration against the record's quintic in float64, on matrices whose singular values lie in
    [1, 10] (badly conditioned ones amplify bf16 rounding in their small directions: the iteration's slope at 0 is
    3.4445, five times over)."""
    g = torch.Generator().manual_seed(15)
    for shape in ((128, 512), (512, 128), (3, 64, 64), (2, 2)):
        *batch, m, n = shape
        r = min(m, n)
        U = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=torch.float64))[0]
        G = (U * torch.linspace(1, 10, r, dtype=torch.float64)) @ V.mT
        ref = torch.stack([record_newton_schulz(x) for x in G.view(-1, m, n)]).view(shape)
        got = tg.zeropower_via_newtonschulz5(G.float()).double()
        # bf16 keeps 8 significant bits: each of the 15 matmuls rounds to 2^-9 relative; 5% covers them
        assert ((got - ref).norm() / ref.norm()).item() < 0.05, shape


def test_first_adam_and_muon_updates_are_the_records():
    """After one step from the captured gradients: Adam p -= lr sqrt(1 - b2) / (1 - b1) m / (sqrt(v) + eps) with
    m = (1 - b1) g, v = (1 - b2) g^2 and lr 0.008 x (75, 1, 5); Muon p -= 0.05 sqrt(max(1, rows / cols)) NS(u),
    u = g.lerp(buf, m), buf = 0.lerp(g, 1 - m), m = 0.85 at step 0, with the kit's own bf16 iteration as NS (checked
    against the record's above): gradients of a few sequences are badly conditioned, where bf16 and float64
    iterations part."""
    trainer = small_trainer(train_seq_len=256, seqs_per_step=2, loss_sum_tokens=256)
    tokens = documents(514, bos_at=(0, 300), seed=14)
    before, grads, after = captured_step(trainer, [(tokens[:256], tokens[1:257].long()),
                                                   (tokens[257:513], tokens[258:514].long())])
    b1, b2, eps = 0.8, 0.95, 1e-10
    lrs = {"embed.weight": 0.6, "value_embeds.0.weight": 0.6, "lm_head.weight": 0.008, "skip_weights": 0.04,
           "blocks.0.lambdas": 0.04, "blocks.5.attn.lambdas": 0.04}
    for name, lr in lrs.items():
        g = grads[name].double()
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected = before[name].double() - lr * math.sqrt(1 - b2) / (1 - b1) * m / (v.sqrt() + eps)
        torch.testing.assert_close(after[name].double(), expected, atol=1e-6 * lr + 1e-7, rtol=1e-6, msg=name)
    momentum = 0.85
    for name in ("blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj.weight", "blocks.1.attn.qkv_w",
                 "blocks.1.attn.gate.weight"):
        g = grads[name]
        # the record's momentum arithmetic, in fp32 as it runs it: buf.lerp_(g, 1 - m), then g.lerp(buf, m). The
        # same fp32 input matters: one bf16 rounding flipped by a last-bit difference is amplified by the iteration
        buffer = torch.zeros_like(g).lerp_(g, 1 - momentum)
        update = tg.zeropower_via_newtonschulz5(g.lerp(buffer, momentum)).double()
        scale = math.sqrt(max(1.0, g.size(-2) / g.size(-1)))
        expected = before[name].double() - 0.05 * scale * update
        delta, ref = after[name].double() - before[name].double(), expected - before[name].double()
        # the same iteration on the same input: what remains is the weights' fp32 rounding (2^-24 of |p| ~ 0.1)
        # against updates of 0.05 x entries of order 1 / sqrt(cols), well under 1e-4 of the update
        rel = ((delta - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, (name, rel)
        if name == "blocks.0.mlp.c_fc":  # (128, 512): scale 1; the transposed layout's scale 2 is far off
            assert scale == 1.0 and ((delta - 2 * ref).norm() / ref.norm()).item() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# The loader: the record's sequence starts, across shard switches


def record_loader_starts(shards: list[np.ndarray], seq_len: int, world_size: int, grad_accum: int):
    """The record's training data order, for all its processes at once: per step, the (shard, start) of each
    sequence, micro-step by micro-step and rank by rank. Shards are read in order; a step needs its look-ahead of
    2 x grad_accum x world_size x seq_len tokens (plus one) in the current shard, else the shard's rest is dropped;
    each micro-step gives each rank a sequence starting at a BOS, the next rank's at the first BOS at least seq_len
    later, and moves on to the first BOS at least seq_len after the last one. After the last shard it stops."""
    index, pos = 0, 0
    tokens = shards[0]
    while True:
        lookahead = grad_accum * 2 * world_size * seq_len
        if pos + lookahead + 1 >= len(tokens):
            index += 1
            if index == len(shards):
                return
            tokens, pos = shards[index], 0
        step = []
        for _ in range(grad_accum):
            bos = pos + np.flatnonzero(tokens[pos:pos + lookahead] == BOS)
            start, starts, end = int(bos[0]), [], None
            for b in bos[1:]:
                if b - start >= seq_len:
                    starts.append(start)
                    if len(starts) == world_size:
                        end = int(b)
                        break
                    start = int(b)
            assert end is not None, "the record stops here: documents too long for its look-ahead"
            step += [(index, s) for s in starts]
            lookahead -= end - pos
            pos = end
        yield step


def random_documents(n: int, seed: int) -> np.ndarray:
    """n tokens of documents of 10 to 200 tokens, each starting with BOS: short against the test's 256-token
    sequences, as FineWeb's are against the record's 49,152, so the record's look-ahead always suffices."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n:
        doc = rng.integers(0, BOS, size=int(rng.integers(10, 201)))
        doc[0] = BOS
        out.append(doc)
        total += doc.size
    return np.concatenate(out)[:n]


def test_loader_reads_the_records_sequences_across_shard_switches(tmp_path):
    T, S = 256, 8
    shards = [random_documents(n, seed=20 + i) for i, n in enumerate((21_000, 17_500, 26_000))]
    paths = [str(write_shard(tmp_path / f"t_{i:06d}.bin", s)) for i, s in enumerate(shards)]
    record = list(record_loader_starts(shards, T, world_size=8, grad_accum=1))
    # the record's own invariance: one GPU accumulating 8 sequences reads what 8 GPUs read
    assert list(record_loader_starts(shards, T, world_size=1, grad_accum=8)) == record
    assert list(record_loader_starts(shards, T, world_size=2, grad_accum=4)) == record
    assert len(record) >= 20 and len({index for step in record for index, _ in step}) == 3  # two shard switches
    loader = tg.TrainLoader(paths, T, S, span_multiplier=2.0)
    kit = []
    for _ in record:
        starts = loader.step_starts()
        kit.append([(loader.shard, s) for s in starts])
    assert kit == record
    assert loader.unaligned_steps == 0
    # and each process of a split takes sequence j % world_size of each step, as the record's ranks do
    for world in (2, 4):
        split = [tg.TrainLoader(paths, T, S, rank=r, world_size=world) for r in range(world)]
        for step in record[:12]:
            batches = [ld.next_batch(CPU) for ld in split]
            for j, (index, start) in enumerate(step):
                inputs, targets = batches[j % world][j // world]
                expected = shards[index][start:start + T + 1].astype(np.int64)
                assert np.array_equal(inputs.numpy(), expected[:-1]) and np.array_equal(targets.numpy(), expected[1:])
