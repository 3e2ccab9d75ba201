"""Newton-Schulz orthogonalisation, Muon and DistAdam against hand computations and torch.optim.Adam, the gathered
optimiser state, and the 2-process (gloo) optimisers against the 1-process ones."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_gpt as tg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NS_COEFFS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------------------------------
# Newton-Schulz


def designed_matrix(shape, kappa: float, seed: int):
    """A random matrix with random singular vectors and singular values log-spaced over [1, kappa] (times 3.7)."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=torch.float64))
    s = 3.7 * torch.logspace(0, math.log10(kappa), r, dtype=torch.float64)
    s = s[torch.randperm(r, generator=g)]
    return ((U * s[..., None, :]) @ V.mT).float(), U, s, V


def quintic5(s: torch.Tensor) -> torch.Tensor:
    """Five applications of the scalar map s -> a s + b s^3 + c s^5 (exact arithmetic)."""
    a, b, c = NS_COEFFS
    for _ in range(5):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


@pytest.mark.parametrize("shape", [(64, 64), (128, 512), (512, 128), (3, 64, 128), (96, 40)])
def test_newton_schulz_pushes_singular_values_to_one(shape):
    kappa = 100.0
    G, U, s, V = designed_matrix(shape, kappa, seed=sum(shape))
    X = tg.zeropower_via_newtonschulz5(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    sv_in = torch.linalg.svdvals(G.double())
    sv_out = torch.linalg.svdvals(X.double())
    # the input is badly conditioned: no rescaling of it fits in [0.5, 1.5] (which needs max / min <= 3)
    assert (sv_in.max(-1).values / sv_in.min(-1).values > 50).all()
    # the quintic keeps each singular value in roughly [0.7, 1.2]; [0.5, 1.5] leaves room for bf16
    assert sv_out.min() > 0.5 and sv_out.max() < 1.5, (sv_out.min().item(), sv_out.max().item())
    # singular vectors are kept: X ~ U diag(p(s / |G|_F)) V^T, with p the five-fold quintic
    D = U.mT @ X.double() @ V
    diag = torch.diagonal(D, dim1=-2, dim2=-1)
    predicted = quintic5(s / G.double().norm(dim=(-2, -1), keepdim=True)[..., 0])
    assert (diag - predicted).abs().max() < 0.05
    assert (D - torch.diag_embed(diag)).abs().max() < 0.05
    cos = F.cosine_similarity(X.double().flatten(), (U @ V.mT).flatten(), dim=0)
    assert cos > 0.9


def test_newton_schulz_is_scale_invariant_and_batched():
    G, *_ = designed_matrix((3, 64, 128), 20.0, seed=5)
    X = tg.zeropower_via_newtonschulz5(G)
    for i in range(3):
        torch.testing.assert_close(tg.zeropower_via_newtonschulz5(G[i]), X[i], atol=0, rtol=0)
    torch.testing.assert_close(tg.zeropower_via_newtonschulz5(G * 1024.0).float(), X.float(), atol=2e-2, rtol=0)
    # tall input: the result is the transpose of the wide input's result
    torch.testing.assert_close(tg.zeropower_via_newtonschulz5(G[0].mT), X[0].mT, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Muon, one process

MUON_SHAPES = {"tall": (128, 32), "wide": (32, 128), "square_a": (64, 64), "square_b": (64, 64), "stack": (3, 64, 32)}


def test_muon_step_matches_hand_computation():
    lr, momentum = 0.02, 0.9
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for n, s in MUON_SHAPES.items()}
    expected = {n: p.detach().clone() for n, p in params.items()}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}
    opt = tg.Muon(list(params.items()), lr=lr, momentum=momentum)
    for _ in range(2):
        grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
            # momentum buffer: m * buf + (1 - m) * g; Nesterov: (1 - m) * g + m * buf. Written with torch.lerp
            # (start + w * (end - start)) so that the bf16 input of the orthogonalisation is bit-identical.
            new_buf = bufs[n].lerp(grads[n], 1 - momentum)
            assert torch.allclose(new_buf, momentum * bufs[n] + (1 - momentum) * grads[n], atol=1e-6, rtol=0)
            bufs[n] = new_buf
            nesterov = grads[n].lerp(bufs[n], momentum)
            assert torch.allclose(nesterov, (1 - momentum) * grads[n] + momentum * bufs[n], atol=1e-6, rtol=0)
            rows, cols = p.shape[-2], p.shape[-1]
            update = tg.zeropower_via_newtonschulz5(nesterov).float()
            expected[n] = expected[n] - lr * math.sqrt(max(1.0, rows / cols)) * update
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), expected[n], atol=1e-6, rtol=1e-6, msg=n)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[n], atol=1e-6, rtol=1e-6, msg=n)


