"""Download the speedrun's pre-tokenised FineWeb shards from the Hugging Face Hub.

    python data/cached_fineweb10B.py [N] [--data-dir DIR] [--retries K] [--quiet]
    python data/cached_fineweb100B.py [N] ...
    python data/cached_finewebedu10B.py [N] ...

Each data set is a Hub *dataset* repo of shards in the speedrun format (data/shards.py): one validation shard
<corpus>_val_000000.bin and train shards <corpus>_train_000001.bin, ... of 100M GPT-2 tokens (about 200 MB) each.
This module is the one implementation behind the three scripts: they only pass their data set's name to main().

All network access goes through huggingface_hub.hf_hub_download, so HF_ENDPOINT (a mirror), HF_TOKEN (a login),
HF_HOME (its cache) and HF_HUB_OFFLINE work as they do for any Hub download. On top of it this module:
  * skips shards that are already complete on disk (header and size checked) without touching the network, so a
    second run costs nothing and works offline;
  * deletes a present but incomplete or corrupt shard and fetches it again;
  * checks every downloaded file the same way before counting it (hf_hub_download writes to a temporary file and
    renames it, so an interrupted transfer never leaves a half-written file under the final name);
  * retries transient failures (connection errors, timeouts, HTTP 5xx and 429, truncated transfers) with
    exponential back-off, but reports a missing shard (404) or a refused repository (401/403) at once;
  * turns every expected failure into one DownloadError line that names the file, the repository, the endpoint and
    what to do next.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data.shards import DataError, read_shard_header, shard_glob, shard_name

DATA_ROOT = Path(__file__).resolve().parent
TOKENS_PER_SHARD = 100_000_000
# The speedrun preset of train_gpt.py (num_iterations, seqs_per_step x train_seq_len). Kept here as numbers so that
# --help does not have to import torch; tests/test_download.py checks that they match train_gpt.Hyperparameters().
SPEEDRUN_STEPS = 1695
SPEEDRUN_BATCH_TOKENS = 8 * 48 * 1024
BACKOFF_FIRST_S = 1.0  # wait before the first retry; doubled for each further one ...
BACKOFF_MAX_S = 60.0  # ... up to this
STALE_PARTIAL_S = 600  # a huggingface_hub temporary file untouched this long belongs to a download that died


@dataclass(frozen=True)
class Dataset:
    """Where a data set lives on the Hub and on disk."""

    repo_id: str  # Hugging Face dataset repo
    corpus: str  # the shards' prefix in shard_name: <corpus>_val_000000.bin, <corpus>_train_NNNNNN.bin
    train_shards: int  # train shards known to exist
    exact: bool  # whether train_shards is the exact count (else asking for more is left to the Hub's 404)

    def val_name(self) -> str:
        return shard_name(self.corpus, "val", 0)

    def train_name(self, index: int) -> str:
        return shard_name(self.corpus, "train", index)


DATASETS: dict[str, Dataset] = {
    "fineweb10B": Dataset("kjj0/fineweb10B-gpt2", "fineweb", 103, exact=True),
    "fineweb100B": Dataset("kjj0/fineweb100B-gpt2", "fineweb", 1030, exact=False),
    "finewebedu10B": Dataset("kjj0/finewebedu10B-gpt2", "finewebedu", 99, exact=False),
}


def default_dir(dataset: str) -> Path:
    """data/<name> under the repository root: train_gpt.py's default --data-dir for fineweb10B, when run there."""
    return DATA_ROOT / dataset


class DownloadError(RuntimeError):
    """A shard could not be had; the message names it, the repository or endpoint, and what to do next."""


def shards_needed(num_iterations: int, global_batch_tokens: int, tokens_per_shard: int = TOKENS_PER_SHARD,
                  margin: float = 0.1) -> int:
    """Train shards a run of num_iterations steps of global_batch_tokens tokens reads, plus a margin for the tokens
    that BOS alignment skips: ceil(steps x batch x (1 + margin) / tokens_per_shard), at least 1. Exact rational
    arithmetic, so a run that needs exactly k shards is not rounded up to k + 1 by a float error. The caller caps the
    result to the data set's number of shards."""
    for name, value in (("num_iterations", num_iterations), ("global_batch_tokens", global_batch_tokens),
                        ("tokens_per_shard", tokens_per_shard)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    tokens = Fraction(int(num_iterations) * int(global_batch_tokens)) * (1 + Fraction(str(margin)))
    return max(1, math.ceil(tokens / int(tokens_per_shard)))


def shard_names(dataset: str, num_train_shards: int) -> list[str]:
    """The validation shard, then train shards 1..num_train_shards."""
    spec = _spec(dataset)
    return [spec.val_name()] + [spec.train_name(i) for i in range(1, num_train_shards + 1)]


def hub_endpoint() -> str:
    """The endpoint downloads go to: HF_ENDPOINT as it is set now, else huggingface_hub's own setting.
    huggingface_hub reads HF_ENDPOINT once, when it is imported; reading it again here (and passing it on
    explicitly) makes a value set later in the same process count too."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline_mode() -> str | None:
    """The variable that puts huggingface_hub in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), as set now
    or as huggingface_hub read it at import; None when downloads are allowed."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE" if constants.is_offline_mode() else None


