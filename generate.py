"""Sample text from a checkpoint written by train_gpt.py, with a key/value cache.

    python generate.py --prompt "The meaning of life is"                  # checkpoints/latest, cuda if available
    python generate.py --checkpoint checkpoints/RUN --prompt-file p.txt --num-samples 4 --temperature 0.8 --top-p 0.9
    echo "def main():" | python generate.py --prompt - --temperature 0    # greedy, prompt from stdin
    python generate.py --compile --max-tokens 1000                         # CUDA: compiled decode step

Sampling computes the same function as the trained model at the end of training: the long attention window is
train_gpt.window_blocks(num_iterations) of the run, in 128-token blocks (the short one half of it), with value
embeddings, attention gates, U-net skips, x0 mixing and soft-capped logits taken from the model's own modules.
Token 50256 (<|endoftext|>) starts a document and attention never crosses documents, so the prompt is preceded by
it, as every training document is.

The decode path (KVDecoder) runs the forward of the train_gpt.GPT instance itself on the new positions only, with a
KVCache: preallocated keys, values and document ids of the positions so far. Importing this module has no
side effects; main(argv) does the work.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from data.tokenizer import TokenizerUnavailable, gpt2_tokenizer
from runlib import cli, devices, errors, stopping
import train_gpt as tg

EOT_ID = tg.BOS_ID  # <|endoftext|>: ends a document, and (as BOS) starts the next
TEXT_VOCAB = EOT_ID + 1  # ids >= 50257 are padding of the embedding table, never real tokens


class GenerateError(ValueError):
    """A bad flag, prompt or checkpoint; main() prints it without a traceback and exits 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Loading


# A checkpoint's model is train_gpt.load_model's: the function every script that samples or scores uses.


# ----------------------------------------------------------------------------------------------------------------------
# Incremental decoding


