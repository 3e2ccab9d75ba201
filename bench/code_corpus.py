"""Collect the Python source of this interpreter's installation as JSONL, for a larger real-text corpus than the
built-in one on machines without FineWeb (the standard library first, then site-packages).

    python bench/code_corpus.py --out /tmp/code.jsonl --max-mb 500
    python data/prepare.py /tmp/code.jsonl --out-dir data/code --name code --val-tokens 1048576

One document per .py file, in sorted path order (deterministic for a given installation). Files that are not UTF-8,
are empty, or are larger than --max-file-mb (generated tables) are left out and counted. Stops once --max-mb of
text is collected. The JSONL is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def python_files(root: Path, skip: list[Path]):
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                             and (here / d).resolve() not in skip)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield here / name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSONL file to write ({\"text\": ...} per line)")
    p.add_argument("--max-mb", type=float, default=500.0, help="stop after this much text (MB of UTF-8)")
    p.add_argument("--max-file-mb", type=float, default=2.0, help="leave out larger files")
    p.add_argument("roots", nargs="*", help="directories to read (default: stdlib, then site-packages)")
    args = p.parse_args(argv)
    roots = [Path(r).resolve() for r in args.roots] or source_roots()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    total, kept, skipped = 0, 0, 0
    limit, file_limit = int(args.max_mb * 1e6), int(args.max_file_mb * 1e6)
    with open(tmp, "w", encoding="utf-8") as f:
        for i, root in enumerate(roots):
            for path in python_files(root, skip=roots[i + 1:]):
                try:
                    size = path.stat().st_size
                    if size == 0 or size > file_limit:
                        skipped += 1
                        continue
                    text = path.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    skipped += 1
                    continue
                f.write(json.dumps({"text": text}) + "\n")
                kept += 1
                total += len(text.encode("utf-8"))
                if total >= limit:
                    break
            if total >= limit:
                break
    os.replace(tmp, out)
    print(f"{kept} files, {total / 1e6:.1f} MB of Python source from {', '.join(map(str, roots))} "
          f"({skipped} left out: empty, too large or not UTF-8) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