def download(dataset: str, num_train_shards: int, data_dir: str | Path | None = None, retries: int = 5,
             quiet: bool = False) -> list[Path]:
    """Make sure the validation shard and train shards 1..num_train_shards of `dataset` are complete in data_dir
    (default data/<dataset>); return their paths, validation first. Each missing shard is tried 1 + retries times.
    Raises DownloadError (one line: which file, why, what to do) when a shard cannot be had, ValueError for bad
    arguments."""
    spec = _spec(dataset)
    _check_arguments(dataset, spec, num_train_shards, retries)
    out = Path(data_dir) if data_dir is not None else default_dir(dataset)
    paths = [out / name for name in shard_names(dataset, num_train_shards)]

    # What is on disk decides what to fetch; when nothing is missing, the network is never touched.
    missing = _missing_shards(paths, quiet)
    if not missing:
        _say(quiet, f"{dataset}: all {len(paths)} shards already in {out}" + _train_hint(spec, out))
        return paths

    # Set-up shared by every shard: a bad endpoint, offline mode, a missing package or an unwritable directory
    # fails here, once, before the first request.
    endpoint = hub_endpoint()
    _check_endpoint(endpoint)  # before huggingface_hub is imported: a malformed HF_ENDPOINT breaks its import
    offline_var = offline_mode()
    if offline_var:
        raise DownloadError(
            f"{offline_var} is set, so nothing can be downloaded, and {len(missing)} of the {len(paths)} {dataset} "
            f"shards are not in {out} (first: {missing[0].name}). Unset {offline_var} to download them from "
            f"{endpoint}, or copy the shards into {out} by hand.")
    hf_hub_download = _hf_hub_download()
    from tqdm import tqdm  # a dependency of huggingface_hub

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the data directory {out} ({e.strerror}); choose another with "
                            "--data-dir") from None
    _remove_stale_partials(out)

    # One shard at a time, in order: the bar counts shards (those already there included), not bytes.
    bar = tqdm(total=len(paths), initial=len(paths) - len(missing), unit="shard", desc=dataset, dynamic_ncols=True,
               disable=quiet)
    file_bar = _silent_bar(tqdm) if quiet else None  # huggingface_hub's bar for each file
    try:
        for path in missing:
            bar.set_postfix_str(path.name)
            _fetch(hf_hub_download, spec, path, endpoint, retries, quiet, bar, file_bar)
            bar.update(1)
    finally:
        bar.close()
    _say(quiet, f"{dataset}: {len(paths)} shards in {out} ({len(missing)} downloaded, "
                f"{len(paths) - len(missing)} already there)" + _train_hint(spec, out))
    return paths


def _check_arguments(dataset: str, spec: Dataset, num_train_shards, retries) -> None:
    """download()'s own checks, for callers other than main() (which reports the same mistakes as usage errors)."""
    if int(num_train_shards) != num_train_shards or num_train_shards < 1:
        raise ValueError(f"the number of train shards must be at least 1, got {num_train_shards!r}")
    if spec.exact and num_train_shards > spec.train_shards:
        raise ValueError(f"{dataset} has {spec.train_shards} train shards; {num_train_shards} were asked for")
    if int(retries) != retries or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")


def _missing_shards(paths: list[Path], quiet: bool) -> list[Path]:
    """The shards of paths still to fetch, in order: those absent, and those present but incomplete or corrupt
    (header and size checked), which are deleted here: a shard's final name then holds a complete shard or
    nothing, whatever becomes of the download."""
    missing = []
    for path in paths:
        if not path.exists():
            missing.append(path)
            continue
        try:
            read_shard_header(path)
        except DataError as e:
            if not quiet:
                print(f"{path.name}: incomplete or corrupt ({_shard_problem(e, path)}); fetching it again",
                      file=sys.stderr, flush=True)
            _remove(path)
            missing.append(path)
    return missing


