"""The FP8 lm_head matmul (FP8Matmul / fp8_linear), run on CPU through torch._scaled_mm, against fp32.

Tolerances come from the formats, not from observed errors. With a per-tensor scale s = amax / fmax, an element x is
stored as q = round(x / s) and read back as q * s. Round-to-nearest on a format with m mantissa bits errs by at most
half a unit in the last place: 2^-(m+1) relative for normal numbers, and half the subnormal spacing (absolute, in
scaled units) below the smallest normal. So, elementwise,

    |x~ - x| <= 2^-(m+1) |x| + 2^(e_sub - 1) s,
    float8_e4m3fn (forward operands):  m = 3, subnormal spacing 2^-9   ->  2^-4 |x| + 2^-10 s
    float8_e5m2   (incoming gradient): m = 2, subnormal spacing 2^-16  ->  2^-3 |g| + 2^-17 s

and a product of two rounded operands obeys |a~ b~ - a b| <= ea |b| + |a| eb + ea eb, summed over the inner dimension:
a rigorous elementwise bound for every output (plus fp32 accumulation, far smaller). For random normal data the errors
are independent, so the relative Frobenius error of x @ w.T is about sqrt(2) x the RMS relative rounding error, which is
below 2^-4 (e4m3); it is also well above zero, which shows that the operands really were rounded to FP8.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_gpt as tg  # noqa: E402
from conftest import tiny_hp  # noqa: E402

E4M3 = dict(rel=2.0 ** -4, sub=2.0 ** -10, fmax=448.0)
E5M2 = dict(rel=2.0 ** -3, sub=2.0 ** -17, fmax=57344.0)


def rounding_bound(x: torch.Tensor, fmt: dict, scale: float | None = None) -> torch.Tensor:
    """Largest possible |dequantised - x| per element for per-tensor scaled FP8 (float64); the scale is amax / fmax
    unless given (an element within fmax * scale)."""
    x = x.detach().double()
    scale = x.abs().max() / fmt["fmax"] if scale is None else scale
    return fmt["rel"] * x.abs() + fmt["sub"] * scale


def matmul_bound(a: torch.Tensor, fa: dict, b: torch.Tensor, fb: dict, scale_a: float | None = None) -> torch.Tensor:
    """Bound on |a~ @ b~ - a @ b| elementwise, a: (M, K), b: (K, N), plus fp32 accumulation over K."""
    ea, eb = rounding_bound(a, fa, scale_a), rounding_bound(b, fb)
    A, B = a.detach().double().abs(), b.detach().double().abs()
    K = a.size(1)
    accumulate = K * 2.0 ** -24 * ((A + ea) @ (B + eb))
    return ea @ B + A @ eb + ea @ eb + accumulate + 1e-30


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_operands(M=64, K=128, N=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,K,N", [(64, 128, 96), (16, 64, 32), (256, 64, 512)])
def test_forward_within_fp8_rounding_bounds(M, K, N):
    x, w = random_operands(M, K, N, seed=M + N)
    y = tg.FP8Matmul.apply(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (M, N) and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    bound = matmul_bound(x, E4M3, w.T, E4M3)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    rel = rel_fro(y, ref)
    assert 0.005 < rel < math.sqrt(2) * E4M3["rel"], rel


def test_fp8_linear_handles_leading_dimensions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    y = tg.fp8_linear(x, w)
    assert y.shape == (2, 32, 48)
    torch.testing.assert_close(y, tg.FP8Matmul.apply(x.reshape(64, 64), w).view(2, 32, 48), rtol=0, atol=0)
    err = (y.double() - x.double() @ w.double().T).abs().reshape(64, 48)
    assert (err <= matmul_bound(x.reshape(64, 64), E4M3, w.T, E4M3)).all()


def test_backward_within_fp8_rounding_bounds():
    x, w = random_operands(64, 128, 96, seed=11)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gout = torch.randn(64, 96, generator=torch.Generator().manual_seed(12))
    tg.FP8Matmul.apply(x, w).backward(gout)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_gx = gout.double() @ w.double()  # dL/dx = g @ w
    ref_gw = gout.double().T @ x.double()  # dL/dw = g.T @ x
    # grad_x = g~ @ w~ with g in e5m2 and w in e4m3; grad_w = g~.T @ x~ with x in e4m3
    assert ((x.grad.double() - ref_gx).abs() <= matmul_bound(gout, E5M2, w, E4M3)).all()
    assert ((w.grad.double() - ref_gw).abs() <= matmul_bound(gout.T, E5M2, x, E4M3)).all()
    # first order, the relative errors of independent operands add in quadrature: below sqrt(2^-6 + 2^-8)
    limit = math.sqrt(E5M2["rel"] ** 2 + E4M3["rel"] ** 2)
    for got, ref in ((x.grad, ref_gx), (w.grad, ref_gw)):
        assert 0.005 < rel_fro(got, ref) < limit


def test_backward_with_a_gradient_bound_within_fp8_rounding_bounds(monkeypatch):
    """With grad_bound the gradient's scale is bound / 57344, not amax / 57344: the same rounding bounds hold with
    that scale, and the backward matmuls receive it."""
    x, w = random_operands(64, 128, 96, seed=13)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gout = torch.randn(64, 96, generator=torch.Generator().manual_seed(14))
    bound = 2 * gout.abs().max().item()  # a loose bound: the gradient uses half the format's range
    scales = []
    real = torch._scaled_mm

    def spy(a, b, *args, scale_a, **kwargs):
        scales.append((a.dtype, scale_a.item()))
        return real(a, b, *args, scale_a=scale_a, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    tg.FP8Matmul.apply(x, w, bound).backward(gout)
    g_scales = [sc for dtype, sc in scales if dtype == torch.float8_e5m2]
    assert g_scales == [pytest.approx(bound / E5M2["fmax"], rel=1e-6)] * 2
    ref_gx, ref_gw = gout.double() @ w.double(), gout.double().T @ x.double()
    scale = bound / E5M2["fmax"]
    assert ((x.grad.double() - ref_gx).abs() <= matmul_bound(gout, E5M2, w, E4M3, scale)).all()
    assert ((w.grad.double() - ref_gw).abs() <= matmul_bound(gout.T, E5M2, x, E4M3, scale)).all()
    limit = math.sqrt(E5M2["rel"] ** 2 + E4M3["rel"] ** 2)
    for got, ref in ((x.grad, ref_gx), (w.grad, ref_gw)):
        assert 0.005 < rel_fro(got, ref) < limit


def test_gradient_beyond_its_bound_saturates():
    x, w = random_operands(32, 64, 48, seed=15)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gout = torch.randn(32, 48, generator=torch.Generator().manual_seed(16))
    tg.FP8Matmul.apply(x, w, 0.1 * gout.abs().max().item()).backward(gout)  # a wrong bound, 10x too small
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()  # clamped to the format's max, not inf


@pytest.mark.parametrize("tokens,accum", [(64, 1), (128, 4)])
def test_head_gradient_bound_holds_and_is_reached(tokens, accum):
    """|d(loss / accum) / d raw| <= head_grad_bound for any raw logits, and nearly equals it at raw = 0 (where the
    soft-cap is steepest) with uniform predictions."""
    cfg = tg.GPTConfig(vocab_size=512)
    bound = tg.head_grad_bound(cfg, tokens, accum)
    assert bound == pytest.approx(30 / (4 * 7.5 * tokens * accum))
    g = torch.Generator().manual_seed(17)
    targets = torch.randint(0, 512, (tokens,), generator=g)
    for raw in (torch.randn(tokens, 512, generator=g) * 20, torch.randn(tokens, 512, generator=g) * 0.5,
                torch.zeros(tokens, 512)):
        raw = raw.double().requires_grad_(True)
        capped = cfg.logit_cap * torch.sigmoid(raw / cfg.logit_cap_div)
        (F.cross_entropy(capped, targets) / accum).backward()
        assert raw.grad.abs().max().item() <= bound * (1 + 1e-9)
    assert raw.grad.abs().max().item() >= bound * (1 - 1 / 512) * (1 - 1e-9)  # raw = 0: the bound is tight


def test_backward_matches_fp32_autograd_direction():
    """Through a loss, the FP8 gradients point where the fp32 ones do."""
    x, w = random_operands(128, 64, 80, seed=21)
    x8, w8 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x32, w32 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    target = torch.randint(0, 80, (128,), generator=torch.Generator().manual_seed(22))
    F.cross_entropy(tg.fp8_linear(x8, w8), target).backward()
    F.cross_entropy(x32 @ w32.T, target).backward()
    for a, b in ((x8.grad, x32.grad), (w8.grad, w32.grad)):
        cos = F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
        assert cos > 0.99
        assert rel_fro(a, b) < math.sqrt(E5M2["rel"] ** 2 + E4M3["rel"] ** 2)


def test_saved_operands_are_fp8(monkeypatch):
    x, w = random_operands(32, 64, 48, seed=31)
    x.requires_grad_(True)
    w.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tg.FP8Matmul.apply(x, w)
    fp8_saved = [t for t in saved if t.dtype == torch.float8_e4m3fn]
    assert sorted(tuple(t.shape) for t in fp8_saved) == sorted([(32, 64), (48, 64)])
    # no full-precision copy of an operand is kept for the backward pass
    assert all(t.numel() == 1 for t in saved if t.dtype not in (torch.float8_e4m3fn,))
    # the per-tensor scale maps the largest magnitude onto the format's maximum, and dequantises back to x
    x8 = next(t for t in fp8_saved if t.shape == x.shape)
    assert x8.float().abs().max().item() == E4M3["fmax"]
    x_scale = next(t for t in saved if t.numel() == 1 and t.item() == pytest.approx(x.abs().max().item() / 448.0))
    assert ((x8.double() * x_scale.double() - x.double()).abs() <= rounding_bound(x, E4M3) * (1 + 1e-6)).all()

    # the operand formats of every _scaled_mm call: e4m3 x e4m3 forward, e5m2 gradient x e4m3 backward
    calls = []
    real = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    y = tg.FP8Matmul.apply(x, w)
    assert calls == [(torch.float8_e4m3fn, torch.float8_e4m3fn)]
    y.backward(torch.randn_like(y))
    assert calls[1:] == [(torch.float8_e5m2, torch.float8_e4m3fn)] * 2


def test_gpt_fp8_head_loss_close_to_fp32():
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=50304, num_layers=2, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=-1)
    model = tg.GPT(cfg).configure(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a zero head gives equal logits in any precision
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.3)
    T = 128
    toks = torch.randint(0, 50256, (T,), generator=g)
    toks[[0, 90]] = tg.BOS_ID
    toks = toks.to(torch.int32)
    targets = torch.randint(0, 50304, (T,), generator=g)

    losses, grads, logits = {}, {}, {}
    for prec in ("fp32", "fp8"):
        model.head_precision = prec
        model.zero_grad(set_to_none=True)
        loss = model(toks, targets, long_window=128)
        loss.backward()
        losses[prec], grads[prec] = loss.item(), model.lm_head.weight.grad.clone()
        with torch.no_grad():
            logits[prec] = model(toks, long_window=128)
    with torch.no_grad():
        h = model.hidden(toks, torch.tensor(128, dtype=torch.int32))[0]
    # d logit / d raw = cap / cap_div * sigmoid' <= 30 / 7.5 / 4 = 1, and cross-entropy changes by at most
    # 2 * max |d logit| per position: a rigorous bound from the FP8 rounding bound of the raw logits
    raw_bound = matmul_bound(h, E4M3, model.lm_head.weight.T, E4M3)
    assert ((logits["fp8"].double() - logits["fp32"].double()).abs() <= raw_bound).all()
    loss_bound = (2 * raw_bound.max(dim=1).values).mean().item()
    diff = abs(losses["fp8"] - losses["fp32"])
    assert 0 < diff <= loss_bound
    # and in practice far closer than that worst case: rounding errors of independent logits average out
    assert diff < 0.01 * losses["fp32"]
    assert abs(losses["fp32"] - math.log(50304)) > 0.1  # the head is not uniform
    cos = F.cosine_similarity(grads["fp8"].flatten().double(), grads["fp32"].flatten().double(), dim=0).item()
    assert cos > 0.99


def test_training_with_the_bound_scale_follows_the_amax_scale(shared_synthetic_data, tmp_path):
    """The same run with --fp8-grad-scale amax and bound (the FP8 head forced on, as CPUs run torch._scaled_mm):
    identical first loss (the forward does not depend on it), then losses that differ by FP8 rounding only."""
    cpu, steps = torch.device("cpu"), 8
    losses = {}
    for mode in ("amax", "bound"):
        hp = tiny_hp(shared_synthetic_data, tmp_path / mode, fp8_grad_scale=mode, num_iterations=steps)
        trainer = tg.Trainer(hp, cpu, train_files=tg.find_shards(hp.data_dir, hp.train_files, "train"))
        trainer.model.head_precision = "fp8"
        expected = tg.head_grad_bound(trainer.cfg, hp.train_seq_len, trainer.grad_accum) if mode == "bound" else None
        assert trainer.model.head_grad_bound == expected
        losses[mode] = [trainer.train_step(trainer.loader.next_batch(cpu)).item() for _ in range(steps)]
    amax, bound = losses["amax"], losses["bound"]
    assert amax[0] == bound[0]
    assert amax != bound  # the bound-scaled gradient was used
    assert max(abs(a - b) for a, b in zip(amax, bound)) < 0.01
    assert amax[-1] < amax[0] - 0.5 and bound[-1] < bound[0] - 0.5  # both trained
