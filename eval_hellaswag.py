"""HellaSwag validation accuracy of a checkpoint written by train_gpt.py.

    python eval_hellaswag.py --checkpoint checkpoints/RUN       # a run's newest checkpoint, on the GPU if any
    python eval_hellaswag.py --run RUN --limit 500              # the first 500 examples only (a quick look)
    ./train.sh --eval-hellaswag ...                             # the same, after the training run ends

Each of the 10,042 validation examples is a context and four endings, one of them right. Each ending is scored as a
completion: the model reads <|endoftext|>, the context, then " " + ending, and the ending's tokens' cross-entropy
is summed. The prediction is the ending with the lowest mean loss per token (acc_norm, the figure GPT-2 small's
0.2955 is quoted in) and, for acc, the lowest summed loss. Accuracies come with their standard error,
sqrt(p (1 - p) / n).

The validation file is downloaded once into --data-dir (default $HELLASWAG_DIR, else data/hellaswag) from HellaSwag's
repository, or from $HELLASWAG_URL; offline, put hellaswag_val.jsonl there by hand. Endings of many examples are
packed into one sequence per forward, each its own document: attention never crosses a document, and an ending too
long for the short window to cover wherever it starts begins at a 128-token block, so packing changes no score.
Importing this module has no side effects; main(argv) does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from data.shards import DiskFullError, atomic_write
from data.tokenizer import TokenizerUnavailable, gpt2_tokenizer
from runlib import cli, devices, errors, stopping
import train_gpt as tg

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
URL_ENV, DIR_ENV = "HELLASWAG_URL", "HELLASWAG_DIR"
FILE_NAME = "hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042  # the standard validation set
ATTEMPTS, TIMEOUT_S = 3, 30
HEAD_CHUNK = 1024  # positions whose logits are computed at once (each row is a vocabulary of fp32)


class EvalError(ValueError):
    """A bad flag, file or checkpoint; main() prints it in one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int


# ----------------------------------------------------------------------------------------------------------------------
# The validation file


def source_url() -> str:
    return os.environ.get(URL_ENV) or VAL_URL


def download(url: str, dest: Path, quiet: bool = False) -> None:
    """Fetch url into dest (a temporary file, renamed when complete), with a progress bar. A server error or a lost
    connection is tried ATTEMPTS times; a missing file (HTTP 4xx) once."""
    from tqdm import tqdm

    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=FILE_NAME,
                          disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
                    atomic_write(dest, lambda f: _copy(response, f, bar, size))
            return
        except DiskFullError as e:
            raise EvalError(str(e)) from None
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} {e.reason}"
            if e.code < 500:
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            problem = str(getattr(e, "reason", None) or e) or type(e).__name__
        if attempt < ATTEMPTS:
            time.sleep(attempt)
    raise EvalError(f"cannot download HellaSwag's validation set from {url} ({problem}); put {FILE_NAME} from "
                    f"{VAL_URL} at {dest}, or set {URL_ENV} to where it can be fetched")


def _copy(response, f, bar, size: int | None) -> None:
    """The body into f; a body shorter than its Content-Length is an error (http.client reads it as the end)."""
    got = 0
    while block := response.read(1 << 16):
        f.write(block)
        got += len(block)
        bar.update(len(block))
    if size is not None and got != size:
        raise ConnectionError(f"the connection closed after {got:,} of {size:,} bytes")


def validation_file(data_dir: Path, quiet: bool = False) -> Path:
    """data_dir/hellaswag_val.jsonl, downloaded first when it is not there."""
    path = data_dir / FILE_NAME
    if not path.is_file():
        url = source_url()
        if not quiet:
            print(f"eval_hellaswag.py: downloading {url} to {path}", file=sys.stderr)
        download(url, path, quiet)
    return path


