"""Attention masks (causal AND same document AND within a sliding window) as dense masks and as FlexAttention
BlockMasks, held against a naive per-position reference written with python loops."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

import train_gpt as tg  # noqa: E402

BOS = 50256
SCALE = 0.12
BLOCK = 128

# eager (uncompiled) flex_attention on CPU warns that it materialises the scores; that is what the tests want
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ---------------------------------------------------------------------------------------------------------------------
# the reference: python loops over positions


def make_tokens(pattern: str, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000 * T)
    toks = torch.randint(0, BOS, (T,), generator=g)  # never BOS
    if pattern == "no_bos":
        pass
    elif pattern == "bos_at_0":
        toks[0] = BOS
    elif pattern == "many_short":  # documents of 1..~25 tokens, including adjacent BOS tokens
        toks[torch.rand(T, generator=g) < 0.08] = BOS
        toks[0] = BOS
        toks[[50, 51, 52]] = BOS
    elif pattern == "long_docs":  # two documents, both longer than the small windows; no BOS at 0
        toks[T // 2 + 37] = BOS
    elif pattern == "mixed":  # documents of 5, 1, 94 and T - 100 tokens
        toks[[0, 5, 6, 100]] = BOS
    elif pattern == "block_edges":  # documents that start right at and right next to block boundaries
        for p in (0, BLOCK - 1, BLOCK, T - BLOCK + 1, T - 1):
            toks[p] = BOS
    else:
        raise ValueError(pattern)
    return toks


PATTERNS = ["no_bos", "bos_at_0", "many_short", "long_docs", "block_edges"]


def ref_docs(tokens) -> list[int]:
    out, d = [], 0
    for t in tokens.tolist():
        if t == BOS:
            d += 1
        out.append(d)
    return out


def ref_allowed(docs: list[int], i: int, window: int) -> list[int]:
    """Keys query i may attend to: not in the future, fewer than `window` positions back, same document."""
    return [j for j in range(max(0, i - window + 1), i + 1) if docs[j] == docs[i]]


def ref_mask(tokens, window: int) -> torch.Tensor:
    docs = ref_docs(tokens)
    T = len(docs)
    rows = []
    for i in range(T):
        row = [False] * T
        for j in ref_allowed(docs, i, window):
            row[j] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def ref_attention(q, k, v, tokens, window: int, scale: float = SCALE) -> torch.Tensor:
    """q, k, v: (B, H, T, D); softmax(scale * q.k) over the allowed keys of each query, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    docs = ref_docs(tokens)
    out = torch.empty_like(q)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: thread hand-offs would dominate on a busy machine
    try:
        for i in range(q.size(2)):
            js = torch.tensor(ref_allowed(docs, i, window))
            s = (k[:, :, js] @ q[:, :, i, :, None])[..., 0] * scale  # (B, H, keys)
            out[:, :, i] = (torch.softmax(s, dim=-1)[:, :, None, :] @ v[:, :, js])[:, :, 0]
    finally:
        torch.set_num_threads(threads)
    return out


def qkv(T: int, seed: int, B: int = 1, H: int = 2, D: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def decode_blocks(bm, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) boolean (q block, kv block) tables from a BlockMask's kv_num_blocks / kv_indices."""
    out = []
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        table = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
        for qb in range(num_blocks):
            n = int(num[0, 0, qb])
            for kb in idx[0, 0, qb, :n].tolist():
                assert not table[qb, kb], "a kv block listed twice"
                table[qb, kb] = True
        out.append(table)
    return out[0], out[1]


def effective_mask(bm, T: int) -> torch.Tensor:
    """The (T, T) mask FlexAttention applies: full blocks entirely, partial blocks through mask_mod, others never."""
    nb = T // BLOCK
    partial, full = decode_blocks(bm, nb)
    q_idx = torch.arange(T)[:, None]
    kv_idx = torch.arange(T)[None, :]
    mod = bm.mask_mod(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64), q_idx, kv_idx)
    up = lambda t: t.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)  # noqa: E731
    return up(full) | (up(partial) & mod)


_REF_CACHE: dict = {}


def cached_ref_attention(T, pattern, window, seed):
    key = (T, pattern, window, seed)
    if key not in _REF_CACHE:
        q, k, v = qkv(T, seed)
        _REF_CACHE[key] = ref_attention(q, k, v, make_tokens(pattern, T), window)
    return _REF_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------------
# mask semantics


@pytest.mark.parametrize("T", [256, 512])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_document_ids(T, pattern):
    toks = make_tokens(pattern, T)
    assert tg.document_ids(toks).tolist() == ref_docs(toks)


