"""Sampling throughput of generate.py's KV-cache decoder: tokens/s at batch 1 and batch 8.

    python bench/bench_generate.py                                   # tiny preset, random weights, CPU-quick
    python bench/bench_generate.py --preset speedrun --compile       # track-1 model on a GPU, compiled decode step
    python bench/bench_generate.py --checkpoint checkpoints/latest --prompt-len 512 --new-tokens 256
    python bench/bench_generate.py --preset speedrun --hf            # also Hugging Face GPT-2 124M, same shapes

tokens/s counts generated tokens of all samples (batch x new tokens) over the wall time of a whole generate call,
prompt forward included; the prompt forward alone is reported as well. EOT never stops a sample here, so every run
produces exactly the asked number of tokens. Weights of a preset are freshly initialised (random): speed does not
depend on them. A warm-up call identical to the timed one precedes each timing (compilation, allocator, caches).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate as g  # noqa: E402
from runlib import errors  # noqa: E402
import train_gpt as tg  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preset_model(name: str, device: torch.device, seed: int) -> tuple[tg.GPT, int]:
    """A randomly initialised GPT of a preset and the window its training would end with."""
    hp = tg.preset_hyperparameters(name)
    torch.manual_seed(seed)
    model = tg.GPT(tg.GPTConfig.from_hyperparameters(hp)).to(device)
    model = model.configure(device, attention="dense", fp8=False).eval().requires_grad_(False)
    return model, tg.window_blocks(hp.num_iterations, hp)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_ours(model: tg.GPT, window: int, prompt: list[int], new_tokens: int, batch: int, compile_: bool,
               device: torch.device) -> dict:
    sc = g.SamplingConfig(max_tokens=new_tokens, num_samples=batch, temperature=0, stop_at_eot=False,
                          compile=compile_)
    # one decoder for the warm-up and the timed call: a compiled decode step belongs to its decoder and is specialised
    # to the cache's size and the batch, so anything else would leave a compilation inside the timing
    decoder = g.new_decoder(model, window, len(prompt), sc)
    g.generate(model, window, prompt, sc, decoder=decoder)
    seconds = timed(lambda: g.generate(model, window, prompt, sc, decoder=decoder), device)
    ids = torch.tensor([[g.EOT_ID] + prompt] * batch, device=device)
    decoder = g.KVDecoder(model, window, batch, ids.size(1))
    prefill = timed(lambda: decoder.step(ids), device)
    return {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds, "prefill_s": prefill}


def bench_hf(prompt: list[int], new_tokens: int, batch: int, device: torch.device) -> dict | str:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return "transformers is not installed (pip install transformers to compare with Hugging Face GPT-2)"
    model = GPT2LMHeadModel(GPT2Config()).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    ids = torch.tensor([[g.EOT_ID] + prompt] * batch, device=device)
    attn = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=g.EOT_ID)

    run(min(new_tokens, 8))
    seconds = timed(lambda: run(new_tokens), device)
    return {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint file or run directory (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "speedrun"], help="model size when no checkpoint")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (BOS not counted)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA)")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face GPT-2 124M (random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is steadier on a busy machine")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        device = g.pick_device(args.device)
        batches = [int(b) for b in args.batches.split(",")]
        if args.prompt_len < 0 or args.new_tokens < 1 or min(batches) < 1:
            raise g.GenerateError("--prompt-len must be >= 0, --new-tokens and every batch >= 1")
        if args.compile and device.type != "cuda":
            raise g.GenerateError("--compile is for CUDA devices; on the CPU leave it out")
        if args.checkpoint:
            loaded = tg.load_model(args.checkpoint, device)
            model, window, what = loaded.model, loaded.window_blocks, str(loaded.path)
        else:
            model, window = preset_model(args.preset, device, args.seed)
            what = f"preset {args.preset} (random weights)"
    except (ValueError, errors.CheckpointError, g.GenerateError) as e:
        print(f"bench_generate.py: error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, g.EOT_ID, (args.prompt_len,), generator=gen).tolist()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {what}, {params / 1e6:.1f}M parameters, window {window} blocks; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens per sample{', compiled' if args.compile else ''}")
    for batch in batches:
        r = bench_ours(model, window, prompt, args.new_tokens, batch, args.compile, device)
        print(f"generate.py   batch {batch:3d}: {r['tokens_per_s']:10.1f} tokens/s ({r['seconds']:.3f}s, "
              f"prompt forward {1000 * r['prefill_s']:.1f} ms)")
    if args.hf:
        for batch in batches:
            r = bench_hf(prompt, args.new_tokens, batch, device)
            if isinstance(r, str):
                print(f"hf gpt2-124M: {r}")
                break
            print(f"hf gpt2-124M  batch {batch:3d}: {r['tokens_per_s']:10.1f} tokens/s ({r['seconds']:.3f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
