"""Correctness checks that only a GPU can run: FlexAttention against the dense mask in bf16, the FP8 head against a
bf16 reference, and compiled against eager training losses.

    python bench/check_cuda.py                                  # all checks, synthetic data
    python bench/check_cuda.py --data-dir data/code --train-files 'code_train_*.bin' --json out.json

1. attention: random documents and windows; FlexAttention (compiled, bf16) and the dense-mask attention (bf16) are
   both compared with an fp32 dense reference, forward output and the gradients of q, k and v. Flex passes when its
   error is within 2x the dense bf16 path's own error (plus a small floor): both are the same function in bf16.
2. fp8: the FP8 lm_head matmul (e4m3 forward, e5m2 gradient) against fp32, next to bf16 against fp32.
3. compile: the same training steps, data and initial weights with and without torch.compile; the losses must
   agree to within bf16 noise at every step (default 20 steps, track-1 model, 2 micro-batches of the speedrun's 48K
   tokens: the shapes of bench_train.py and of a real run, so a warm compile cache from either serves this check).
Exit status 0 when every check passes, 1 otherwise. On a CPU the script runs the forward checks only (FlexAttention
has no CPU backward; FP8 matmuls need a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the trainer; bench_train.py sits beside this script
from runlib import devices, errors  # noqa: E402
import train_gpt as tg  # noqa: E402
from bench_train import SyntheticBatches, synthetic_tokens  # noqa: E402


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def check_attention(device: torch.device, backward: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    cases = []
    ok = True
    # (tokens, mean document length, long window in blocks, which window): short of 1 block is the 0-block window
    # of the record's first 126 steps (a query sees its own block only); 14 blocks is the end of training
    for T, mean_doc, window, kind in [(2048, 300, 1, "S"), (4096, 1000, 3, "S"), (8192, 2000, 14, "L"),
                                      (16384, 5000, 8, "S"), (4096, 100000, 14, "L")]:
        if device.type != "cuda" and T > 4096:
            continue  # the fp32 dense reference of a long sequence is too slow on a CPU
        tokens = torch.from_numpy(synthetic_tokens(T, mean_doc, len(cases))).to(device)
        H, D = 6, 128
        q, k, v = (torch.randn(1, H, T, D, generator=gen).to(device) for _ in range(3))
        win = torch.tensor(window, dtype=torch.int32, device=device)
        results = {}
        for impl, dtype in (("ref", torch.float32), ("dense", torch.bfloat16), ("flex", torch.bfloat16)):
            qi, ki, vi = (t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v))
            masks = tg.AttentionMasks(tokens, win, "dense" if impl == "ref" else impl, 0.12)
            out = masks.attend(qi, ki, vi, kind)
            grads = ()
            if backward:
                (out.float() * torch.linspace(-1, 1, D, device=device)).sum().backward()
                grads = (qi.grad, ki.grad, vi.grad)
            results[impl] = (out.detach(), *grads)
        err = {impl: max(rel_err(a, r) for a, r in zip(results[impl], results["ref"])) for impl in ("dense", "flex")}
        passed = err["flex"] <= 2 * err["dense"] + 1e-3
        ok &= passed
        blocks = window if kind == "L" else window // 2  # what the layer sees: a short window is half the long one
        cases.append({"T": T, "mean_doc_len": mean_doc, "window": window, "kind": kind, "window_blocks": blocks,
                      "dense_bf16_rel_err": err["dense"], "flex_bf16_rel_err": err["flex"], "passed": passed})
        print(f"attention T={T:6d} docs~{mean_doc:6d} {kind} window {blocks:2d} blocks: rel. error vs fp32 "
              f"dense bf16 {err['dense']:.2e}, flex bf16 {err['flex']:.2e} {'ok' if passed else 'FAIL'}", flush=True)
    return {"passed": ok, "backward": backward, "cases": cases}


def check_fp8(device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 768, generator=gen).to(device)
    w = (torch.randn(50304, 768, generator=gen) * 0.02).to(device)
    g = torch.randn(8192, 50304, generator=gen).to(device)
    out = {}
    for name in ("fp32", "bf16", "fp8"):
        xi = x.clone().requires_grad_(True)
        wi = w.clone().requires_grad_(True)
        if name == "fp8":
            y = tg.fp8_linear(xi.bfloat16(), wi, tg.fp8_x_scale(768))
        elif name == "bf16":
            y = F.linear(xi.bfloat16(), wi.bfloat16())
        else:
            y = F.linear(xi, wi)
        y.float().backward(g)
        out[name] = (y.detach(), xi.grad, wi.grad)
    err = {n: [rel_err(a, r) for a, r in zip(out[n], out["fp32"])] for n in ("bf16", "fp8")}
    passed = all(e < 0.08 for e in err["fp8"])  # e4m3 has 3 mantissa bits: a few percent is its resolution
    print(f"fp8 head matmul: rel. error vs fp32 (out, grad x, grad w): bf16 "
          f"{', '.join(f'{e:.2e}' for e in err['bf16'])}; fp8 {', '.join(f'{e:.2e}' for e in err['fp8'])} "
          f"{'ok' if passed else 'FAIL'}", flush=True)
    return {"passed": passed, "bf16_rel_err": err["bf16"], "fp8_rel_err": err["fp8"]}


def check_compile(device: torch.device, args) -> dict:
    hp = dataclasses.replace(tg.preset_hyperparameters("speedrun"), train_seq_len=args.seq_len, seqs_per_step=2,
                             num_iterations=args.steps, device=str(device), attention="flex",
                             muon_momentum_warmup_steps=args.steps)
    if args.data_dir:
        files = tg.find_shards(args.data_dir, args.train_files, "train")
    else:
        files = None
    losses, times = {}, {}
    for compiled in (False, True):
        run = dataclasses.replace(hp, compile=compiled)
        trainer = tg.Trainer(run, device, train_files=files)
        batches = trainer.loader if files is not None else SyntheticBatches(run, trainer.grad_accum, device, seed=2)
        print(f"compile check: {args.steps} steps {'compiled' if compiled else 'eager'}...", flush=True)
        t0 = time.perf_counter()
        out = []
        for step in range(args.steps):
            batch = batches.next_batch(device)
            out.append(trainer.train_step(batch).item())
        times["compiled" if compiled else "eager"] = time.perf_counter() - t0
        losses["compiled" if compiled else "eager"] = out
        del trainer
        torch.cuda.empty_cache()
    diffs = [abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])]
    passed = max(diffs) < args.loss_tol
    for i, (a, b) in enumerate(zip(losses["eager"], losses["compiled"])):
        print(f"step {i + 1:3d}: eager {a:.4f}  compiled {b:.4f}  diff {abs(a - b):.4f}")
    print(f"compiled vs eager over {args.steps} steps: max |loss diff| {max(diffs):.4f} (tolerance {args.loss_tol}); "
          f"eager {times['eager']:.1f}s, compiled {times['compiled']:.1f}s including compilation "
          f"{'ok' if passed else 'FAIL'}", flush=True)
    return {"passed": passed, "steps": args.steps, "seq_len": args.seq_len, "losses": losses,
            "max_abs_diff": max(diffs), "tolerance": args.loss_tol, "seconds": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--checks", default="attention,fp8,compile", help="comma-separated subset")
    p.add_argument("--steps", type=int, default=20, help="training steps of the compile check")
    p.add_argument("--seq-len", type=int, default=48 * 1024, help="tokens per micro-batch in the compile check")
    p.add_argument("--loss-tol", type=float, default=0.05, help="largest allowed |eager - compiled| loss")
    p.add_argument("--data-dir", default=None, help="train shards for the compile check (default: random tokens)")
    p.add_argument("--train-files", default="*_train_*.bin")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        device = devices.resolve_device(args.device, train=False)
    except errors.ConfigError as e:
        p.error(str(e))
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = set(checks) - {"attention", "fp8", "compile"}
    if unknown:
        p.error(f"unknown checks: {', '.join(sorted(unknown))}")
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    results = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": time.strftime("%Y-%m-%d")}
    for check in checks:
        t0 = time.perf_counter()
        if check == "attention":
            results["attention"] = check_attention(device, backward=on_gpu)
        elif check == "fp8":
            if not (on_gpu and tg.head_precision(device, True) == "fp8"):
                print("fp8: skipped (needs a GPU of compute capability >= 8.9)")
                continue
            results["fp8"] = check_fp8(device)
        elif check == "compile":
            if not on_gpu:
                print("compile: skipped (the flex training path needs CUDA)")
                continue
            results["compile"] = check_compile(device, args)
        results[check]["seconds_total"] = time.perf_counter() - t0
        print(f"{check}: {results[check]['seconds_total']:.1f}s", flush=True)
    passed = all(v["passed"] for v in results.values() if isinstance(v, dict))
    results["passed"] = passed
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print("all checks passed" if passed else "SOME CHECKS FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
