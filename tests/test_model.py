"""The GPT model: shapes follow the config, zero-initialised projections and gates, soft-capped logits, summed
(training) and mean (eval) losses, U-net/value-embedding wiring, window patterns, rotary tables, parameter groups,
gradients, and the size of the real track-1 model."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_gpt as tg  # noqa: E402

VOCAB = 50304  # the BOS id 50256 must be a valid row
SEQ = 256


def small_cfg(**kw) -> tg.GPTConfig:
    base = dict(vocab_size=VOCAB, num_layers=6, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=3)
    base.update(kw)
    return tg.GPTConfig(**base)


def make_tokens(seed: int, n: int = SEQ, bos_at=(0, 40, 41, 130, 200)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, tg.BOS_ID, (n,), generator=g)
    for p in bos_at:
        toks[p] = tg.BOS_ID
    return toks.to(torch.int32)


def make_model(seed: int = 0, **kw) -> tg.GPT:
    torch.manual_seed(seed)
    return tg.GPT(small_cfg(**kw)).configure(torch.device("cpu"))


def randomise_zero_init(model: tg.GPT, seed: int = 1, head_std: float = 1.0, gate_std: float = 2.0) -> None:
    """Give the zero-initialised matrices (lm_head, attention and MLP output projections, attention gates) random
    values: a zero gate is sigmoid(0) = 1/2 for every head and token, which would hide what the gate computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * head_std)
        for block in model.blocks:
            projs = [block.mlp.c_proj] + ([block.attn.c_proj] if block.attn is not None else [])
            for lin in projs:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.weight.size(1)))
            if block.attn is not None:
                block.attn.gate.weight.copy_(torch.randn(block.attn.gate.weight.shape, generator=g) * gate_std)


# ---------------------------------------------------------------------------------------------------------------------
# shapes and initialisation


@pytest.mark.parametrize("layers,dim,heads,head_dim,no_attn",
                         [(6, 64, 2, 32, 3), (5, 64, 2, 48, -1), (4, 32, 4, 16, 0)])
