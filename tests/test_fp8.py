"""The FP8 lm_head matmul (FP8Matmul / fp8_linear) with the record's fixed scales, run on CPU through
torch._scaled_mm, against fp32.

Tolerances come from the formats, not from observed errors. With a fixed per-tensor scale s an element x is stored as
q = round(clamp(x / s, -fmax, fmax)) and read back as q * s. Round-to-nearest on a format with m mantissa bits errs by
at most half a unit in the last place: 2^-(m+1) relative for normal numbers, and half the subnormal spacing (absolute,
in scaled units) below the smallest normal. An element beyond fmax * s saturates: it reads back as +-fmax * s, off by
|x| - fmax * s. So, elementwise, with c = clamp(x, -fmax s, fmax s),

    |x~ - x| <= |x - c| + 2^-(m+1) |c| + 2^(e_sub - 1) s,
    float8_e4m3fn (forward operands):  m = 3, subnormal spacing 2^-9, fmax 448    ->  2^-4 |c| + 2^-10 s
    float8_e5m2   (incoming gradient): m = 2, subnormal spacing 2^-16, fmax 57344 ->  2^-3 |c| + 2^-17 s

plus 2 fp32 roundings (the division by s, s itself in fp32): 2^-23 |c|. A product of two rounded operands obeys
|a~ b~ - a b| <= ea |b| + |a| eb + ea eb; summed over the inner dimension K this bounds every output, plus the fp32
accumulation (at most (K + 4) 2^-24 sum |a~ b~|: K - 1 additions, the output's two scale multiplications; products of
FP8 codes are exact in fp32). For random data the errors are independent, so the relative Frobenius error of x @ w.T
is about sqrt(2) x the RMS relative rounding error, which is below 2^-4 (e4m3); it is also well above zero, which shows
that the operands really were rounded to FP8. (Errors of alike values add coherently instead: early in training every
untargeted p_j is about 1/V, all round the same way in e5m2, and the hidden state's gradient comes out some 10% off.)

The scales: the head's input is RMS-normalised, so |x| <= sqrt(model_dim) and x_s = sqrt(model_dim) / 448 keeps it in
e4m3's range; w_s = 2^-9 covers weights up to 0.875; the gradient of one token's loss w.r.t. a raw logit is at most 1
(test_head_gradient_per_token_is_at_most_one), so grad_s = 1/448 puts it at most at code 448, far inside e5m2.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import tiny_hp

E4M3 = dict(rel=2.0 ** -4, sub=2.0 ** -10, fmax=448.0)
E5M2 = dict(rel=2.0 ** -3, sub=2.0 ** -17, fmax=57344.0)
FP32_U = 2.0 ** -24  # unit roundoff of fp32
W_S, GRAD_S = 2.0 ** -9, 1 / 448


def x_scale(model_dim: int) -> float:
    return math.sqrt(model_dim) / 448


def rounding_bound(x: torch.Tensor, fmt: dict, scale: float) -> torch.Tensor:
    """Largest possible |dequantised - x| per element (float64) for FP8 with the given fixed scale; elements beyond
    fmax * scale saturate."""
    x = x.detach().double()
    limit = fmt["fmax"] * scale
    c = x.clamp(-limit, limit)
    return (x - c).abs() + (fmt["rel"] + 2 * FP32_U) * c.abs() + fmt["sub"] * scale


def matmul_bound(a: torch.Tensor, fa: dict, sa: float, b: torch.Tensor, fb: dict, sb: float) -> torch.Tensor:
    """Bound on |a~ @ b~ - a @ b| elementwise, a: (M, K) in format fa with scale sa, b: (K, N) in fb with sb, plus
    fp32 accumulation over K."""
    ea, eb = rounding_bound(a, fa, sa), rounding_bound(b, fb, sb)
    A, B = a.detach().double().abs(), b.detach().double().abs()
    accumulate = (a.size(1) + 4) * FP32_U * ((A + ea) @ (B + eb))
    return ea @ B + A @ eb + ea @ eb + accumulate


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def head_input(*shape, seed=0):
    """An RMS-normalised activation, as the head receives it: |x| <= sqrt(shape[-1])."""
    return tg.norm(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def random_operands(M=64, K=128, N=96, seed=0):
    """Head input x (M, K) and head weight w (N, K), |w| well below 0.875 (no saturation)."""
    x = head_input(M, K, seed=seed)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    return x, w


class ScaledMMSpy:
    """Records the operands' dtypes, the scales and the FP8 operands of every torch._scaled_mm call."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = torch._scaled_mm

        def spy(a, b, *args, scale_a, scale_b, **kwargs):
            self.calls.append(dict(dtypes=(a.dtype, b.dtype), scales=(scale_a.item(), scale_b.item()),
                                   a=a.detach().clone(), b=b.detach().clone()))
            return real(a, b, *args, scale_a=scale_a, scale_b=scale_b, **kwargs)

        monkeypatch.setattr(torch, "_scaled_mm", spy)

    def gradients(self) -> list[torch.Tensor]:
        """The e5m2 gradient operands of the backward calls of grad_x (where it is the first operand)."""
        return [c["a"] for c in self.calls if c["dtypes"][0] == torch.float8_e5m2]


