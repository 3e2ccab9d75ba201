"""Download FineWeb 10B (kjj0/fineweb10B-gpt2, 103 train shards) as GPT-2 token shards.

    python data/cached_fineweb10B.py [N] [--data-dir DIR] [--retries K] [--quiet]

Everything is done by data/fineweb.py; this file only names the data set, so that each has a script of its own.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import fineweb  # noqa: E402

if __name__ == "__main__":
    sys.exit(fineweb.main(sys.argv[1:], "fineweb10B"))