def read_examples(path: Path) -> list[Example]:
    """The examples of a HellaSwag .jsonl file (one JSON object per line with ctx, endings and label)."""
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path} ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            context, endings, label = item["ctx"], item["endings"], item["label"]
            ok = (isinstance(context, str) and isinstance(endings, list) and len(endings) >= 2
                  and all(isinstance(e, str) and e for e in endings) and isinstance(label, int)
                  and 0 <= label < len(endings))
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise EvalError(f"{path}:{number} is not a HellaSwag example (a JSON object with a \"ctx\" string, "
                            "\"endings\", a list of strings, and \"label\", the index of the right one); delete the "
                            "file to download it again")
        examples.append(Example(context, tuple(endings), label))
    if not examples:
        raise EvalError(f"{path} holds no examples; delete it to download it again")
    return examples


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One ending of one example as token ids: <|endoftext|>, the context, then the ending."""
    example: int
    context: tuple[int, ...]
    ending: tuple[int, ...]

    def tokens(self) -> list[int]:
        return [tg.BOS_ID, *self.context, *self.ending]


def candidates(examples: list[Example], encode) -> list[Candidate]:
    """Every ending of every example; the ending is tokenised after a space, as it follows the context in text."""
    out = []
    for i, ex in enumerate(examples):
        context = tuple(encode(ex.context))
        out += [Candidate(i, context, tuple(encode(" " + ending))) for ending in ex.endings]
    return out


def aligned_starts(model: tg.GPT, window_blocks: int, longest: int) -> bool:
    """Whether each candidate must start at a 128-token block: attention windows count whole blocks, so a document
    that starts inside a block sees what it would alone only while its shorter window covers every block it spans."""
    shortest = max(1, min(window_blocks if kind == "L" else window_blocks // 2 for kind in model.window_kinds()))
    return -(-(longest + tg.FLEX_BLOCK_SIZE - 1) // tg.FLEX_BLOCK_SIZE) > shortest


def pack(cands: list[Candidate], batch_tokens: int, aligned: bool) -> list[list[tuple[int, int]]]:
    """The candidates in batches of at most batch_tokens tokens: per batch, (candidate index, start position)."""
    batches, batch, used = [], [], 0
    block = tg.FLEX_BLOCK_SIZE
    for i, cand in enumerate(cands):
        length = len(cand.tokens())
        if length > batch_tokens:
            raise EvalError(f"an example of {length} tokens does not fit --batch-tokens {batch_tokens}; give more")
        start = -(-used // block) * block if aligned else used
        if start + length > batch_tokens:
            batches.append(batch)
            batch, start = [], 0
        batch.append((i, start))
        used = start + length
    return batches + ([batch] if batch else [])


@torch.no_grad()
def score_batch(model: tg.GPT, window_blocks: int, cands: list[Candidate], batch: list[tuple[int, int]],
                device: torch.device) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy of each candidate's ending, its number of tokens), in the batch's order. Positions
    between the candidates hold <|endoftext|>: documents of one token, never scored."""
    end = max(start + len(cands[i].tokens()) for i, start in batch)
    length = -(-end // tg.FLEX_BLOCK_SIZE) * tg.FLEX_BLOCK_SIZE
    tokens = torch.full((length,), tg.BOS_ID, dtype=torch.long)
    positions, owners = [], []
    for j, (i, start) in enumerate(batch):
        ids = cands[i].tokens()
        tokens[start:start + len(ids)] = torch.tensor(ids)
        first = start + len(cands[i].context)  # the position that predicts the ending's first token
        positions += range(first, first + len(cands[i].ending))
        owners += [j] * len(cands[i].ending)
    tokens = tokens.to(device)
    hidden = model.hidden(tokens, torch.tensor(window_blocks, device=device, dtype=torch.int32))[0]
    positions_t = torch.tensor(positions, device=device)
    losses = torch.cat([F.cross_entropy(model.head_logits(hidden[p]), tokens[p + 1], reduction="none")
                        for p in positions_t.split(HEAD_CHUNK)])
    owners_t = torch.tensor(owners, device=device)
    sums = torch.zeros(len(batch), device=device).index_add_(0, owners_t, losses)
    counts = torch.bincount(owners_t, minlength=len(batch))
    return sums.cpu(), counts.cpu()


@dataclasses.dataclass
class Accuracy:
    examples: int = 0
    correct: int = 0  # lowest summed loss
    correct_norm: int = 0  # lowest loss per token

    def add(self, label: int, sums: list[float], counts: list[int]) -> None:
        means = [s / c for s, c in zip(sums, counts)]
        self.examples += 1
        self.correct += int(min(range(len(sums)), key=sums.__getitem__) == label)
        self.correct_norm += int(min(range(len(means)), key=means.__getitem__) == label)

    @staticmethod
    def rate(correct: int, n: int) -> tuple[float, float]:
        """The accuracy and its standard error, sqrt(p (1 - p) / n)."""
        p = correct / n
        return p, math.sqrt(p * (1 - p) / n)

    def summary(self) -> str:
        (norm, norm_se), (acc, acc_se) = (self.rate(c, self.examples) for c in (self.correct_norm, self.correct))
        note = "" if self.examples == VAL_EXAMPLES else f" (not the standard {VAL_EXAMPLES:,}-example set)"
        return (f"hellaswag acc_norm {norm:.4f} ± {norm_se:.4f} ({self.correct_norm:,}/{self.examples:,}), acc "
                f"{acc:.4f} ± {acc_se:.4f} ({self.correct:,}/{self.examples:,}){note}")


def evaluate(model: tg.GPT, window_blocks: int, examples: list[Example], encode, device: torch.device,
             batch_tokens: int = 8192, quiet: bool = False) -> Accuracy:
    """The accuracy over the examples, batch by batch, with a progress bar over the examples."""
    from tqdm import tqdm

    cands = candidates(examples, encode)
    bounds = [0]  # example e's endings are candidates bounds[e]..bounds[e + 1] - 1
    for ex in examples:
        bounds.append(bounds[-1] + len(ex.endings))
    aligned = aligned_starts(model, window_blocks, max(len(c.tokens()) for c in cands))
    sums, counts = torch.zeros(len(cands)), torch.zeros(len(cands), dtype=torch.long)
    acc = Accuracy()
    with tqdm(total=len(examples), unit="example", desc="hellaswag", disable=quiet, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch in pack(cands, batch_tokens, aligned):
            index = torch.tensor([i for i, _ in batch])
            sums[index], counts[index] = score_batch(model, window_blocks, cands, batch, device)
            scored, before = batch[-1][0] + 1, acc.examples  # packed in order: every candidate before is scored
            while acc.examples < len(examples) and bounds[acc.examples + 1] <= scored:
                e = acc.examples
                acc.add(examples[e].label, sums[bounds[e]:bounds[e + 1]].tolist(),
                        counts[bounds[e]:bounds[e + 1]].tolist())
            if acc.examples > before:
                bar.set_postfix(acc_norm=f"{acc.correct_norm / acc.examples:.4f}", refresh=False)
                bar.update(acc.examples - before)
    return acc


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(
        prog="eval_hellaswag.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HellaSwag validation accuracy (completion style, length-normalised) of a train_gpt.py "
                    "checkpoint.",
        epilog="GPT-2 small (124M) scores acc_norm 0.2955 this way (karpathy/build-nanogpt, hellaswag.py).\n"
               f"${URL_ENV} replaces the download address ({VAL_URL}).")
    cli.add_checkpoint_flags(p)  # chosen as generate.py chooses it
    p.add_argument("--data-dir", default=os.environ.get(DIR_ENV) or "data/hellaswag", metavar="DIR",
                   help=f"where {FILE_NAME} is kept, downloaded on first use (default: ${DIR_ENV}, else "
                        "data/hellaswag)")
    p.add_argument("--device", metavar="DEVICE", help="cuda, cuda:N or cpu (default: cuda when there is a GPU)")
    p.add_argument("--batch-tokens", type=int, default=8192, metavar="N",
                   help="tokens per forward, the endings of many examples packed together (default: 8192)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="evaluate the first N examples only (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C or SIGTERM stops it at once with one line (exit 130 or 143); a download under way leaves no file (an
    atomic write's temporary file goes as the stop passes through it)."""
    return stopping.stopping_at_once("eval_hellaswag.py", "while evaluating", "nothing was written (run it again to "
                                "evaluate)", lambda: score(build_arg_parser().parse_args(argv)))


def score(args: argparse.Namespace) -> int:
    try:
        if args.batch_tokens < tg.FLEX_BLOCK_SIZE:
            raise EvalError(f"--batch-tokens must be {tg.FLEX_BLOCK_SIZE} or more, got {args.batch_tokens}")
        if args.limit < 0:
            raise EvalError(f"--limit must be 0 or more, got {args.limit}")
        device = devices.resolve_device(args.device, train=False)
        encoding = gpt2_tokenizer()[0]
        loaded = tg.load_model(args.checkpoint or "auto", device, args.checkpoint_dir, args.run)
        examples = read_examples(validation_file(Path(args.data_dir), args.quiet))
    except (EvalError, errors.ConfigError, errors.CheckpointError, TokenizerUnavailable) as e:
        print(f"eval_hellaswag.py: error: {e}", file=sys.stderr)
        return 2
    examples = examples[:args.limit] if args.limit else examples
    print(f"eval_hellaswag.py: {loaded.path} (run {loaded.run_id}, step {loaded.step}) on {device}, "
          f"{len(examples):,} examples", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        acc = evaluate(loaded.model, loaded.window_blocks, examples, encoding.encode_ordinary, device,
                       args.batch_tokens, args.quiet)
    except EvalError as e:
        print(f"eval_hellaswag.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{acc.summary()}; {loaded.path} step {loaded.step}, {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
