"""GPT-2 BPE for data preparation and sampling, with offline fall-backs.

Sources, in order:
  1. tiktoken.get_encoding("gpt2"): downloads its vocabulary on first use, cached in TIKTOKEN_CACHE_DIR afterwards;
  2. a ranks file named by GPT2_BPE_RANKS (tiktoken's format: base64 token and rank per line);
  3. the copy of the same ranks that the openai-whisper package ships (whisper/assets/gpt2.tiktoken), found without
     importing whisper (which would pull in heavy dependencies): `pip install --no-deps openai-whisper`.
All three give the same ids ("Hello world" -> [15496, 995]); <|endoftext|> is 50256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import tempfile
from functools import lru_cache
from pathlib import Path

EOT_ID = 50256
RANKS_ENV = "GPT2_BPE_RANKS"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerUnavailable(RuntimeError):
    pass


def whisper_ranks_file() -> Path | None:
    """openai-whisper's gpt2.tiktoken, located through the import system without importing the package."""
    try:
        spec = importlib.util.find_spec("whisper")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    return path if path.is_file() else None


def encoding_from_ranks(path: str | Path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    if len(ranks) != EOT_ID:
        raise TokenizerUnavailable(f"{path} holds {len(ranks)} ranks; the GPT-2 vocabulary has {EOT_ID}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID})


TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"
TIKTOKEN_GPT2_FILES = (f"https://{TIKTOKEN_HOST}/gpt-2/encodings/main/vocab.bpe",
                       f"https://{TIKTOKEN_HOST}/gpt-2/encodings/main/encoder.json")


def tiktoken_can_load(timeout: float = 3.0) -> bool:
    """True when tiktoken has the gpt2 files in its cache or its host answers quickly. tiktoken fetches without a
    timeout, so on a network that silently drops packets asking it directly would hang."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache and all(os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                     for url in TIKTOKEN_GPT2_FILES):
        return True
    try:
        with socket.create_connection((TIKTOKEN_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """(encoding, source): the GPT-2 tiktoken Encoding and a phrase naming where its vocabulary came from."""
    try:
        import tiktoken
    except ImportError as e:
        raise TokenizerUnavailable("the tiktoken package is missing: pip install tiktoken") from e
    errors = []
    env_path = os.environ.get(RANKS_ENV)
    if env_path:  # an explicit choice wins and never touches the network
        if not Path(env_path).is_file():
            raise TokenizerUnavailable(f"{RANKS_ENV}={env_path} does not name a file")
        return encoding_from_ranks(env_path), f"ranks file {env_path} (${RANKS_ENV})"
    if tiktoken_can_load():
        try:
            return tiktoken.get_encoding("gpt2"), "tiktoken gpt2 (downloaded or cached)"
        except Exception as e:  # blocked host, broken cache
            errors.append(f"tiktoken could not load gpt2 ({type(e).__name__})")
    else:
        errors.append(f"tiktoken's vocabulary is not cached and {TIKTOKEN_HOST} is unreachable")
    path = whisper_ranks_file()
    if path is not None:
        return encoding_from_ranks(path), f"openai-whisper asset {path}"
    raise TokenizerUnavailable(
        "no GPT-2 vocabulary available: " + "; ".join(errors) + ". Either give tiktoken network access once "
        f"(it caches the vocabulary in TIKTOKEN_CACHE_DIR), or point {RANKS_ENV} at a gpt2.tiktoken ranks file, or "
        "install the offline copy: pip install --no-deps -r requirements-vocab.txt")