def test_parameter_shapes_follow_config(layers, dim, heads, head_dim, no_attn):
    cfg = small_cfg(num_layers=layers, model_dim=dim, num_heads=heads, head_dim=head_dim, no_attn_layer=no_attn)
    model = tg.GPT(cfg)
    hdim = heads * head_dim
    gate_dim = max(1, dim // 64)  # the gate reads the first model_dim / 64 channels, at least one
    assert cfg.gate_dim == gate_dim
    assert model.embed.weight.shape == (VOCAB, dim)
    assert len(model.value_embeds) == 3
    for e in model.value_embeds:
        assert e.weight.shape == (VOCAB, hdim)
    assert model.lm_head.weight.shape == (VOCAB, dim)
    assert model.skip_weights.shape == (layers // 2,)
    assert len(model.blocks) == layers
    for i, block in enumerate(model.blocks):
        assert block.lambdas.shape == (2,)
        assert isinstance(block.mlp.c_fc, torch.nn.Parameter)  # a bare (dim, 4 dim) matrix, used as x @ c_fc
        assert block.mlp.c_fc.shape == (dim, 4 * dim)
        assert block.mlp.c_proj.weight.shape == (dim, 4 * dim)
        if i == no_attn:
            assert block.attn is None
        else:
            assert block.attn is not None
            assert block.attn.qkv_w.shape == (3, hdim, dim)
            assert block.attn.c_proj.weight.shape == (dim, hdim)
            assert block.attn.lambdas.shape == (2,)
            assert block.attn.gate.weight.shape == (heads, gate_dim)
    n_attn = layers - (1 if 0 <= no_attn < layers else 0)
    expected_total = (VOCAB * dim + 3 * VOCAB * hdim + VOCAB * dim + layers // 2
                      + layers * (2 + 8 * dim * dim) + n_attn * (2 + 3 * hdim * dim + dim * hdim + heads * gate_dim))
    assert sum(p.numel() for p in model.parameters()) == expected_total


def test_zero_initialised_outputs_and_nonzero_inputs():
    model = make_model()
    assert torch.count_nonzero(model.lm_head.weight) == 0
    # uniform init with bound sqrt(3) * 0.5 / sqrt(fan_in): std 0.5 / sqrt(fan_in); fan_in is model_dim for both
    bound = math.sqrt(3) * 0.5 / math.sqrt(model.cfg.model_dim)
    for block in model.blocks:
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_fc) > 0
        assert block.mlp.c_fc.abs().max() <= bound
        assert block.mlp.c_fc.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        if block.attn is not None:
            assert torch.count_nonzero(block.attn.c_proj.weight) == 0
            assert torch.count_nonzero(block.attn.gate.weight) == 0  # every head starts at sigmoid(0) = 1/2
            assert torch.count_nonzero(block.attn.qkv_w) > 0
            assert block.attn.qkv_w.abs().max() <= bound
            assert block.attn.qkv_w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert block.lambdas.tolist() == [1.0, 0.0]
    assert torch.equal(model.skip_weights, torch.ones(model.cfg.num_layers // 2))


def test_initial_loss_is_log_vocab():
    """lm_head is zero, so every soft-capped logit is cap * sigmoid(0) = 15 and each token's loss is ln(vocab): the
    eval-mode mean is ln(vocab), the training-mode sum SEQ x ln(vocab)."""
    model = make_model()
    toks = make_tokens(0)
    targets = make_tokens(1, bos_at=()).long()
    with torch.no_grad():
        logits = model(toks)
        summed = model(toks, targets, window_blocks=1)
        model.eval()
        mean = model(toks, targets, window_blocks=1)
    assert logits.shape == (SEQ, VOCAB)
    assert torch.all(logits == model.cfg.logit_cap / 2)
    assert mean.item() == pytest.approx(math.log(VOCAB), abs=1e-4)
    # fp32 sum of SEQ terms of ~10.8: relative rounding error around SEQ x 2^-24
    assert summed.item() == pytest.approx(SEQ * math.log(VOCAB), rel=1e-5)


def test_logits_are_soft_capped():
    model = make_model()
    randomise_zero_init(model, head_std=2.0)
    toks = make_tokens(2)
    with torch.no_grad():
        logits = model(toks, window_blocks=2)
        h = model.hidden(toks, torch.tensor(2, dtype=torch.int32))[0]
        raw = h.double() @ model.lm_head.weight.double().T
    # the final hidden state is RMS-normalised
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(SEQ), atol=1e-4, rtol=0)
    # the cap matters: raw logits go well beyond +-cap
    assert raw.abs().max() > 2 * model.cfg.logit_cap
    expected = 30.0 * torch.sigmoid(raw / 7.5)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-5)
    assert logits.min() > 0 and logits.max() < 30
    targets = make_tokens(3, bos_at=()).long()
    with torch.no_grad():
        summed = model(toks, targets, window_blocks=2)
        model.eval()
        mean = model(toks, targets, window_blocks=2)
    assert summed.item() == pytest.approx(F.cross_entropy(expected, targets, reduction="sum").item(), rel=1e-5)
    assert mean.item() == pytest.approx(F.cross_entropy(expected, targets).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_chunked_validation_loss_matches_unchunked(mode):
    """Without gradients the loss is computed in chunks: the same mean (eval, validation) or sum (train mode)."""
    model = make_model()
    randomise_zero_init(model)
    model.train(mode == "train")
    toks, targets = make_tokens(4), make_tokens(5, bos_at=()).long()
    with torch.no_grad():
        full = model(toks, targets, window_blocks=2)
        chunked = model(toks, targets, window_blocks=2, loss_chunk=96)  # 96 does not divide 256
        logits = model(toks, window_blocks=2)
    reduction = "mean" if mode == "eval" else "sum"
    assert full.item() == pytest.approx(F.cross_entropy(logits, targets, reduction=reduction).item(), rel=1e-5)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)


def test_chunked_training_loss_has_the_unchunked_gradients():
    """On a CPU the training loss is summed chunk by chunk with its head gradients taken per chunk (ChunkedHeadLoss,
    so that one chunk's logits exist at a time): the same loss and the same gradient of every parameter as one
    cross-entropy over the whole sequence, up to fp32 summation order, also through a loss scale (the trainer's
    1/8) applied before backward."""
    model = make_model()
    randomise_zero_init(model)
    toks, targets = make_tokens(4), make_tokens(5, bos_at=()).long()
    results = {}
    for chunk in (10**6, 96, tg.CPU_LOSS_CHUNK):  # one piece; 96 does not divide 256; the CPU default
        model.zero_grad(set_to_none=True)
        loss = model(toks, targets, window_blocks=2, loss_chunk=chunk)
        (loss * 0.125).backward()
        results[chunk] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    whole_loss, whole = results[10**6]
    for chunk in (96, tg.CPU_LOSS_CHUNK):
        loss, grads = results[chunk]
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        for name, g in whole.items():
            # each gradient sums at most 256 token terms in another order: far below 1e-4 of its norm
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, (chunk, name)
    assert whole["lm_head.weight"].norm() > 0 and whole["embed.weight"].norm() > 0


# ---------------------------------------------------------------------------------------------------------------------
# wiring


def expected_value_embed_layers(num_layers: int, n: int = 3) -> list:
    """Tables 0..n-1 for the last n blocks, then for the first n blocks (which win where the two overlap)."""
    out = [None] * num_layers
    for t in range(n):
        if num_layers - n + t >= 0:
            out[num_layers - n + t] = t
    for t in range(min(n, num_layers)):
        out[t] = t
    return out


def test_value_embed_layers_twelve_blocks():
    model = tg.GPT(small_cfg(num_layers=12, vocab_size=VOCAB, model_dim=16, num_heads=1, head_dim=16))
    assert model.value_embed_layers() == [0, 1, 2] + [None] * 6 + [0, 1, 2]


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6, 7, 12])
def test_value_embed_layers_any_depth(layers):
    model = tg.GPT(small_cfg(num_layers=layers, vocab_size=VOCAB, model_dim=16, num_heads=1, head_dim=16,
                             no_attn_layer=-1))
    got = model.value_embed_layers()
    assert got == expected_value_embed_layers(layers)
    # every one of the first min(3, L) blocks gets its own table; every table index is valid
    assert got[:min(3, layers)] == list(range(min(3, layers)))
    assert all(t is None or 0 <= t < 3 for t in got)


