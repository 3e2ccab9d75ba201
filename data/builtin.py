"""A built-in corpus that every machine has: the Python standard library's own sources, as GPT-2 token shards.

    python data/builtin.py [--out-dir data/builtin] [--max-tokens 4000000] [--force]

train_gpt.py --preset tiny builds it on first use. No network is needed (the tokenizer falls back to an offline
vocabulary, see data/tokenizer.py). The file order is a fixed shuffle of the sorted paths, so the same Python
installation always gives the same shards; the first val_tokens tokens go to builtin_val_000000.bin, the rest to
builtin_train_000001.bin, ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shards import atomic_write, shard_name, write_shard  # noqa: E402
from data.tokenizer import EOT_ID, gpt2_tokenizer  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent / "builtin"
PREFIX = "builtin"  # the shards' names: builtin_val_000000.bin, builtin_train_000001.bin, ...
MAX_TOKENS = 4_000_000
VAL_TOKENS = 100_000
SHARD_TOKENS = 2_000_000
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (no tests, no third-party packages) in a fixed pseudo-random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts))
    random.Random(1234).shuffle(files)
    return files


def build(out_dir: str | Path = DEFAULT_DIR, max_tokens: int = MAX_TOKENS, val_tokens: int = VAL_TOKENS,
          shard_tokens: int = SHARD_TOKENS, quiet: bool = False) -> list[Path]:
    """Tokenise the sources into shards; returns the files written. Each shard is written atomically, and the
    manifest last, so an interrupted build is redone rather than half-used."""
    out = Path(out_dir)
    enc, source = gpt2_tokenizer()
    files = stdlib_sources()
    if not files:
        raise RuntimeError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")
    tokens: list[int] = []
    used = 0
    progress = _progress(max_tokens, quiet)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        doc = [EOT_ID] + enc.encode_ordinary(text)
        tokens.extend(doc)
        used += 1
        progress(len(doc))
        if len(tokens) >= max_tokens:
            break
    progress(None)
    tokens = tokens[:max_tokens]
    if len(tokens) < val_tokens + 2 * 1024:
        raise RuntimeError(f"the standard library gave only {len(tokens)} tokens; too few for a corpus")
    written = [out / shard_name(PREFIX, "val", 0)]
    write_shard(written[0], tokens[:val_tokens])
    rest = tokens[val_tokens:]
    for i in range(0, len(rest), shard_tokens):
        written.append(out / shard_name(PREFIX, "train", i // shard_tokens + 1))
        write_shard(written[-1], rest[i:i + shard_tokens])
    manifest = {"source": "python standard library", "python": sys.version.split()[0], "files": used,
                "tokens": len(tokens), "val_tokens": val_tokens, "tokenizer": source,
                "shards": [p.name for p in written]}
    # last, and atomically: its presence says the shards are complete
    atomic_write(out / "manifest.json", lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))
    if not quiet:
        print(f"built-in corpus: {len(tokens):,} tokens from {used} standard-library files into {out} "
              f"(tokenizer: {source})", flush=True)
    return written


def is_built(out_dir: str | Path = DEFAULT_DIR) -> bool:
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all((out / name).is_file() for name in manifest.get("shards", []))


def _progress(total: int, quiet: bool):
    """A tqdm bar when tqdm is there, else nothing: the tiny preset needs no more than torch, numpy and tiktoken."""
    bar = None
    if not quiet:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="tok", unit_scale=True, desc="tokenising stdlib", leave=False)
        except ImportError:
            bar = None

    def update(n):
        if bar is None:
            return
        if n is None:
            bar.close()
        else:
            bar.update(min(n, bar.total - bar.n))
    return update


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out-dir", default=str(DEFAULT_DIR), help="where the shards go (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="corpus size cap (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the corpus is there")
    args = ap.parse_args(argv)
    if args.force or not is_built(args.out_dir):
        build(args.out_dir, max_tokens=args.max_tokens)
    else:
        print(f"built-in corpus already in {args.out_dir} (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