def test_muon_orthogonalises_each_shape_in_one_batch():
    """One Newton-Schulz call per shape, with every parameter of that shape stacked (not one call per matrix)."""
    g = torch.Generator().manual_seed(4)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in MUON_SHAPES.items()}
    opt = tg.Muon(list(params.items()), lr=0.02, momentum=0.9)
    calls = []
    opt.newton_schulz = lambda G, steps: calls.append(tuple(G.shape)) or tg.zeropower_via_newtonschulz5(G, steps)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assert sorted(calls) == sorted([(1, 128, 32), (1, 32, 128), (2, 64, 64), (1, 3, 64, 32)])


def newton_schulz_fp32(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The same quintic iteration as tg.zeropower_via_newtonschulz5, in fp32: the reference for its rounding."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = G.size(-2) > G.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def test_muon_compiled_newton_schulz_is_as_accurate_as_eager():
    """Compiled (as on GPUs) the bf16 iteration rounds differently: fused elementwise work stays in fp32. Both are
    held to a float64 run of the same iteration; the compiled one may not be worse, and a compiled step still moves
    every matrix by lr * scale * (singular values near 1)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"tall_a": (64, 32), "tall_b": (64, 32), "wide": (32, 64)}
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    eager = tg.Muon(list(params.items()), lr=0.1, momentum=0.5)
    compiled = tg.Muon(list(params.items()), lr=0.1, momentum=0.5, compile_ns=True)
    assert eager.newton_schulz is tg.zeropower_via_newtonschulz5
    assert compiled.newton_schulz is not tg.zeropower_via_newtonschulz5
    for shape in ((2, 64, 32), (1, 32, 64)):  # the batches a step hands it
        G = torch.randn(shape, generator=g)
        ref = newton_schulz_fp32(G)
        err = {name: ((opt.newton_schulz(G, 5).double() - ref).norm() / ref.norm()).item()
               for name, opt in (("eager", eager), ("compiled", compiled))}
        assert 0 < err["compiled"] <= 1.2 * err["eager"] and err["eager"] < 0.06, (shape, err)
    for n, p in params.items():
        p.grad = designed_matrix(shapes[n], 10.0, seed=3)[0]
    compiled.step()
    for n, p in params.items():
        scale = math.sqrt(max(1.0, shapes[n][-2] / shapes[n][-1]))
        sv = torch.linalg.svdvals(-p.detach().double() / (0.1 * scale))
        assert sv.min() > 0.5 and sv.max() < 1.5, n


def test_muon_update_is_orthogonal_with_shape_scale():
    """The size of one step, independently of the implementation: lr * scale * (singular values ~ 1)."""
    lr = 0.1
    for n, shape in MUON_SHAPES.items():
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = tg.Muon([(n, p)], lr=lr, momentum=0.5)
        p.grad = designed_matrix(shape, 10.0, seed=3)[0]
        opt.step()
        scale = math.sqrt(max(1.0, shape[-2] / shape[-1]))
        sv = torch.linalg.svdvals(-p.detach().double() / (lr * scale))
        assert sv.min() > 0.5 and sv.max() < 1.5, n


# ---------------------------------------------------------------------------------------------------------------------
# DistAdam, one process


def record_adam(init: torch.Tensor, grads: list[torch.Tensor], lr: float, betas, eps: float):
    """The record's Adam in float64, from its formula: m and v the usual EMAs of g and g^2, then
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps), eps added to the root of the uncorrected v.
    Returns p after every step, the final m and v, and the same EMA of |g| (the scale of m's rounding, as m's terms
    can cancel)."""
    b1, b2 = betas
    p = init.double().clone()
    m, v, m_abs = (torch.zeros_like(p) for _ in range(3))
    trajectory = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        m_abs = b1 * m_abs + (1 - b1) * g.abs()
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        trajectory.append(p.clone())
    return trajectory, m, v, m_abs


def test_dist_adam_uses_the_records_arrangement():
    """DistAdam against the record's formula, step by step, with gradients from 1e-9 (where sqrt(v) is of the order
    of eps, so where eps goes matters) to 10. torch.optim.Adam adds eps to the bias-corrected root instead
    (eps sqrt(1 - b2^t) relative to the record's): far off on the small gradients, where the test must tell them
    apart, and within fp32 rounding on large ones, where eps is negligible."""
    g = torch.Generator().manual_seed(1)
    shapes = [(50, 16), (7,), (2,), (1024, 8)]
    lr_of = [0.6, 0.008, 0.04, 0.6]  # parameters 0 and 3 share a group
    betas, eps = (0.8, 0.95), 1e-10
    init = [torch.randn(s, generator=g) for s in shapes]

    def run(make, scales, floor=0.0):
        """The optimiser from make() over steps with gradients of these sizes, each entry at least floor x size."""
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        grads = []
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(10 * i)
            draws = [torch.randn(p.shape, generator=gen) for _ in scales]
            grads.append([(x.sign() * x.abs().clamp(min=floor)) * scale for x, scale in zip(draws, scales)])
        after = []
        for k in range(len(scales)):
            for p, gs in zip(params, grads):
                p.grad = gs[k].clone()
            opt.step()
            after.append([p.detach().clone() for p in params])
        return params, opt, grads, after

    def ours(ps):
        return tg.DistAdam([{"params": [("a", ps[0]), ("d", ps[3])], "lr": lr_of[0]},
                            {"params": [("b", ps[1])], "lr": lr_of[1]}, {"params": [("c", ps[2])], "lr": lr_of[2]}],
                           lr=lr_of[0], betas=betas, eps=eps)

    def torch_adam(ps):
        return torch.optim.Adam([{"params": [ps[0], ps[3]], "lr": lr_of[0]}, {"params": [ps[1]], "lr": lr_of[1]},
                                 {"params": [ps[2]], "lr": lr_of[2]}], lr=lr_of[0], betas=betas, eps=eps,
                                weight_decay=0.0)

    def tolerance(i, step):
        """fp32 against float64: per step, the weight rounded once (2^-24 |p|) and an update of at most a few lr
        from a handful of fp32 operations (2^-21 of it); summed over the steps so far."""
        return dict(rtol=(step + 1) * 2.0 ** -23, atol=(step + 1) * lr_of[i] * 2.0 ** -18)

    small, large = (1e-9, 3e-9, 1e-9, 1e-2, 1.0, 10.0), (1.0, 0.5, 2.0)
    params, opt, grads, after = run(ours, small)
    _, _, _, theirs = run(torch_adam, small)
    for i, p in enumerate(params):
        trajectory, m, v, m_abs = record_adam(init[i], grads[i], lr_of[i], betas, eps)
        for step, ref in enumerate(trajectory):
            torch.testing.assert_close(after[step][i].double(), ref, **tolerance(i, step), msg=f"param {i} step {step}")
        # torch's arrangement is off by a sizeable part of lr from the first 1e-9 step on
        off = (theirs[0][i].double() - trajectory[0]).abs().max().item()
        assert off > 0.05 * lr_of[i] > 1000 * tolerance(i, 0)["atol"], (i, off)
        st = opt.state[p]
        assert float(st["step"]) == len(small)
        # fp32 EMAs: a few roundings of 2^-24 per step, of m's terms' size (m_abs) and of v's (no cancellation)
        assert ((st["exp_avg"].double() - m).abs() <= len(small) * 2.0 ** -22 * m_abs).all()
        torch.testing.assert_close(st["exp_avg_sq"].double(), v, rtol=len(small) * 2.0 ** -21, atol=0)
    # with every gradient entry at least 0.25 (sqrt(v) > 0.05), eps is under 2e-9 of the root in both arrangements,
    # far below fp32's 2^-24: they agree, each within its rounding of the exact value (twice the tolerance)
    _, _, _, ours_large = run(ours, large, floor=0.5)
    _, _, _, torch_large = run(torch_adam, large, floor=0.5)
    for step in range(len(large)):
        for i in range(len(shapes)):
            tol = {k: 2 * t for k, t in tolerance(i, step).items()}
            torch.testing.assert_close(ours_large[step][i], torch_large[step][i], **tol)


def test_dist_adam_skips_parameters_without_grad():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = tg.DistAdam([{"params": [("a", a), ("b", b)]}], lr=0.1)
    a.grad = torch.ones(4)
    opt.step()
    # first Adam step moves by lr * sign(g) (up to eps)
    torch.testing.assert_close(a.detach(), torch.full((4,), 0.9), atol=1e-6, rtol=0)
    assert torch.equal(b.detach(), torch.ones(4)) and not opt.state[b]
    assert set(opt.full_state()) == {"a"}


# ---------------------------------------------------------------------------------------------------------------------
# full_state / load_full_state, one process


def small_model(seed=0):
    torch.manual_seed(seed)
    return tg.GPT(tg.GPTConfig(vocab_size=512, num_layers=3, model_dim=32, num_heads=2, head_dim=16, no_attn_layer=1))


def set_grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_full_state_round_trip_one_process():
    hp = tg.Hyperparameters(vocab_size=512, num_layers=3, model_dim=32, num_heads=2, head_dim=16, no_attn_layer=1)
    a = small_model()
    opts_a = tg.build_optimizers(a, hp)
    for step in range(2):
        set_grads(a, step)
        for opt in opts_a.values():
            opt.step()
    states = {k: opt.full_state() for k, opt in opts_a.items()}
    names = dict(a.named_parameters())
    groups = a.param_groups()
    assert set(states["muon"]) == {n for n, _ in groups["muon"]}
    assert set(states["adam"]) == {n for k in ("embed", "head", "scalar") for n, _ in groups[k]}
    for n, st in states["muon"].items():
        assert torch.equal(st["momentum_buffer"], opts_a["muon"].state[names[n]]["momentum_buffer"])
    for n, st in states["adam"].items():
        ref = opts_a["adam"].state[names[n]]
        assert float(st["step"]) == 2
        assert torch.equal(st["exp_avg"], ref["exp_avg"]) and torch.equal(st["exp_avg_sq"], ref["exp_avg_sq"])

    # a copy of the model with fresh optimisers that load the state continues exactly like the original ...
    b = small_model(seed=1)
    b.load_state_dict(a.state_dict())
    opts_b = tg.build_optimizers(b, hp)
    for k, opt in opts_b.items():
        opt.load_full_state(states[k])
    # ... and does not alias the saved state
    for st in states["adam"].values():
        st["exp_avg"].add_(1.0)
    c = small_model(seed=2)
    c.load_state_dict(a.state_dict())
    opts_c = tg.build_optimizers(c, hp)  # fresh optimisers, no state: must end elsewhere
    for model, opts in ((a, opts_a), (b, opts_b), (c, opts_c)):
        set_grads(model, 2)
        for opt in opts.values():
            opt.step()
    for n, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[n]), n
    differs = [n for n, p in a.named_parameters() if not torch.allclose(p, dict(c.named_parameters())[n])]
    assert set(differs) == set(names)


# ---------------------------------------------------------------------------------------------------------------------
# 2 processes (gloo) against 1


def _assert_state_close(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for opt_name in want:
        assert set(got[opt_name]) == set(want[opt_name]), f"{where}/{opt_name}"
        for pname, entry in want[opt_name].items():
            assert set(got[opt_name][pname]) == set(entry)
            for key, t in entry.items():
                torch.testing.assert_close(got[opt_name][pname][key], t, atol=1e-6, rtol=1e-5,
                                           msg=f"{where}/{opt_name}/{pname}/{key}")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    spec = importlib.util.spec_from_file_location("dist_optim_worker", ROOT / "tests" / "dist_optim_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    prefix = tmp_path / "result"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_optim_worker.py"), str(prefix)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(f"{prefix}.rank0.pt", weights_only=True)
    r1 = torch.load(f"{prefix}.rank1.pt", weights_only=True)
    single = worker.run()  # no process group here: the one-process code path
    assert single["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2

    # the cases that make this test meaningful: padded Muon chunks, sharded and replicated Adam parameters
    assert 1 in r0["muon_chunk_sizes"] and 2 in r0["muon_chunk_sizes"]
    assert set(single["muon_chunk_sizes"]) == {1}
    embeddings = {"embed.weight", "lm_head.weight"} | {f"value_embeds.{i}.weight" for i in range(3)}
    assert set(r0["adam_sharded"]) == embeddings
    assert single["adam_sharded"] == []

    # every rank holds the same, complete parameters
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    torch.manual_seed(0)  # as the worker does
    initial = dict(tg.GPT(tg.GPTConfig(**worker.MODEL)).named_parameters())
    for n, p in single["params"].items():
        scale = p.abs().max().item()
        torch.testing.assert_close(r0["params"][n], p, atol=1e-5 * max(scale, 1.0), rtol=1e-5, msg=n)
        assert not torch.allclose(p, initial[n].detach()), n  # every parameter moved
    for which in ("reloaded", "final"):
        _assert_state_close(r0["states"][which], single["states"][which], f"rank0/{which}")
        _assert_state_close(r1["states"][which], single["states"][which], f"rank1/{which}")