@pytest.mark.parametrize("T", [256, 512])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window", [1, 64, 128, 200, 384, 1000])
def test_dense_mask_and_block_mask_match_python_loops(T, pattern, window):
    toks = make_tokens(pattern, T)
    expected = ref_mask(toks, window)
    docs = tg.document_ids(toks)
    assert torch.equal(tg.dense_attention_mask(docs, window), expected)
    w_tensor = torch.tensor(window, dtype=torch.int32)
    assert torch.equal(tg.dense_attention_mask(docs, w_tensor), expected)

    bm = tg.flex_block_mask(docs, w_tensor)
    nb = T // BLOCK
    assert bm.BLOCK_SIZE == (BLOCK, BLOCK)
    assert tuple(bm.seq_lengths) == (T, T)
    partial, full = decode_blocks(bm, nb)
    blocks = expected.view(nb, BLOCK, nb, BLOCK)
    any_allowed, all_allowed = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
    # sound: no block with an allowed pair is skipped, and a block computed without mask_mod is allowed throughout
    assert not (any_allowed & ~(partial | full)).any()
    assert not (full & ~all_allowed).any()
    # and tight, as documented: skipped exactly when nothing may attend, full exactly when everything may
    assert torch.equal(partial | full, any_allowed)
    assert torch.equal(full, all_allowed)
    assert not (partial & full).any()
    assert torch.equal(bm.to_dense()[0, 0].bool(), any_allowed)
    # what FlexAttention applies, position by position
    assert torch.equal(effective_mask(bm, T), expected)


def test_block_mask_has_full_blocks_for_long_documents():
    """Not a vacuous classification: a single long document with a wide window gives full (mask-free) blocks."""
    T = 512
    docs = tg.document_ids(make_tokens("bos_at_0", T))
    _, full = decode_blocks(tg.flex_block_mask(docs, 1000), T // BLOCK)
    assert full.sum().item() == (T // BLOCK) * (T // BLOCK - 1) // 2  # every strictly-lower block
    _, full = decode_blocks(tg.flex_block_mask(docs, 200), T // BLOCK)
    assert full.sum().item() == 0  # 200 < 2 * 128: no block pair is entirely within the window


# ---------------------------------------------------------------------------------------------------------------------
# attention outputs against the reference


@pytest.mark.parametrize("T", [256, 512])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window", [64, 200, 1000])
def test_dense_sdpa_matches_reference(T, pattern, window):
    q, k, v = qkv(T, seed=1)
    docs = tg.document_ids(make_tokens(pattern, T))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tg.dense_attention_mask(docs, window), scale=SCALE)
    expected = cached_ref_attention(T, pattern, window, 1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


FLEX_CASES = [
    (256, "no_bos", 64), (256, "bos_at_0", 1000), (256, "many_short", 200), (256, "block_edges", 64),
    (256, "long_docs", 200), (512, "many_short", 64), (512, "long_docs", 64), (512, "block_edges", 200),
    (512, "bos_at_0", 200), (512, "no_bos", 1000), (512, "long_docs", 1000),
]


@pytest.mark.parametrize("T,pattern,window", FLEX_CASES)
def test_flex_attention_matches_reference(T, pattern, window):
    q, k, v = qkv(T, seed=1)
    docs = tg.document_ids(make_tokens(pattern, T))
    bm = tg.flex_block_mask(docs, torch.tensor(window, dtype=torch.int32))
    out = flex_attention(q, k, v, block_mask=bm, scale=SCALE)
    expected = cached_ref_attention(T, pattern, window, 1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# AttentionMasks and the whole model


@pytest.mark.parametrize("long_window", [64, 200, 255, 512])
def test_attention_masks_long_and_short(long_window):
    T = 256
    toks = make_tokens("mixed", T, seed=3)
    w = torch.tensor(long_window, dtype=torch.int32)
    dense = tg.AttentionMasks(toks, w, "dense", SCALE)
    flex = tg.AttentionMasks(toks, w, "flex", SCALE)
    short = long_window // 2
    if long_window < 512:  # the test can tell the two windows apart
        assert not torch.equal(ref_mask(toks, long_window), ref_mask(toks, short))
    assert torch.equal(dense.masks["long"], ref_mask(toks, long_window))
    assert torch.equal(dense.masks["short"], ref_mask(toks, short))
    assert torch.equal(effective_mask(flex.masks["long"], T), ref_mask(toks, long_window))
    assert torch.equal(effective_mask(flex.masks["short"], T), ref_mask(toks, short))
    q, k, v = qkv(T, seed=4)
    for kind, win in (("long", long_window), ("short", short)):
        expected = ref_attention(q, k, v, toks, win)
        torch.testing.assert_close(dense.attend(q, k, v, kind).double(), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(flex.attend(q, k, v, kind).double(), expected, atol=2e-5, rtol=1e-4)


def test_gpt_flex_and_dense_give_same_logits():
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=50304, num_layers=4, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=2)
    model = tg.GPT(cfg).configure(torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # zero-initialised projections would hide the attention from the logits
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g))
        for block in model.blocks:
            for lin in [block.mlp.c_proj] + ([block.attn.c_proj] if block.attn is not None else []):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.weight.size(1)))
    toks = make_tokens("mixed", 256, seed=7).to(torch.int32)  # the 64/128 windows bind in the long documents
    with torch.no_grad():
        model.attn_impl = "dense"
        dense = model(toks, long_window=128)
        model.attn_impl = "flex"
        flex = model(toks, long_window=128)
        # the masks matter for these logits: wider windows give different ones
        wide = model(toks, long_window=1024)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-5)
    assert (wide - dense).abs().max() > 1e-2