def f32(v: float) -> float:
    """v as the fp32 scale tensor torch._scaled_mm receives."""
    return torch.tensor(v, dtype=torch.float32).item()


@pytest.fixture(autouse=True)
def scaled_mm_without_onednn():
    """PyTorch's own CPU torch._scaled_mm (the FP8 codes widened to fp32, an fp32 matmul, the scales applied) instead
    of oneDNN's, whose e4m3 x e4m3 kernel runs at some 30 M multiply-adds per second on CPUs without FP8 units: a
    (256, 64) x (64, 50304) head forward takes 30 s. test_scaled_mm_paths_agree checks that both compute the same."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


# ---------------------------------------------------------------------------------------------------------------------


def test_scaled_mm_paths_agree():
    """With oneDNN on and off, torch._scaled_mm gives the FP8 product within fp32 accumulation of the exact one
    (products of FP8 codes are exact in fp32), for each operand pairing the head uses."""
    g = torch.Generator().manual_seed(7)
    sa, sb = torch.tensor(x_scale(64)), torch.tensor(W_S)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    for da, db in ((e4, e4), (e5, e4), (e4, e5)):
        a = (torch.randn(32, 64, generator=g) * 50).to(da)
        b = (torch.randn(48, 64, generator=g) * 50).to(db)
        exact = (a.double() @ b.double().T) * sa.double() * sb.double()
        bound = (64 + 4) * FP32_U * (a.double().abs() @ b.double().abs().T) * sa.double() * sb.double()
        for onednn in (True, False):
            torch.backends.mkldnn.enabled = onednn
            out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
            assert ((out.double() - exact).abs() <= bound).all(), (da, db, onednn)


def test_fixed_scales_are_the_records():
    assert tg.FP8_W_SCALE == W_S and tg.FP8_GRAD_SCALE == GRAD_S
    for d in (64, 768, 1024):
        assert tg.fp8_x_scale(d) == x_scale(d)
    # an RMS-normalised vector with all its mass on one element reaches sqrt(model_dim): code 448, e4m3's largest
    x = tg.norm(torch.tensor([[0.0] * 767 + [100.0]]))
    assert x.abs().max().item() == pytest.approx(math.sqrt(768), rel=1e-6)
    assert x.abs().max().item() / tg.fp8_x_scale(768) == pytest.approx(E4M3["fmax"], rel=1e-6)
    assert head_input(64, 768).abs().max().item() <= math.sqrt(768) * (1 + 1e-6)  # the bound holds for any input


@pytest.mark.parametrize("M,K,N", [(64, 128, 96), (16, 64, 32), (256, 64, 512)])
def test_forward_within_fp8_rounding_bounds(M, K, N):
    x, w = random_operands(M, K, N, seed=M + N)
    y = tg.FP8Matmul.apply(x, w, x_scale(K), W_S, GRAD_S)
    ref = x.double() @ w.double().T
    assert y.shape == (M, N) and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    bound = matmul_bound(x, E4M3, x_scale(K), w.T, E4M3, W_S)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    rel = rel_fro(y, ref)
    assert 0.005 < rel < math.sqrt(2) * E4M3["rel"], rel


def test_fp8_linear_handles_leading_dimensions():
    x = head_input(2, 32, 64, seed=3)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    y = tg.fp8_linear(x, w, x_scale(64))  # the defaults: w_s and grad_s are the record's
    assert y.shape == (2, 32, 48)
    flat = tg.FP8Matmul.apply(x.reshape(64, 64), w, x_scale(64), W_S, GRAD_S)
    torch.testing.assert_close(y, flat.view(2, 32, 48), rtol=0, atol=0)
    err = (y.double() - x.double() @ w.double().T).abs().reshape(64, 48)
    assert (err <= matmul_bound(x.reshape(64, 64), E4M3, x_scale(64), w.T, E4M3, W_S)).all()


def test_backward_within_fp8_rounding_bounds():
    x, w = random_operands(64, 128, 96, seed=11)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gout = torch.rand(64, 96, generator=torch.Generator().manual_seed(12)) * 2 - 1  # per-token gradients: |g| <= 1
    tg.FP8Matmul.apply(x, w, x_scale(128), W_S, GRAD_S).backward(gout)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_gx = gout.double() @ w.double()  # dL/dx = g @ w
    ref_gw = gout.double().T @ x.double()  # dL/dw = g.T @ x
    # grad_x = g~ @ w~ with g in e5m2 and w in e4m3; grad_w = g~.T @ x~ with x in e4m3
    assert ((x.grad.double() - ref_gx).abs() <= matmul_bound(gout, E5M2, GRAD_S, w, E4M3, W_S)).all()
    assert ((w.grad.double() - ref_gw).abs() <= matmul_bound(gout.T, E5M2, GRAD_S, x, E4M3, x_scale(128))).all()
    # first order, the relative errors of independent operands add in quadrature: below sqrt(2^-6 + 2^-8)
    limit = math.sqrt(E5M2["rel"] ** 2 + E4M3["rel"] ** 2)
    for got, ref in ((x.grad, ref_gx), (w.grad, ref_gw)):
        assert 0.005 < rel_fro(got, ref) < limit


def test_backward_matches_fp32_autograd_direction():
    """Through the soft-capped summed loss, the FP8 gradients point where the fp32 ones do."""
    x, w = random_operands(128, 64, 80, seed=21)
    x8, w8 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x32, w32 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    target = torch.randint(0, 80, (128,), generator=torch.Generator().manual_seed(22))

    def loss(raw):
        return F.cross_entropy(30 * torch.sigmoid(raw / 7.5), target, reduction="sum")

    loss(tg.fp8_linear(x8, w8, x_scale(64))).backward()
    loss(x32 @ w32.T).backward()
    for a, b in ((x8.grad, x32.grad), (w8.grad, w32.grad)):
        cos = F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
        assert cos > 0.99
        assert rel_fro(a, b) < math.sqrt(E5M2["rel"] ** 2 + E4M3["rel"] ** 2)


def test_saved_operands_are_fp8_at_the_fixed_scales():
    """The backward keeps the two e4m3 operands only (the scales are Python floats): no full-precision copy. They are
    the operands at the fixed scales, not at a per-tensor amax one (which would put the largest code at 448)."""
    x, w = random_operands(32, 64, 48, seed=31)
    x.requires_grad_(True)
    w.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tg.FP8Matmul.apply(x, w, x_scale(64), W_S, GRAD_S)
    assert all(t.dtype == torch.float8_e4m3fn for t in saved), [t.dtype for t in saved]
    assert sorted(tuple(t.shape) for t in saved) == sorted([(32, 64), (48, 64)])
    x8 = next(t for t in saved if t.shape == x.shape)
    w8 = next(t for t in saved if t.shape == w.shape)
    for q, v, s in ((x8, x, x_scale(64)), (w8, w, W_S)):
        assert ((q.double() * s - v.double()).abs() <= rounding_bound(v, E4M3, s)).all()
        assert q.float().abs().max().item() < E4M3["fmax"] / 2  # these operands use less than the format's range


def test_scaled_mm_formats_and_scales(monkeypatch):
    """Forward e4m3 x e4m3 with (x_s, w_s); backward grad_x = e5m2 x e4m3 with (grad_s, w_s) and grad_w = (x8.T @ g8).T,
    e4m3 x e5m2 with (x_s, grad_s): exactly the scales given, in fp32."""
    x, w = random_operands(32, 64, 48, seed=33)
    x.requires_grad_(True)
    w.requires_grad_(True)
    spy = ScaledMMSpy(monkeypatch)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    for grad_s in (GRAD_S, GRAD_S / 8):  # the default, and the trainer's for one process accumulating 8
        spy.calls.clear()
        y = tg.fp8_linear(x, w, x_scale(64), grad_s=grad_s)
        assert [c["dtypes"] for c in spy.calls] == [(e4, e4)]
        assert spy.calls[0]["scales"] == (f32(x_scale(64)), f32(W_S))
        y.backward(torch.rand_like(y) * 2 - 1)
        assert [c["dtypes"] for c in spy.calls[1:]] == [(e5, e4), (e4, e5)]
        assert [c["scales"] for c in spy.calls[1:]] == [(f32(grad_s), f32(W_S)), (f32(x_scale(64)), f32(grad_s))]


def test_gpt_head_uses_its_fixed_scales_in_training_only(monkeypatch):
    """The model's FP8 head passes x_s = sqrt(model_dim)/448, w_s, and its fp8_grad_scale to torch._scaled_mm, while
    training; in eval mode (validation, sampling) it runs the plain head."""
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=50304, num_layers=2, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=-1)
    model = tg.GPT(cfg).configure(torch.device("cpu"))
    model.head_precision, model.fp8_grad_scale = "fp8", GRAD_S / 8
    toks = torch.randint(0, 50256, (128,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    spy = ScaledMMSpy(monkeypatch)
    model.train()
    model(toks, toks.long(), window_blocks=1).backward()
    assert [c["scales"] for c in spy.calls] == [(f32(x_scale(64)), f32(W_S)), (f32(GRAD_S / 8), f32(W_S)),
                                                (f32(x_scale(64)), f32(GRAD_S / 8))]
    spy.calls.clear()
    model.eval()
    with torch.no_grad():
        model(toks, toks.long(), window_blocks=1)
        model(toks, window_blocks=1)
    assert spy.calls == []


def test_values_beyond_the_fixed_range_saturate():
    """An input beyond sqrt(model_dim), a weight beyond 0.875 and a gradient beyond 57344 x grad_s read back as the
    format's largest value (unclamped, e4m3fn would give NaN and e5m2 inf): finite outputs, within the bounds that
    count |x| - fmax s as the saturated elements' error."""
    x, w = random_operands(32, 64, 48, seed=41)
    x[0, :4] = torch.tensor([100.0, -100.0, 1e6, -1e30])
    w[:3, 0] = torch.tensor([2.0, -50.0, 1e20])
    gout = torch.rand(32, 48, generator=torch.Generator().manual_seed(42)) * 2 - 1
    gout[1, :3] = torch.tensor([1000.0, -1e5, 1e30])  # 57344 / 448 = 128 is the largest representable
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = tg.FP8Matmul.apply(x, w, x_scale(64), W_S, GRAD_S)
    y.backward(gout)
    for t in (y, x.grad, w.grad):
        assert torch.isfinite(t).all()
    # compare with the saturated operands (the huge originals would swamp the bound)
    xs = x_scale(64)
    xc, wc = x.detach().clamp(-448 * xs, 448 * xs), w.detach().clamp(-448 * W_S, 448 * W_S)
    gc = gout.clamp(-57344 * GRAD_S, 57344 * GRAD_S)
    assert ((y.double() - xc.double() @ wc.double().T).abs() <= matmul_bound(xc, E4M3, xs, wc.T, E4M3, W_S)).all()
    assert ((x.grad.double() - gc.double() @ wc.double()).abs() <= matmul_bound(gc, E5M2, GRAD_S, wc, E4M3, W_S)).all()
    assert ((w.grad.double() - gc.double().T @ xc.double()).abs()
            <= matmul_bound(gc.T, E5M2, GRAD_S, xc, E4M3, xs)).all()
    # and the bound with saturation holds for the raw operands too, on the rows and columns without a huge element
    assert ((y.double() - x.detach().double() @ w.detach().double().T).abs()
            <= matmul_bound(x, E4M3, xs, w.T, E4M3, W_S))[1:, 3:].all()


