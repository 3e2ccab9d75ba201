"""Attention masks of record 28 (causal AND same document, with windows counted in whole 128-token blocks) as dense
masks and as FlexAttention BlockMasks, held against a per-position reference written with python loops, and the
block lists against the record's own construction of them (ordered lists whose counts are clamped to the window).

FlexAttention run eagerly on a CPU applies mask_mod only and ignores the block lists, where the window lives: the
block masks are checked through the dense mask rebuilt from their lists (effective_mask) and through compiled
flex, never through eager flex."""

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


def ref_allowed(docs: list[int], i: int, window_blocks: int) -> list[int]:
    """Keys query i may attend to: not in the future, in its document, and in its own 128-token block or one of the
    max(window_blocks, 1) - 1 blocks before it."""
    first = max(0, (i // BLOCK - (max(window_blocks, 1) - 1)) * BLOCK)
    return [j for j in range(first, i + 1) if docs[j] == docs[i]]


def ref_mask(tokens, window_blocks: int) -> torch.Tensor:
    docs = ref_docs(tokens)
    T = len(docs)
    rows = []
    for i in range(T):
        row = [False] * T
        for j in ref_allowed(docs, i, window_blocks):
            row[j] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def record_block_lists(tokens, window_blocks: int) -> tuple[list[list[int]], list[list[int]]]:
    """The record's kv block lists (partial, full) per query block, built as its create_blockmasks does: every
    causal block pair whose document ranges overlap, "full" where both blocks hold one and the same document (and the
    key block is strictly earlier), "partial" for the rest; each list ordered nearest block first; then the counts
    clamped to the window: full to window - 1, partial to max(window - (unclamped full count), 1)."""
    docs = ref_docs(tokens)
    nb = len(docs) // BLOCK
    low = [docs[b * BLOCK] for b in range(nb)]
    high = [docs[b * BLOCK + BLOCK - 1] for b in range(nb)]
    partial, full = [], []
    for q in range(nb):
        overlap = [k for k in range(q, -1, -1) if low[q] <= high[k] and high[q] >= low[k]]
        same = [k for k in range(q - 1, -1, -1) if low[q] == high[k] and high[q] == low[k]]
        rest = [k for k in overlap if k not in same]
        full.append(same[:max(0, min(len(same), window_blocks - 1))])
        partial.append(rest[:min(len(rest), max(window_blocks - len(same), 1))])
    return partial, full


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

SIZES = [256, 640]  # 2 and 5 blocks of 128
WINDOWS = [0, 1, 2, 3, 5]  # in blocks; 0 is the record's short window of its first 126 steps (own block only)


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_document_ids(T, pattern):
    toks = make_tokens(pattern, T)
    assert tg.document_ids(toks).tolist() == ref_docs(toks)


def listed(num: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    """A BlockMask's kv block lists, per query block, in the order FlexAttention visits them."""
    return [idx[0, 0, q, :int(num[0, 0, q])].tolist() for q in range(num.size(-1))]


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window", WINDOWS)
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
    assert not (partial & full).any()
    # what FlexAttention applies, position by position: the dense mask rebuilt from the block lists and mask_mod
    assert torch.equal(effective_mask(bm, T), expected)
    # and the lists are the record's, block for block and in its order (nearest first)
    record_partial, record_full = record_block_lists(toks, window)
    assert listed(bm.kv_num_blocks, bm.kv_indices) == record_partial
    assert listed(bm.full_kv_num_blocks, bm.full_kv_indices) == record_full


def test_windows_are_whole_blocks():
    """Not a token window: with 2 blocks a query sees all of the previous block, however far back its keys lie, and
    nothing before it; with 0 or 1 only its own block (its first position sees itself only)."""
    T = 640
    mask = tg.dense_attention_mask(tg.document_ids(make_tokens("no_bos", T)), 2)  # one document without BOS
    assert mask[300].tolist() == [128 <= j <= 300 for j in range(T)]
    assert mask[383].sum().item() == 256 and mask[384].sum().item() == 129
    for w in (0, 1):
        own = tg.dense_attention_mask(tg.document_ids(make_tokens("no_bos", T)), w)
        assert own[256].sum().item() == 1 and own[383].sum().item() == 128


def test_block_mask_has_full_blocks_for_long_documents():
    """Not a vacuous classification: one long document gives full (mask-free) blocks, window - 1 per query block."""
    T = 640
    nb = T // BLOCK
    docs = tg.document_ids(make_tokens("bos_at_0", T))
    for window in (1, 2, 3, 5):
        _, full = decode_blocks(tg.flex_block_mask(docs, window), nb)
        assert full.sum().item() == sum(min(q, window - 1) for q in range(nb))
        assert full.diagonal().sum().item() == 0  # a query's own block always needs the causal mask_mod


# ---------------------------------------------------------------------------------------------------------------------
# attention outputs against the reference


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window", [0, 2, 5])
def test_dense_sdpa_matches_reference(T, pattern, window):
    q, k, v = qkv(T, seed=1)
    docs = tg.document_ids(make_tokens(pattern, T))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tg.dense_attention_mask(docs, window), scale=SCALE)
    expected = cached_ref_attention(T, pattern, window, 1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


FLEX_CASES = [
    (256, "no_bos", 0), (256, "bos_at_0", 5), (256, "many_short", 1), (256, "block_edges", 2),
    (256, "long_docs", 1), (640, "many_short", 2), (640, "long_docs", 2), (640, "block_edges", 3),
    (640, "bos_at_0", 3), (640, "no_bos", 0), (640, "long_docs", 5),
]


@pytest.mark.slow  # compiles FlexAttention
@pytest.mark.parametrize("T,pattern,window", FLEX_CASES)
def test_compiled_flex_attention_matches_reference(T, pattern, window):
    """Compiled, as the trainer runs it on every device: eager flex on a CPU applies mask_mod alone and ignores the
    block lists, where the window lives, so it would check no window at all."""
    q, k, v = qkv(T, seed=1)
    docs = tg.document_ids(make_tokens(pattern, T))
    bm = tg.flex_block_mask(docs, torch.tensor(window, dtype=torch.int32))
    out = tg._flex_attention_fn()(q, k, v, block_mask=bm, scale=SCALE)
    expected = cached_ref_attention(T, pattern, window, 1)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    if not torch.equal(ref_mask(make_tokens(pattern, T), window), ref_mask(make_tokens(pattern, T), T // BLOCK)):
        # the window binds here: the eager call, blind to it, is far off
        assert (flex_attention(q, k, v, block_mask=bm, scale=SCALE).double() - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# AttentionMasks and the whole model


@pytest.mark.parametrize("long_blocks", [1, 2, 3, 5])
def test_attention_masks_long_and_short(long_blocks):
    T = 640
    toks = make_tokens("mixed", T, seed=3)
    w = torch.tensor(long_blocks, dtype=torch.int32)
    dense = tg.AttentionMasks(toks, w, "dense", SCALE)
    flex = tg.AttentionMasks(toks, w, "flex", SCALE)
    short = long_blocks // 2  # rounded down: 1 block gives a 0-block short window
    assert not torch.equal(ref_mask(toks, long_blocks), ref_mask(toks, short)) or long_blocks == 1
    assert torch.equal(dense.masks["L"], ref_mask(toks, long_blocks))
    assert torch.equal(dense.masks["S"], ref_mask(toks, short))
    assert torch.equal(effective_mask(flex.masks["L"], T), ref_mask(toks, long_blocks))
    assert torch.equal(effective_mask(flex.masks["S"], T), ref_mask(toks, short))
    q, k, v = qkv(T, seed=4)
    for kind, win in (("L", long_blocks), ("S", short)):
        expected = ref_attention(q, k, v, toks, win)
        torch.testing.assert_close(dense.attend(q, k, v, kind).double(), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(flex.attend(q, k, v, kind).double(), expected, atol=2e-5, rtol=1e-4)


def test_gpt_flex_and_dense_give_same_logits():
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=50304, num_layers=4, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=2,
                       window_pattern="LSS")
    model = tg.GPT(cfg).configure(torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # zero-initialised projections and gates would hide the attention from the logits
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g))
        for block in model.blocks:
            lins = [block.mlp.c_proj] + ([block.attn.c_proj, block.attn.gate] if block.attn is not None else [])
            for lin in lins:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.weight.size(1)))
    toks = make_tokens("mixed", 640, seed=7).to(torch.int32)  # a 540-token document: 2 blocks bind
    with torch.no_grad():
        model.attn_impl = "dense"
        dense = model(toks, window_blocks=2)
        model.attn_impl = "flex"
        flex = model(toks, window_blocks=2)
        # the masks matter for these logits: wider windows give different ones
        wide = model(toks, window_blocks=5)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-5)
    assert (wide - dense).abs().max() > 1e-2