def test_value_embedding_tables_reach_the_blocks_they_are_mapped_to():
    """Changing table t changes the output exactly when some block with attention uses table t."""
    model = make_model(num_layers=4, no_attn_layer=-1, vocab_size=1024)  # mapping [0, 1, 2, 2]
    randomise_zero_init(model)
    toks = torch.randint(0, 1024, (SEQ,), generator=torch.Generator().manual_seed(6)).to(torch.int32)
    with torch.no_grad():
        base = model(toks, window_blocks=2)
        for t in range(3):
            saved = model.value_embeds[t].weight.clone()
            model.value_embeds[t].weight.add_(1.0)
            changed = not torch.allclose(model(toks, window_blocks=2), base)
            model.value_embeds[t].weight.copy_(saved)
            assert changed, t
    # with block 0 (the only user of table 0) attention-free, table 0 is unused
    model = make_model(num_layers=4, no_attn_layer=0, vocab_size=1024)
    randomise_zero_init(model)
    with torch.no_grad():
        base = model(toks, window_blocks=2)
        model.value_embeds[0].weight.add_(1.0)
        assert torch.equal(model(toks, window_blocks=2), base)


def test_param_groups_partition_parameters():
    model = make_model()
    groups = model.param_groups()
    assert set(groups) == {"muon", "embed", "head", "scalar"}
    all_named = dict(model.named_parameters())
    seen = [name for g in groups.values() for name, _ in g]
    assert len(seen) == len(set(seen)) == len(all_named)
    assert set(seen) == set(all_named)
    for g in groups.values():
        for name, p in g:
            assert p is all_named[name]
    muon = {n for n, _ in groups["muon"]}
    expected_muon = set()
    for i, block in enumerate(model.blocks):
        expected_muon |= {f"blocks.{i}.mlp.c_fc", f"blocks.{i}.mlp.c_proj.weight"}
        if block.attn is not None:  # the gate is a (heads, gate_dim) matrix: Muon's, as in the record
            expected_muon |= {f"blocks.{i}.attn.{n}" for n in ("qkv_w", "c_proj.weight", "gate.weight")}
    assert muon == expected_muon
    assert all(p.ndim >= 2 for _, p in groups["muon"])
    assert {n for n, _ in groups["embed"]} == {"embed.weight"} | {f"value_embeds.{t}.weight" for t in range(3)}
    assert {n for n, _ in groups["head"]} == {"lm_head.weight"}
    scalars = {n for n, _ in groups["scalar"]}
    assert "skip_weights" in scalars and "blocks.0.lambdas" in scalars and "blocks.0.attn.lambdas" in scalars
    assert all(p.ndim < 2 for _, p in groups["scalar"])