def test_head_gradient_per_token_is_at_most_one():
    """For z = 30 sigmoid(raw / 7.5) and one token's cross-entropy, d loss / d z_j = p_j - [j = target] lies in
    (-1, 1) and dz/draw = 4 sigmoid'(raw / 7.5) <= 1, so |d loss / d raw_j| < 1 for any raw logits; it nearly reaches
    1 for a target at raw = 0 (steepest cap) that the others outscore. A summed loss keeps each token's gradient, so
    with grad_s = 1/448 its largest e5m2 code is at most 448 (a mean would divide it by the token count)."""
    T, V = 64, 512
    g = torch.Generator().manual_seed(17)
    targets = torch.randint(0, V, (T,), generator=g)
    cases = [torch.randn(T, V, generator=g, dtype=torch.float64) * s for s in (0.5, 5.0, 50.0)]
    tight = torch.full((T, V), 60.0, dtype=torch.float64)
    tight[torch.arange(T), targets] = 0.0
    for raw in cases + [tight]:
        raw = raw.requires_grad_(True)
        F.cross_entropy(30 * torch.sigmoid(raw / 7.5), targets, reduction="sum").backward()
        assert raw.grad.abs().max().item() < 1
        assert raw.grad.abs().max().item() / GRAD_S <= 448 < E5M2["fmax"]  # its largest code, far from saturating
    # p_target = e^15 / (e^15 + (V - 1) e^(30 sigmoid(8))) < e^-14.9 and the cap's slope at 0 is exactly 1
    assert raw.grad[torch.arange(T), targets].abs().min().item() > 1 - math.exp(-14.9)