def _train_hint(spec: Dataset, out: Path) -> str:
    """How to point train_gpt.py at the shards, when its defaults (fineweb_*.bin in data/fineweb10B under the
    current directory) do not find them."""
    flags = []
    if out.resolve() != Path("data/fineweb10B").resolve():
        flags.append(f"--data-dir {shlex.quote(str(out))}")
    if spec.corpus != "fineweb":
        flags.append(f"--train-files '{shard_glob(spec.corpus, 'train')}' --val-files "
                     f"'{shard_glob(spec.corpus, 'val')}'")
    return f"; train on them with: python train_gpt.py {' '.join(flags)}" if flags else ""


def _check_endpoint(endpoint: str) -> None:
    """A malformed HF_ENDPOINT would otherwise fail deep inside the HTTP client, once per shard and attempt."""
    try:
        parts = urllib.parse.urlsplit(endpoint)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise DownloadError(f"HF_ENDPOINT={endpoint!r} is not an http:// or https:// URL: set it to the Hub "
                            "(https://huggingface.co) or a mirror's address, or unset it")


def _fetch(hf_hub_download, spec: Dataset, path: Path, endpoint: str, retries: int, quiet: bool, bar,
           file_bar) -> None:
    """One shard, with retries: hf_hub_download, then the same header and size check as a local file."""
    attempts = retries + 1
    last_kind, last_detail = "", ""
    for attempt in range(1, attempts + 1):
        try:
            got = Path(hf_hub_download(repo_id=spec.repo_id, filename=path.name, repo_type="dataset",
                                       local_dir=path.parent, endpoint=endpoint,
                                       tqdm_class=file_bar))
            try:
                read_shard_header(got)
                return
            except DataError as e:
                _remove(got)  # never leave a file under the final name that a later run would take as good
                last_kind, last_detail = "bad-shard", _shard_problem(e, got)
        except Exception as e:  # sorted by _classify; anything it does not recognise is re-raised
            last_kind, last_detail = _classify(e)
            if last_kind == "":
                raise
            if last_kind not in _TRANSIENT:
                raise DownloadError(_fatal_message(last_kind, last_detail, spec, path, endpoint)) from None
        if attempt < attempts:
            wait = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
            if not quiet:
                bar.write(f"{path.name}: {_short(last_detail)}; retrying in {wait:g} s "
                          f"(attempt {attempt + 1} of {attempts})", file=sys.stderr)
            time.sleep(wait)
    raise DownloadError(_gave_up_message(last_kind, last_detail, spec, path, endpoint, attempts))