class KVCache:
    """Keys, values and document ids of the positions seen so far of `batch` sequences, in buffers preallocated for
    max_len positions, for decoding with GPT.hidden(tokens, window_blocks, cache).

    Before each forward, advance(T) hands out the next T positions; the forward then writes every attention layer's
    keys and values there (update) and attends over the cached prefix with the training forward's mask (begin):
    causal, within the document, at most the layer's window minus one 128-token blocks back. Document ids continue
    from the cached positions; rotary angles are those of the absolute positions.

    static=False: attention reads only the keys inside each window (fastest eagerly). static=True: it reads the whole
    buffer, stale or future entries masked out, and no changing Python number is read inside the forward, so that a
    one-token forward always has the same shapes and can be compiled.
    """

    def __init__(self, model: tg.GPT, batch: int, max_len: int, static: bool = False):
        cfg = model.cfg
        device = model.embed.weight.device
        self.batch, self.max_len, self.static, self.scale = batch, max_len, static, cfg.attn_scale
        self.k = [torch.zeros(batch, cfg.num_heads, max_len, cfg.head_dim, device=device, dtype=model.act_dtype)
                  if b.attn is not None else None for b in model.blocks]
        self.v = [torch.zeros_like(k) if k is not None else None for k in self.k]
        self.docs = torch.zeros(batch, max_len, dtype=torch.int64, device=device)
        self.last_doc = torch.zeros(batch, dtype=torch.int64, device=device)  # document id of the last position
        self.cos, self.sin = model.rotary(max_len, device)
        # position and 128-token block tables: a compiled step then computes neither (torch 2.13's CPU inductor
        # leaves garbage in the tail of a vectorised arange // 128)
        self.positions = torch.arange(max_len, device=device)
        self.blocks = self.positions // tg.FLEX_BLOCK_SIZE
        self.length = 0  # positions handed out so far
        self.start, self.pending = 0, 0  # first position and count of those the next forward writes
        self.pos = self.positions[:0]

    def reset(self) -> None:
        """Forget every position (buffers are reused: stale entries are future positions to any query)."""
        self.length = self.start = self.pending = 0
        self.last_doc.zero_()

    def advance(self, T: int) -> None:
        """Hand out positions length..length+T-1 to the next forward. Done outside it: compiled, it would otherwise
        read a Python number that changes at every step, and recompile."""
        if self.length + T > self.max_len:
            raise ValueError(f"{self.length + T} positions exceed the cache's {self.max_len}")
        self.start, self.pending = self.length, T
        self.pos = self.positions[self.length:self.length + T]
        self.length += T

    def _keys(self, window: int) -> tuple[int, int]:
        """Buffer range [lo, hi) the new queries of a layer with this window (in blocks) attend over."""
        if self.static:
            return 0, self.max_len
        first_block = self.start // tg.FLEX_BLOCK_SIZE - (window - 1)
        return max(0, first_block * tg.FLEX_BLOCK_SIZE), self.start + self.pending

    def begin(self, tokens: Tensor, window_blocks: int) -> tuple[tuple[Tensor, Tensor], CachedMasks]:
        """Record the documents of the new tokens (batch, T); return their rotary tables and the forward's masks,
        one per window: long window_blocks, short half of it, as AttentionMasks."""
        if tokens.shape != (self.batch, self.pending):
            raise ValueError(f"advance the cache by {tokens.size(-1)} for {self.batch} sequences before the forward")
        pos = self.pos
        docs = self.last_doc[:, None] + (tokens == tg.BOS_ID).cumsum(1)
        self.docs.index_copy_(1, pos, docs)
        self.last_doc.copy_(docs[:, -1])
        masks = {}
        for kind, window in (("L", int(window_blocks)), ("S", int(window_blocks) // 2)):
            window = max(1, window)  # a window of 0 blocks still sees its own
            lo, hi = self._keys(window)
            near = ((pos[:, None] >= self.positions[None, lo:hi])
                    & (self.blocks[pos][:, None] - self.blocks[None, lo:hi] < window))
            masks[kind] = lo, (near[None] & (docs[:, :, None] == self.docs[:, None, lo:hi]))[:, None]
        self.pending = 0
        return (self.cos[pos], self.sin[pos]), CachedMasks(masks, self.scale)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a layer's new keys and values (batch, heads, T, head_dim) at their positions; return the layer's
        cached ones up to the last new position (the whole buffer when static)."""
        hi = self.max_len if self.static else self.start + k.size(2)
        self.k[layer].index_copy_(2, self.pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.pos, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, :hi], self.v[layer][:, :, :hi]


class CachedMasks:
    """AttentionMasks of a forward with a KVCache: per window kind, where its keys start in the cached ones given to
    attend, and the (batch, 1, T, keys) mask over them. Dense attention: FlexAttention is not used for decoding."""

    def __init__(self, masks: dict[str, tuple[int, Tensor]], scale: float):
        self.masks, self.scale = masks, scale

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kind: str) -> Tensor:
        lo, mask = self.masks[kind]
        return F.scaled_dot_product_attention(q, k[:, :, lo:], v[:, :, lo:], attn_mask=mask, scale=self.scale)


class KVDecoder:
    """Runs a train_gpt.GPT on new tokens of `batch` parallel sequences through the model's own forward, with a
    KVCache of max_len positions holding the keys, values and document ids of all positions so far.

    Each call to step() appends the given tokens (the same number for every sequence) and returns their logits.
    static=False (eager): attention reads only the keys inside each window, fastest on CPU. static=True: every step
    reads the whole cache under a mask, so a one-token step always has the same shapes and can be compiled.
    """

    def __init__(self, model: tg.GPT, window_blocks: int, batch: int, max_len: int, static: bool = False):
        self.model, self.window_blocks = model, int(window_blocks)
        self.cache = KVCache(model, batch, max_len, static=static)
        self._compiled = None

    batch = property(lambda self: self.cache.batch)
    max_len = property(lambda self: self.cache.max_len)
    static = property(lambda self: self.cache.static)

    def reset(self) -> None:
        """Forget every position (the buffers are reused: stale entries are masked out as future positions)."""
        self.cache.reset()

    def compile(self) -> None:
        """Compile the one-token step; needs static=True so that its shapes never change."""
        if not self.static:
            raise ValueError("compile needs a static cache")
        self._compiled = torch.compile(self._hidden, dynamic=False)

    def _hidden(self, tokens: Tensor) -> Tensor:
        return self.model.hidden(tokens, self.window_blocks, self.cache)

    @torch.no_grad()
    def step(self, tokens: Tensor, all_logits: bool = False) -> Tensor:
        """tokens (batch, T) -> logits (batch, vocab) of the last position, or (batch, T, vocab) with all_logits."""
        B, T = tokens.shape
        if B != self.batch:
            raise ValueError(f"the cache holds {self.batch} sequences, got {B}")
        self.cache.advance(T)  # on the host, outside a compiled step
        fn = self._compiled if (self._compiled is not None and T == 1) else self._hidden
        x = fn(tokens)
        return self.model.head_logits(x if all_logits else x[:, -1])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """Next token ids (batch,) from logits (batch, vocab). Padding ids >= 50257 are never chosen.

    temperature 0 is greedy argmax (no randomness used). top_k 0 and top_p 1 switch those filters off; top_p keeps
    the smallest set of most likely tokens whose probability reaches top_p (always at least the most likely one).
    """
    logits = logits.float().clone()
    logits[:, TEXT_VOCAB:] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, TEXT_VOCAB), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclasses.dataclass
class SamplingConfig:
    max_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eot: bool = True
    compile: bool = False


def new_decoder(model: tg.GPT, window_blocks: int, prompt_len: int, sc: SamplingConfig) -> KVDecoder:
    """A decoder sized for a prompt of prompt_len tokens (BOS not counted) and sc; compiled when sc.compile."""
    decoder = KVDecoder(model, window_blocks, sc.num_samples, prompt_len + 1 + sc.max_tokens, static=sc.compile)
    if sc.compile:
        decoder.compile()
    return decoder


def generate(model: tg.GPT, window_blocks: int, prompt_ids: list[int], sc: SamplingConfig,
             on_token=None, decoder: KVDecoder | None = None) -> list[list[int]]:
    """New token ids of each sample (the prompt excluded; a final EOT excluded when stopping at it).

    The prompt is preceded by BOS like every training document and fed in one forward for all samples; then one
    token per step. on_token(sample, token_id) is called as each token is chosen. A stopped sample keeps being fed
    EOT (its output is ignored) so that the batch keeps its shape; the loop ends when every sample has stopped.
    decoder: a KVDecoder to reuse (reset first), e.g. one already compiled; by default a new one is made.
    """
    device = model.embed.weight.device
    ids = [EOT_ID] + list(prompt_ids)
    B = sc.num_samples
    if decoder is None:
        decoder = new_decoder(model, window_blocks, len(prompt_ids), sc)
    elif decoder.batch != B or decoder.max_len < len(ids) + sc.max_tokens:
        raise ValueError(f"the decoder holds {decoder.batch} x {decoder.max_len} positions; this call needs "
                         f"{B} x {len(ids) + sc.max_tokens}")
    decoder.reset()
    generator = torch.Generator(device=device)
    generator.manual_seed(sc.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    if sc.max_tokens <= 0:
        return out
    done = [False] * B
    logits = decoder.step(torch.tensor([ids] * B, dtype=torch.int64, device=device))
    for n in range(sc.max_tokens):
        nxt = sample_next(logits, sc.temperature, sc.top_k, sc.top_p, generator)
        chosen = nxt.tolist()
        for b, t in enumerate(chosen):
            if done[b]:
                continue
            if t == EOT_ID and sc.stop_at_eot:
                done[b] = True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, t)
        if all(done) or n == sc.max_tokens - 1:
            break
        feed = torch.tensor([EOT_ID if d else t for d, t in zip(done, chosen)], dtype=torch.int64, device=device)
        logits = decoder.step(feed[:, None])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog="generate.py", description="Sample text from a train_gpt.py checkpoint.")
    cli.add_checkpoint_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text; '-' reads it from stdin (default: empty: BOS alone)")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate per sample (default 256)")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch (default 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same text")
    p.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="keep going after <|endoftext|> (it then starts a new document)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA only)")
    return p


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.max_tokens < 0:
        problems.append(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.num_samples < 1:
        problems.append(f"--num-samples must be >= 1, got {args.num_samples}")
    if not args.temperature >= 0:
        problems.append(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 is off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (1 is off), got {args.top_p}")
    if problems:
        raise GenerateError("; ".join(problems))


def pick_device(spec: str | None) -> torch.device:
    """The sampling device: the trainer's rule (devices.resolve_device), any GPU allowed (older ones sample in fp32)."""
    try:
        return devices.resolve_device(spec, train=False)
    except errors.ConfigError as e:
        raise GenerateError(str(e)) from None


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from e
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


class TokenPrinter:
    """Decodes tokens into text as they come: a token may end inside a UTF-8 character, so bytes are decoded
    incrementally and a character appears once complete."""

    def __init__(self, encoding, stream):
        self.encoding, self.stream = encoding, stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, token: int) -> None:
        self.stream.write(self.decoder.decode(self.encoding.decode_single_token_bytes(token)))
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write(self.decoder.decode(b"", final=True))
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C or SIGTERM stops it at once with one line (exit 130 or 143): sampling writes no file."""
    return stopping.stopping_at_once("generate.py", "while sampling", "no file is written, so nothing is lost",
                                lambda: sample(build_arg_parser().parse_args(argv)))


def sample(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        device = pick_device(args.device)
        if args.compile and device.type != "cuda":
            raise GenerateError("--compile is for CUDA devices; on the CPU leave it out")
        prompt = read_prompt(args)
        encoding = gpt2_tokenizer()[0]
        loaded = tg.load_model(args.checkpoint or "auto", device, args.checkpoint_dir, args.run)
    except (GenerateError, errors.CheckpointError, TokenizerUnavailable) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    prompt_ids = encoding.encode_ordinary(prompt)
    which = ("" if args.checkpoint or args.run else
             f"; the newest checkpoint of any run ({Path(args.checkpoint_dir) / 'latest'}): --run NAME picks a run")
    print(f"generate.py: {loaded.path} (run {loaded.run_id}, step {loaded.step}{which}), window "
          f"{loaded.window_blocks} x {tg.FLEX_BLOCK_SIZE} tokens, {len(prompt_ids)} prompt tokens, on {device}; "
          f"{args.num_samples} sample(s) of up to {args.max_tokens} tokens, temperature {args.temperature:g}, "
          f"top-k {args.top_k or 'off'}, top-p {args.top_p:g}, seed {args.seed}", file=sys.stderr)
    sc = SamplingConfig(max_tokens=args.max_tokens, num_samples=args.num_samples, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_at_eot=args.stop_at_eot,
                        compile=args.compile)
    out = sys.stdout
    printer = TokenPrinter(encoding, out) if sc.num_samples == 1 else None
    if printer is not None:
        out.write(prompt)
        out.flush()
    t0 = time.perf_counter()
    samples = generate(loaded.model, loaded.window_blocks, prompt_ids, sc,
                       on_token=(lambda b, t: printer.write(t)) if printer is not None else None)
    seconds = time.perf_counter() - t0
    if printer is not None:
        printer.finish()
        out.write("\n")
    else:
        for i, ids in enumerate(samples):
            out.write(f"{'' if i == 0 else chr(10)}----- sample {i + 1} of {len(samples)} -----\n")
            out.write(prompt + encoding.decode(ids) + "\n")
    out.flush()
    total = sum(len(s) for s in samples)
    print(f"generate.py: {total} tokens in {seconds:.2f}s ({total / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