@pytest.mark.slow
def test_trainer_grad_scale_gives_the_record_codes(shared_synthetic_data, tmp_path, monkeypatch):
    """One process accumulating 8 sequences scales each summed loss by loss_scale = 1/8, so the head's gradient
    arrives scaled by 1/8: the trainer's FP8 gradient scale FP8_GRAD_SCALE x loss_scale keeps gradient / scale, and so
    the e5m2 codes, exactly those of the record's 8 GPUs (a power-of-two factor commutes with every rounding)."""
    assert tg.loss_scale(tg.Hyperparameters(), 1) == 1 / 8 and tg.loss_scale(tg.Hyperparameters(), 8) == 1
    cpu = torch.device("cpu")
    hp = tiny_hp(shared_synthetic_data, tmp_path, seqs_per_step=8, loss_sum_tokens=256)  # train_seq_len is 256
    trainers = [tg.Trainer(hp, cpu, train_files=tg.find_shards(hp.data_dir, hp.train_files, "train")) for _ in "ab"]
    ours, record = trainers
    assert ours.loss_scale == 1 / 8
    assert ours.model.fp8_grad_scale == tg.FP8_GRAD_SCALE * ours.loss_scale
    head = torch.randn(record.model.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    for t in trainers:
        t.model.head_precision = "fp8"
        with torch.no_grad():
            t.model.lm_head.weight.copy_(head)  # the zero-initialised head would give uniform predictions
    batch = ours.loader.next_batch(cpu)
    assert len(batch) == 8
    spy = ScaledMMSpy(monkeypatch)
    ours.train_step(batch)
    our_codes = spy.gradients()
    spy.calls.clear()
    record.model.fp8_grad_scale = tg.FP8_GRAD_SCALE  # world_size 8: loss_scale 1
    window = record.window_tensor(0)
    for inputs, targets in batch:  # each of the record's GPUs: one sequence's summed loss
        record.model(inputs, targets, window).backward()
    record_codes = spy.gradients()
    assert len(our_codes) == len(record_codes) == 8
    for a, b in zip(our_codes, record_codes):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert 0 < a.float().abs().max().item() <= E4M3["fmax"]  # per-token gradients <= 1: codes <= 448


def test_gpt_fp8_head_loss_close_to_fp32():
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=50304, num_layers=2, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=-1)
    model = tg.GPT(cfg).configure(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a zero head gives equal logits in any precision; 0.1 keeps |w| below 0.875
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.1)
    T = 128
    toks = torch.randint(0, 50256, (T,), generator=g)
    toks[[0, 90]] = tg.BOS_ID
    toks = toks.to(torch.int32)
    targets = torch.randint(0, 50304, (T,), generator=g)

    model.train()
    losses, grads, logits = {}, {}, {}
    for prec in ("fp32", "fp8"):
        model.head_precision = prec
        model.zero_grad(set_to_none=True)
        loss = model(toks, targets, window_blocks=1)  # summed over the tokens in training mode
        loss.backward()
        losses[prec], grads[prec] = loss.item(), model.lm_head.weight.grad.clone()
        with torch.no_grad():
            logits[prec] = model(toks, window_blocks=1)
    with torch.no_grad():
        h = model.hidden(toks, torch.tensor(1, dtype=torch.int32))[0]
        model.eval()  # the mean, and the plain head whatever head_precision says
        assert model(toks, targets, window_blocks=1).item() == pytest.approx(losses["fp32"] / T, rel=1e-6)
        model.train()
    # d logit / d raw = cap / cap_div * sigmoid' <= 30 / 7.5 / 4 = 1: the logits differ by at most the raw logits'
    # rounding bound, plus each fp32 evaluation of the cap (a few roundings of a value below 30: under 30 x 2^-20)
    raw_bound = matmul_bound(h, E4M3, x_scale(64), model.lm_head.weight.T, E4M3, W_S) + 2 * 30 * 2.0 ** -20
    assert ((logits["fp8"].double() - logits["fp32"].double()).abs() <= raw_bound).all()
    # a token's cross-entropy changes by at most 2 max_j |d logit_j|; the fp32 log-sum-exp over V terms errs by at
    # most about V x 2^-24 per token in each run
    loss_bound = (2 * raw_bound.max(dim=1).values).sum().item() + 2 * T * 50304 * FP32_U
    diff = abs(losses["fp8"] - losses["fp32"])
    assert 0 < diff <= loss_bound
    # and far closer than that worst case: first order a token's change is sum_j (p_j - [j = t]) d_j, independent
    # zero-mean rounding errors d_j whose RMS is below their bound, so the T tokens' sum grows like sqrt(T), not T:
    # about bound / (2 sqrt(T)) = bound / 23 at most
    assert diff < loss_bound / 10
    assert abs(losses["fp32"] / T - math.log(50304)) > 0.1  # the head is not uniform
    cos = F.cosine_similarity(grads["fp8"].flatten().double(), grads["fp32"].flatten().double(), dim=0).item()
    assert cos > 0.99


