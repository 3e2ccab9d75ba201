"""Three optimiser steps of build_optimizers' Muon + DistAdam on a small GPT with synthetic gradients.

Run under torchrun (gloo) it is the distributed case: every rank builds the same model (same seed) and gets its own
gradient, base + (rank - (W - 1) / 2) * noise, whose average over the ranks is exactly `base` (every value lies on a
2^-10 grid well inside fp32's range, so sums and halvings are exact). Called in-process without a process group,
run() is the one-process reference, which gets `base` itself. After two steps the optimisers' full_state() is
gathered, the optimisers are rebuilt from scratch and load_full_state() restores them before the third step.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_PREFIX

writes OUT_PREFIX.rank<r>.pt from every rank.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from runlib import processes  # noqa: E402
import train_gpt as tg  # noqa: E402

# 6 blocks, block 2 without attention: 5 attention blocks, an odd count, so on 2 ranks the last chunk of each attention
# shape (qkv (3, 64, 64), c_proj (64, 64), gate (2, 1)) is padded; the 12 MLP matrices (c_fc and c_proj, both
# (64, 256)) fill chunks of 2. vocab 1024 x 64 embeddings are sharded across 2 ranks, scalars are not.
MODEL = dict(vocab_size=1024, num_layers=6, model_dim=64, num_heads=2, head_dim=32, no_attn_layer=2)
STEPS = 3
RELOAD_AFTER = 2


def on_grid(shape, gen, scale=1.0) -> torch.Tensor:
    """Random values rounded to multiples of 2^-10 (times a power-of-two scale): exact under +, - and / 2 in fp32."""
    return torch.round(torch.randn(shape, generator=gen, dtype=torch.float64) * 1024) / 1024 * scale


def synthetic_grad(index: int, shape, step: int, rank: int, world_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000 * step + index)
    base = on_grid(shape, gen)
    noise = on_grid(shape, gen, scale=2.0)
    return (base + (rank - (world_size - 1) / 2) * noise).float()


def run() -> dict:
    rank, world_size = processes.dist_info()
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(**MODEL))
    hp = dataclasses.replace(tg.Hyperparameters(), **MODEL)
    opts = tg.build_optimizers(model, hp)
    named = list(model.named_parameters())

    def step(i: int) -> None:
        for index, (_, p) in enumerate(named):
            p.grad = synthetic_grad(index, p.shape, i, rank, world_size)
        for opt in opts.values():
            opt.step()
        model.zero_grad(set_to_none=True)

    states = {}
    for i in range(STEPS):
        if i == RELOAD_AFTER:
            states["reloaded"] = {k: opt.full_state() for k, opt in opts.items()}
            opts = tg.build_optimizers(model, hp)
            for k, opt in opts.items():
                opt.load_full_state(states["reloaded"][k])
        step(i)
    states["final"] = {k: opt.full_state() for k, opt in opts.items()}
    adam = opts["adam"]
    return {
        "rank": rank, "world_size": world_size,
        "params": {n: p.detach().clone() for n, p in named},
        "states": states,
        "muon_chunk_sizes": [len(c) for c in opts["muon"].chunks],
        "adam_sharded": sorted(adam.names[id(p)] for _, p in adam._params() if adam._sharded(p)),
    }


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    try:
        result = run()
        torch.save(result, f"{prefix}.rank{result['rank']}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