_TRANSIENT = {"unreachable", "network", "http-transient", "truncated", "bad-shard"}


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of an exception out of hf_hub_download; kind "" when it is not one this module expects.
    huggingface_hub wraps the real cause (e.g. LocalEntryNotFoundError from a ConnectError), so the whole
    __cause__/__context__ chain is looked at, outermost first."""
    from huggingface_hub import errors as hf_errors

    try:
        import httpx2
        connect_errors: tuple[type[BaseException], ...] = (httpx2.ConnectError, httpx2.ConnectTimeout,
                                                           httpx2.ProxyError)
        transport_errors: tuple[type[BaseException], ...] = (httpx2.TransportError,)
        bad_url_errors: tuple[type[BaseException], ...] = (httpx2.UnsupportedProtocol, httpx2.InvalidURL)
    except ImportError:  # another huggingface_hub release, on another HTTP client: fall back to the builtins
        connect_errors, transport_errors, bad_url_errors = (ConnectionError,), (TimeoutError,), ()
    chain, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        todo += [e.__cause__, e.__context__]

    for e in chain:
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return "offline", str(e)
    for e in chain:
        if isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError)):
            return "denied", _http_detail(e)
        if isinstance(e, (hf_errors.RemoteEntryNotFoundError, hf_errors.RevisionNotFoundError)):
            return "missing", _http_detail(e)
        if isinstance(e, hf_errors.HfHubHTTPError) and getattr(e, "response", None) is not None:
            status = e.response.status_code
            if status == 404:
                return "missing", _http_detail(e)
            if status in (401, 403):
                return "denied", _http_detail(e)
            if status >= 500 or status in (408, 429):
                return "http-transient", _http_detail(e)
            return "http", _http_detail(e)
        if isinstance(e, hf_errors.FileMetadataError):
            return "not-hub", str(e)
        if isinstance(e, bad_url_errors):
            return "bad-url", f"{type(e).__name__}: {e}"
        if isinstance(e, connect_errors) or isinstance(e, (ConnectionRefusedError, ConnectionAbortedError)):
            return "unreachable", f"{type(e).__name__}: {e}{_where(e)}"
        if isinstance(e, transport_errors) or isinstance(e, (ConnectionError, TimeoutError)):
            return "network", f"{type(e).__name__}: {e}{_where(e)}"
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return "truncated", "the transfer ended early (fewer bytes than announced)"
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):  # no cause given: huggingface_hub found no connection
        return "unreachable", _short(str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return "local", f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return "", ""


def _where(e: BaseException) -> str:
    """The host an HTTP client error was talking to, as " (host NAME)", when the error knows its request: shards
    come from a CDN host, which is not the endpoint."""
    try:
        host = e.request.url.host  # httpx raises RuntimeError when the error has no request
    except Exception:
        return ""
    return f" (host {host})" if host else ""


def _http_detail(e) -> str:
    response = e.response
    code = response.headers.get("X-Error-Code")
    message = response.headers.get("X-Error-Message")
    extra = ", ".join(x for x in (code, message) if x)
    return f"HTTP {response.status_code}" + (f" ({extra})" if extra else "")


def _fatal_message(kind: str, detail: str, spec: Dataset, path: Path, endpoint: str) -> str:
    name, repo = path.name, spec.repo_id
    if kind == "missing":
        return (f"{name} is not in the dataset repo {repo} on {endpoint} ({detail}). The repo may have fewer "
                f"shards than were asked for: ask for fewer, or check the repo on the Hub.")
    if kind == "denied":
        token = "HF_TOKEN is set but was refused" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
        return (f"no access to the dataset repo {repo} on {endpoint} while fetching {name} ({detail}; {token}). "
                "Check the repo name and HF_ENDPOINT; if the repo needs a login, set HF_TOKEN to a token that can "
                "read it.")
    if kind == "offline":
        return (f"cannot download {name}: huggingface_hub is in offline mode (HF_HUB_OFFLINE). Unset it, or copy "
                f"the shards into {path.parent} by hand.")
    if kind == "not-hub":
        return (f"{endpoint} answered the request for {name} but does not look like a Hugging Face Hub (no commit or "
                "ETag header). Check HF_ENDPOINT, a proxy or a captive portal; or copy the shards into "
                f"{path.parent} by hand.")
    if kind == "bad-url":
        return (f"cannot download {name} from {endpoint} ({_short(detail).rstrip('.')}): HF_ENDPOINT must be an "
                "http:// or https:// URL such as https://huggingface.co or a mirror's address.")
    if kind == "local":
        return (f"cannot write {name} into {path.parent}: {detail}. Check the free space and permissions there, or "
                "choose another --data-dir.")
    return f"downloading {name} from {repo} on {endpoint} failed: {_short(detail)}."


def _gave_up_message(kind: str, detail: str, spec: Dataset, path: Path, endpoint: str, attempts: int) -> str:
    name, repo, tries = path.name, spec.repo_id, f"{attempts} attempt{'s' if attempts > 1 else ''}"
    if kind == "unreachable":
        return (f"cannot reach the Hugging Face Hub at {endpoint} to download {name} from {repo} ({tries}; last "
                f"error: {_short(detail)}). Check the network connection (and any proxy), set HF_ENDPOINT to a "
                f"reachable mirror, or copy the shards into {path.parent} by hand.")
    if kind in ("network", "truncated"):
        return (f"the transfer of {name} from {repo} on {endpoint} kept breaking ({tries}; last error: "
                f"{_short(detail)}). Check the network connection and run again (complete shards are kept), set "
                f"HF_ENDPOINT to a mirror, or copy the shards into {path.parent} by hand.")
    if kind == "bad-shard":
        return (f"{name} from {repo} on {endpoint} is not a valid shard after {tries} ({_short(detail)}). The copy "
                f"there may be broken: try another HF_ENDPOINT, or copy the shard into {path.parent} by hand.")
    return (f"downloading {name} from {repo} on {endpoint} failed after {tries} ({_short(detail)}). The Hub may be "
            f"busy or down: try again later, or set HF_ENDPOINT to a mirror.")


def _shard_problem(error: Exception, path: Path) -> str:
    """What read_shard_header's DataError says is wrong with a shard, without the file name and without its advice (to
    delete the file and download it again), which this module follows itself."""
    text = str(error)
    text = text[len(f"{path}: "):] if text.startswith(f"{path}: ") else text
    return text.split("; ")[0]


def _short(text: str, limit: int = 200) -> str:
    """First non-empty line of an error message, cut to a length that fits on one line."""
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _spec(dataset: str) -> Dataset:
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("the huggingface_hub package is missing: pip install -r requirements.txt "
                            "(or copy the shards into the data directory by hand)") from None
    return hf_hub_download


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise DownloadError(f"{path} is incomplete or corrupt and cannot be deleted ({e.strerror}); delete it by "
                            "hand and run again") from None


def _remove_stale_partials(out: Path) -> None:
    """Delete huggingface_hub temporary files (.cache/huggingface/download/*.incomplete) left by a download that was
    killed outright (a normal failure or Ctrl-C removes its own). Each is up to a shard in size and can never be
    reused: huggingface_hub 2.4 gives every attempt a fresh, process-unique temporary name."""
    now = time.time()
    for partial in (out / ".cache" / "huggingface" / "download").glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
        except OSError:
            pass  # gone already, or someone else's: harmless


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def _silent_bar(tqdm):
    """A tqdm class that never shows: huggingface_hub takes a class for its per-file bar, not a flag."""
    class SilentBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return SilentBar


def build_arg_parser(dataset: str) -> argparse.ArgumentParser:
    spec = _spec(dataset)
    default_n = min(shards_needed(SPEEDRUN_STEPS, SPEEDRUN_BATCH_TOKENS), spec.train_shards)
    count = f"{spec.train_shards}" if spec.exact else f"about {spec.train_shards}"
    parser = argparse.ArgumentParser(
        prog=f"cached_{dataset}.py",
        description=f"Download {dataset} ({spec.repo_id} on the Hugging Face Hub, {count} train shards of 100M "
                    f"GPT-2 tokens, about 200 MB each) into a data directory: the validation shard "
                    f"{spec.val_name()} and train shards {spec.train_name(1)} .. N. Shards already complete there "
                    "are kept without network access; incomplete ones are fetched again.",
        epilog="HF_ENDPOINT (a mirror), HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are honoured as by huggingface_hub. "
               "Exit status: 0 done, 1 download failed, 2 bad arguments.")
    parser.add_argument("num_train_shards", nargs="?", type=int, default=default_n, metavar="N",
                        help=f"train shards to fetch (default: {default_n}, what the speedrun preset reads: "
                             f"{SPEEDRUN_STEPS} steps x {SPEEDRUN_BATCH_TOKENS:,} tokens + 10%%, in shards of "
                             "100M tokens)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"where the shards go (default: data/{dataset} in the repository)")
    parser.add_argument("--retries", type=int, default=5, metavar="K",
                        help="retries per shard after a transient failure, with back-off from 1 s doubling "
                             "(default: %(default)s; 0 = try once). An attempt that cannot connect takes about 25 s "
                             "on its own: huggingface_hub retries the lookup itself")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary; errors only")
    return parser


def main(argv: list[str] | None = None, dataset: str = "fineweb10B") -> int:
    """The command line of data/cached_<dataset>.py: 0 when the shards are there, 1 when a download failed,
    2 for bad arguments."""
    parser = build_arg_parser(dataset)
    spec = DATASETS[dataset]
    try:
        args = parser.parse_args(argv)
        if args.num_train_shards < 1:
            parser.error(f"N must be at least 1, got {args.num_train_shards}")
        if spec.exact and args.num_train_shards > spec.train_shards:
            parser.error(f"{dataset} has {spec.train_shards} train shards; N={args.num_train_shards} is too many")
        if args.retries < 0:
            parser.error(f"--retries must be >= 0, got {args.retries}")
    except SystemExit as e:  # argparse has printed the help (0) or the usage and the complaint (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        from huggingface_hub.utils import logging as hf_logging

        # This module reports each retry and the final error in one line; huggingface_hub's own warnings about the
        # same events (several per attempt) would bury them.
        hf_logging.set_verbosity_error()
    except (ImportError, ValueError):  # not installed, or HF_ENDPOINT malformed: download() says which
        pass
    try:
        download(dataset, args.num_train_shards, data_dir=args.data_dir, retries=args.retries, quiet=args.quiet)
    except DownloadError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; complete shards are kept, run again to fetch the rest", file=sys.stderr)
        return 130
    return 0