@pytest.mark.slow
def test_training_with_the_fp8_head(shared_synthetic_data, tmp_path, monkeypatch):
    """The same short CPU run with the head in fp32 and with the FP8 head forced on (CPUs run torch._scaled_mm).

    No tolerance between the two trajectories follows from the formats (Adam's and Muon's normalised updates and the
    model's nonlinearity amplify a rounding difference by factors nothing bounds, and the near-uniform early
    predictions make the gradient's e5m2 rounding coherent, not random), so: both train, the first losses are
    identical up to summation order (step one's forward depends on no gradient, and the zero-initialised head
    gives raw logits 0 in any precision), later ones differ (FP8 gradients were used: every micro-step ran the FP8
    forward and both backward matmuls)."""
    cpu, steps = torch.device("cpu"), 8
    losses = {}
    for prec in ("fp32", "fp8"):
        hp = tiny_hp(shared_synthetic_data, tmp_path / prec, num_iterations=steps)
        trainer = tg.Trainer(hp, cpu, train_files=tg.find_shards(hp.data_dir, hp.train_files, "train"))
        assert trainer.model.head_precision == "fp32"  # the CPU default
        trainer.model.head_precision = prec
        with monkeypatch.context() as m:
            spy = ScaledMMSpy(m)
            losses[prec] = [trainer.train_step(trainer.loader.next_batch(cpu)).item() for _ in range(steps)]
        expected = [(torch.float8_e4m3fn, torch.float8_e4m3fn), (torch.float8_e5m2, torch.float8_e4m3fn),
                    (torch.float8_e4m3fn, torch.float8_e5m2)] * (steps * hp.seqs_per_step) if prec == "fp8" else []
        assert [c["dtypes"] for c in spy.calls] == expected
    fp32, fp8 = losses["fp32"], losses["fp8"]
    # equal up to the order of the fp32 sum over the step's tokens (the fp32 head sums its loss chunk by chunk on
    # CPUs): n terms of about 10.8 summed in fp32 differ by at most n x 2^-24 relative
    tokens = hp.seqs_per_step * hp.train_seq_len
    assert fp32[0] == pytest.approx(fp8[0], rel=tokens * 2.0 ** -24, abs=0)
    assert fp32[0] == pytest.approx(math.log(50304), rel=1e-5)  # the zero head: uniform predictions
    assert all(a != b for a, b in zip(fp32[1:], fp8[1:]))
    # the corpus uses 1,001 of the 50,304 tokens: learning that alone is worth log(50304 / 1001) = 3.9 nats
    assert fp32[-1] < fp32[0] - 0.5 and fp8[-1] < fp8[0] - 0.5  # both trained