def reference_hidden(model: tg.GPT, tokens: torch.Tensor, window_blocks: int) -> torch.Tensor:
    """The model's final hidden state recomputed in float64 from its weights, written out step by step from the
    record's formulas: block-granular windows, half-truncated rotary, the sparse attention gate."""
    cfg = model.cfg
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    toks = tokens.tolist()
    T, L, H, hd = len(toks), cfg.num_layers, cfg.num_heads, cfg.head_dim
    docs = torch.tensor(toks).eq(tg.BOS_ID).cumsum(0)  # a document starts at each BOS

    def allowed(w):  # query i sees key j: not in its future, same document, fewer than max(w, 1) blocks back
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j <= i) & (i // 128 - j // 128 < max(w, 1)) & (docs[:, None] == docs[None, :])

    masks = {"L": allowed(window_blocks), "S": allowed(window_blocks // 2)}
    kinds = [cfg.window_pattern[i % len(cfg.window_pattern)] for i in range(L)]

    def rms(x):
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    half, quarter = hd // 2, hd // 4
    freq = torch.cat([(1 / 1024) ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1)),
                      torch.zeros(quarter, dtype=torch.float64)])  # (half,): the last quarter's pairs stay put
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, half)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):  # x: (T, H, hd); rotate the pairs (x[k], x[k + half]) by angle pos * freq[k]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)

    gate_dim = max(1, cfg.model_dim // 64)
    idx = torch.tensor(toks, dtype=torch.long)
    x0 = rms(P["embed.weight"][idx])
    ve_tables = [P[f"value_embeds.{t}.weight"][idx] for t in range(cfg.num_value_embeds)]
    ve_of_block = expected_value_embed_layers(L, cfg.num_value_embeds)
    n_enc = L // 2
    x, skips = x0, []
    for i, block in enumerate(model.blocks):
        if i >= L - n_enc:  # U-net: the latest unused encoder output feeds this decoder block
            x = x + P["skip_weights"][i - (L - n_enc)] * skips.pop()
        lam = P[f"blocks.{i}.lambdas"]
        x = lam[0] * x + lam[1] * x0
        if block.attn is not None:
            pre = f"blocks.{i}.attn."
            w = P[pre + "qkv_w"]  # (3, H * hd, dim)
            h = rms(x)
            q, k, v = ((h @ w[j].T).view(T, H, hd) for j in range(3))
            q, k = rope(rms(q)), rope(rms(k))
            al = P[pre + "lambdas"]
            v = al[0] * v + (al[1] * ve_tables[ve_of_block[i]].view(T, H, hd) if ve_of_block[i] is not None else 0)
            gate = torch.sigmoid(h[:, :gate_dim] @ P[pre + "gate.weight"].T)  # (T, H), from the block's normed input
            y = torch.empty(T, H, hd, dtype=torch.float64)
            for head in range(H):
                scores = (q[:, head] @ k[:, head].T) * cfg.attn_scale
                scores = scores.masked_fill(~masks[kinds[i]], float("-inf"))
                y[:, head] = (torch.softmax(scores, dim=-1) @ v[:, head]) * gate[:, head, None]
            x = x + y.reshape(T, H * hd) @ P[pre + "c_proj.weight"].T
        m = f"blocks.{i}.mlp."
        x = x + torch.relu(rms(x) @ P[m + "c_fc"]).pow(2) @ P[m + "c_proj.weight"].T
        if i < n_enc:
            skips.append(x)
    return rms(x)


@pytest.mark.parametrize("layers,no_attn,pattern,window", [
    (5, 1, "LSSSLSSLSSSL", 3),  # the record's pattern; long 3 blocks, short 1
    (6, 4, "SLL", 5),  # another pattern; long 5 blocks (more than the sequence), short 2
    (6, -1, "LS", 1),  # long 1 block, short 0: both see their own block only
])
def test_forward_matches_reference_implementation(layers, no_attn, pattern, window):
    """Every weight set to random values (gates and mixing scalars too), the logits against a float64
    re-implementation, on 4 blocks of 128 tokens with a document spanning all of them, so the windows bind."""
    model = make_model(num_layers=layers, no_attn_layer=no_attn, model_dim=128, num_heads=2, head_dim=24,
                       window_pattern=pattern)  # model_dim 128: the gate reads two channels
    randomise_zero_init(model, head_std=0.5)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim < 2:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    T = 4 * 128
    toks = make_tokens(10, n=T, bos_at=(3, 4, 60, 450))  # documents of 3, 1, 56, 390 and 62 tokens
    with torch.no_grad():
        logits = model(toks, window_blocks=window)
        unbounded = model(toks, window_blocks=2 * T // 128)  # no window binds: a different function here
    assert (logits - unbounded).abs().max() > 1e-2
    h = reference_hidden(model, toks, window)
    expected = 30.0 * torch.sigmoid(h @ model.lm_head.weight.detach().double().T / 7.5)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# gradients


def test_gradients_wake_up_as_zero_init_weights_move():
    """Zero lm_head and zero output projections gate the gradient: at step 0 only lm_head has one; after the head
    moves, everything on the residual path does; after the projections move, every parameter does."""
    # A small vocabulary keeps the three optimiser steps fast; the tokens then hold no BOS (one document).
    model = make_model(vocab_size=1024)
    hp = tg.Hyperparameters(vocab_size=1024, num_layers=6, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=3)
    opts = tg.build_optimizers(model, hp)
    g = torch.Generator().manual_seed(7)
    toks, targets = torch.randint(0, 1024, (2, SEQ), generator=g)
    toks = toks.to(torch.int32)
    names = dict(model.named_parameters())
    # behind a zero output projection: everything feeding attention (gates included) or the MLP's hidden layer
    gated_by_proj = {n for n in names if n.endswith(("attn.qkv_w", "attn.gate.weight", "mlp.c_fc", "attn.lambdas"))
                     or n.startswith("value_embeds.")}
    nonzero_by_step = []
    for step in range(3):
        loss = model(toks, targets, window_blocks=2)
        loss.backward()
        assert torch.isfinite(loss)
        for n, p in names.items():
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all(), n
        nonzero_by_step.append({n for n, p in names.items() if torch.count_nonzero(p.grad) > 0})
        for opt in opts.values():
            opt.step()
        model.zero_grad(set_to_none=True)
    assert nonzero_by_step[0] == {"lm_head.weight"}
    assert nonzero_by_step[1] == set(names) - gated_by_proj
    assert nonzero_by_step[2] == set(names)


# ---------------------------------------------------------------------------------------------------------------------
# the real track-1 model, and run-time configuration


def test_default_config_parameter_count_on_meta():
    cfg = tg.GPTConfig()
    with torch.device("meta"):
        model = tg.GPT(cfg)
    d, L, V = cfg.model_dim, cfg.num_layers, cfg.vocab_size
    hdim = cfg.num_heads * cfg.head_dim
    assert hdim == d == 768 and L == 12 and 0 <= cfg.no_attn_layer < L
    n_attn = L - 1
    gate = cfg.num_heads * (d // 64)  # each attention block's gate: 6 heads x 12 input channels
    groups = model.param_groups()
    muon_count = sum(p.numel() for _, p in groups["muon"])
    assert muon_count == n_attn * (4 * d * d + gate) + L * 8 * d * d
    embed_count = sum(p.numel() for _, p in groups["embed"])
    assert embed_count == 4 * V * d
    assert sum(p.numel() for _, p in groups["head"]) == V * d
    assert sum(p.numel() for _, p in groups["scalar"]) == 2 * L + 2 * n_attn + L // 2
    # GPT-2 small class: about 85M in the blocks' matrices, 124M-ish counting one embedding and the head
    assert 80e6 < muon_count < 90e6
    assert all(p.device.type == "meta" for p in model.parameters())


def test_configure_on_cpu():
    model = tg.GPT(small_cfg(num_layers=2, model_dim=16, num_heads=1, head_dim=16))
    assert model.configure(torch.device("cpu")) is model
    assert model.attn_impl == "dense"
    assert model.head_precision == "fp32"
    assert model.act_dtype == torch.float32
    model.configure(torch.device("cpu"), attention="flex", fp8=True)
    assert model.attn_impl == "flex" and model.head_precision == "fp32"
    assert tg.head_precision(torch.device("cpu"), True) == "fp32"
    assert tg.head_precision(torch.device("cpu"), False) == "fp32"


def test_reserved_rotary_tables_give_the_same_forward():
    """Tables computed once (what the trainer does before compiling) or inside every forward: the same function."""
    model = make_model(3)
    randomise_zero_init(model)
    tokens = make_tokens(4)
    win = torch.tensor(1, dtype=torch.int32)
    computed = model.hidden(tokens, win)
    assert model.rope_cos.numel() == 0
    model.reserve_rotary(4 * SEQ)
    assert model.rope_cos.shape == (4 * SEQ, model.cfg.head_dim // 2)
    assert torch.equal(model.hidden(tokens, win), computed)
    cos, sin = model.rotary(SEQ, tokens.device)
    ref_cos, ref_sin = tg.rotary_tables(SEQ, model.cfg.head_dim, tokens.device)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    model.reserve_rotary(SEQ // 2)  # too short for this sequence: computed in the forward instead
    assert torch.equal(model.hidden(tokens, win), computed)


@pytest.mark.parametrize("head_dim", [8, 32, 128])
def test_rotary_tables_follow_the_half_truncated_formula(head_dim):
    """head_dim / 4 frequencies (1/1024) ** (k / (head_dim/4 - 1)), then head_dim / 4 zero ones: angle pos x freq."""
    T, offset = 1024, 300
    quarter = head_dim // 4
    k = torch.arange(quarter, dtype=torch.float64)
    freq = torch.cat([(1 / 1024) ** (k / (quarter - 1)), torch.zeros(quarter, dtype=torch.float64)])
    cos, sin = tg.rotary_tables(T, head_dim, torch.device("cpu"))
    assert cos.shape == sin.shape == (T, head_dim // 2) and cos.dtype == torch.float32
    # fp32 angles: the frequency and the product each round by a few 2^-24 relative, at angles up to T + offset rad
    tol = 8 * (T + offset) * 2.0 ** -24
    for off in (0, offset):
        c, s = tg.rotary_tables(T, head_dim, torch.device("cpu"), offset=off)
        ang = torch.arange(off, off + T, dtype=torch.float64)[:, None] * freq[None, :]
        torch.testing.assert_close(c.double(), ang.cos(), atol=tol, rtol=0)
        torch.testing.assert_close(s.double(), ang.sin(), atol=tol, rtol=0)
        assert torch.all(c[:, quarter:] == 1) and torch.all(s[:, quarter:] == 0)  # exactly unrotated
    shifted = tg.rotary_tables(T - offset, head_dim, torch.device("cpu"), offset=offset)
    assert torch.equal(shifted[0], cos[offset:]) and torch.equal(shifted[1], sin[offset:])
    # the highest frequency is 1 rad per position, the lowest rotating one 1/1024
    assert sin[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert cos[1, quarter - 1].item() == pytest.approx(math.cos(1 / 1024), abs=1e-6)


def test_rotary_leaves_the_zero_frequency_pairs_alone():
    """The pairs (x[k], x[k + head_dim/2]) for k >= head_dim/4 are not rotated; the others turn by pos x freq[k]."""
    hd, T = 32, 300
    x = torch.randn(1, T, 2, hd, generator=torch.Generator().manual_seed(0))
    cos, sin = tg.rotary_tables(T, hd, torch.device("cpu"))
    y = tg.rotary(x, cos, sin)
    q, h = hd // 4, hd // 2
    assert torch.equal(y[..., q:h], x[..., q:h]) and torch.equal(y[..., h + q:], x[..., h + q:])
    x1, x2 = x[..., :q].double(), x[..., h:h + q].double()
    c, s = cos[None, :, None, :q].double(), sin[None, :, None, :q].double()
    torch.testing.assert_close(y[..., :q].double(), x1 * c + x2 * s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[..., h:h + q].double(), x2 * c - x1 * s, atol=1e-5, rtol=1e-5)
    # a rotation: every pair keeps its length
    torch.testing.assert_close(y[..., :h] ** 2 + y[..., h:] ** 2, x[..., :h] ** 2 + x[..., h:] ** 2)


@pytest.mark.parametrize("layers,pattern,expected", [
    (12, None, "LSSSLSSLSSSL"),  # the record's layer pattern is the default
    (5, "LS", "LSLSL"),  # repeated to the depth
    (14, "LSSSLSSLSSSL", "LSSSLSSLSSSLLS"),
    (3, "S", "SSS"),
])
def test_window_kinds_repeat_the_pattern(layers, pattern, expected):
    kw = {} if pattern is None else {"window_pattern": pattern}
    model = tg.GPT(small_cfg(num_layers=layers, model_dim=16, num_heads=1, head_dim=16, no_attn_layer=-1, **kw))
    assert "".join(model.window_kinds()) == expected


def test_short_window_layers_use_half_the_long_window():
    """Every block short: long windows of 2 and 3 blocks both give short ones of 1 block (3 // 2 = 1), so the logits
    agree; every block long, the window follows and they differ (the sequence is one document of 3 blocks)."""
    toks = make_tokens(11, n=3 * 128, bos_at=(0,))
    out = {}
    for pattern in ("SSS", "LLL"):
        model = make_model(num_layers=3, no_attn_layer=-1, window_pattern=pattern)
        randomise_zero_init(model)
        with torch.no_grad():
            out[pattern] = [model(toks, window_blocks=w) for w in (2, 3)]
    assert torch.equal(out["SSS"][0], out["SSS"][1])
    assert (out["LLL"][0] - out["LLL"][1]).abs().max() > 1e-3


def test_rotary_tables_are_not_part_of_checkpoints():
    model = make_model(0).reserve_rotary(1024)
    assert not [k for k in model.state_dict() if "rope" in k]
    fresh = make_model(0)
    fresh.load_state_dict(model.state_dict())  # strict: the same keys with or without reserved tables
    assert fresh.rope_cos.numel() == 0


@pytest.mark.parametrize("capability,fp8,head,act", [
    ((7, 5), True, "fp32", torch.float32),  # T4: no bfloat16, samples in fp32
    ((8, 0), True, "bf16", torch.bfloat16),  # A100: no FP8
    ((8, 6), True, "bf16", torch.bfloat16),  # A10, 3090
    ((8, 9), True, "fp8", torch.bfloat16),  # L4, 4090
    ((9, 0), True, "fp8", torch.bfloat16),  # H100
    ((9, 0), False, "bf16", torch.bfloat16),  # --no-fp8
])
def test_configure_follows_the_gpu_generation(monkeypatch, capability, fp8, head, act):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    model = tg.GPT(small_cfg(num_layers=2, model_dim=16, num_heads=1, head_dim=16))
    model.configure(torch.device("cuda", 0), fp8=fp8)  # configure only reads the capability: no GPU needed
    assert (model.attn_impl, model.head_precision, model.act_dtype) == ("flex", head, act)
