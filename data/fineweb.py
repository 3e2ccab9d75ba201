"""Download the speedrun's pre-tokenised FineWeb shards from the Hugging Face Hub.

    python data/cached_fineweb10B.py [N] [--data-dir DIR] [--retries K] [--quiet]
    python data/cached_fineweb100B.py [N] ...
    python data/cached_finewebedu10B.py [N] ...

Each data set is a Hub *dataset* repo of shards in the speedrun format (data/shards.py): one validation shard
<corpus>_val_000000.bin and train shards <corpus>_train_000001.bin, ... of 100M GPT-2 tokens (about 200 MB) each.
This module is the one implementation behind the three scripts: they only pass their data set's name to main().

All network access goes through huggingface_hub.hf_hub_download, so HF_ENDPOINT (a mirror), HF_TOKEN (a login),
HF_HOME, HF_HUB_OFFLINE and the timeouts HF_HUB_ETAG_TIMEOUT (the lookup of each file) and HF_HUB_DOWNLOAD_TIMEOUT
(each wait for data) work as they do for any Hub download. On top of it this module:
  * skips shards that are already complete on disk (header and size checked) without touching the network, so a
    second run costs nothing and works offline;
  * deletes a present but incomplete or corrupt shard and fetches it again;
  * checks every downloaded file the same way before counting it (hf_hub_download writes to a temporary file and
    renames it, so an interrupted transfer never leaves a half-written file under the final name);
  * retries transient failures (connection errors, timeouts, HTTP 5xx and 429, truncated transfers) with
    exponential back-off, but reports a missing shard (404), a refused repository (401/403) or a redirect loop at
    once. These are the only retries after a request that got no answer: huggingface_hub's own (the lookup again
    with a fixed 60 s timeout, the download resent up to 5 times) are turned off, so a server that never answers
    costs an attempt one timeout. A transfer that breaks off midway is still resumed by huggingface_hub;
  * draws its bars with data/progress.py: tqdm's bar on a terminal, whole lines (no carriage returns) in a log;
  * turns every expected failure into one DownloadError line that names the file, the repository, the endpoint and
    what to do next.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data.progress import is_terminal, progress_bar, tqdm_class
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the data directory {out} ({e.strerror}); choose another with "
                            "--data-dir") from None
    _remove_stale_partials(out)

    # One shard at a time, in order: the bar counts shards (those already there included), not bytes.
    bar = progress_bar(total=len(paths), initial=len(paths) - len(missing), unit="shard", desc=dataset,
                       dynamic_ncols=True, disable=quiet)
    file_bar = _file_bar_class(quiet)  # huggingface_hub's bar for each file
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
            got = _attempt(hf_hub_download, spec, path, endpoint, file_bar)
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


def _attempt(hf_hub_download, spec: Dataset, path: Path, endpoint: str, file_bar) -> Path:
    """One hf_hub_download of a shard, without the retries huggingface_hub would add on its own after a request
    that got no answer: _fetch's are the only ones, so a server that never answers costs an attempt one timeout."""
    # force_download: the shard is known to be absent (or was deleted as damaged), and it stops huggingface_hub from
    # repeating a failed lookup with a fixed 60 s timeout and 5 back-off retries, which ignore HF_HUB_ETAG_TIMEOUT.
    # (It also skips the copy from huggingface_hub's own cache in HF_HOME, where these shards are not put.)
    with _no_resend_after_silence():
        return Path(hf_hub_download(repo_id=spec.repo_id, filename=path.name, repo_type="dataset",
                                    local_dir=path.parent, endpoint=endpoint, force_download=True,
                                    tqdm_class=file_bar))


class _NoAnswer(RuntimeError):
    """Raised by _SilenceGuard in place of a request that huggingface_hub sends again after it got no answer."""


class _SilenceGuard:
    """Event hooks for huggingface_hub's HTTP client during one attempt: a request that got no answer (it timed out or
    could not connect) is not sent again. huggingface_hub would resend a GET up to 5 times (its resume loop, one
    HF_HUB_DOWNLOAD_TIMEOUT and 1 s each); here the attempt fails instead and _fetch's retries take over. A transfer
    that was answered and then broke off is still resumed by huggingface_hub. The client is shared: requests from
    other threads are left alone."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.sent: set[tuple[str, str]] = set()
        self.answered: set[tuple[str, str]] = set()

    def on_request(self, request) -> None:
        if threading.get_ident() != self.thread:
            return
        key = (request.method, str(request.url))
        if key in self.sent - self.answered:
            raise _NoAnswer(f"no answer from {request.url.host} to the {request.method} request within "
                            f"{_timeout_var(request.method)}, and huggingface_hub was about to send it again")
        self.sent.add(key)

    def on_response(self, response) -> None:
        if threading.get_ident() == self.thread:
            self.answered.add((response.request.method, str(response.request.url)))


@contextlib.contextmanager
def _no_resend_after_silence():
    """_SilenceGuard's hooks on huggingface_hub's shared HTTP client, for the duration of the block."""
    from huggingface_hub import get_session

    guard, hooks = _SilenceGuard(), get_session().event_hooks  # the client's own dict of hook lists
    hooks["request"].append(guard.on_request)
    hooks["response"].append(guard.on_response)
    try:
        yield
    finally:
        for event, hook in (("request", guard.on_request), ("response", guard.on_response)):
            if hook in hooks[event]:
                hooks[event].remove(hook)


_TRANSIENT = {"unreachable", "network", "timeout", "http-transient", "truncated", "bad-shard"}


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of an exception out of hf_hub_download; kind "" when it is not one this module expects.
    huggingface_hub wraps the real cause (e.g. a ValueError from a ConnectError), so the whole __cause__/__context__
    chain is looked at, outermost first."""
    from huggingface_hub import errors as hf_errors

    connect_errors, timeouts, transport_errors, bad_url_errors, redirect_errors = _http_client_errors()
    chain = _exception_chain(exc)
    for e in chain:
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return "offline", str(e)
    for e in chain:
        if isinstance(e, (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError)):
            return "denied", _http_detail(e)
        if isinstance(e, (hf_errors.RemoteEntryNotFoundError, hf_errors.RevisionNotFoundError)):
            return "missing", _http_detail(e)
        if isinstance(e, hf_errors.HfHubHTTPError) and getattr(e, "response", None) is not None:
            return _http_status_kind(e.response.status_code), _http_detail(e)
        if isinstance(e, hf_errors.FileMetadataError):
            return "not-hub", str(e)
        if isinstance(e, bad_url_errors):
            return "bad-url", f"{type(e).__name__}: {e}"
        if isinstance(e, redirect_errors):
            return "redirects", f"{type(e).__name__}: {e}{_where(e)}"
        if isinstance(e, connect_errors) or isinstance(e, (ConnectionRefusedError, ConnectionAbortedError)):
            return "unreachable", f"{type(e).__name__}: {e}{_where(e)}"
        if isinstance(e, timeouts):
            return "timeout", _timeout_detail(e)
        if isinstance(e, transport_errors) or isinstance(e, (ConnectionError, TimeoutError)):
            return "network", f"{type(e).__name__}: {e}{_where(e)}"
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return "truncated", "the transfer ended early (fewer bytes than announced)"
    if isinstance(exc, _NoAnswer):  # raised outside the handling of the request's own error
        return "timeout", str(exc)
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):  # no cause given: huggingface_hub found no connection
        return "unreachable", _short(str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return "local", f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return "", ""


def _http_client_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """The HTTP client's exception types, sorted for _classify: (cannot connect, no answer in time, other transport
    failures, bad URL, redirect loop)."""
    try:
        import httpx2 as h
    except ImportError:  # another huggingface_hub release, on another HTTP client: fall back to the builtins
        return (ConnectionError,), (), (TimeoutError,), (), ()
    return ((h.ConnectError, h.ConnectTimeout, h.ProxyError), (h.TimeoutException,), (h.TransportError,),
            (h.UnsupportedProtocol, h.InvalidURL), (h.TooManyRedirects,))


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """exc and everything it was raised from or while handling, outermost first, each once."""
    chain, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        todo += [e.__cause__, e.__context__]
    return chain


def _http_status_kind(status: int) -> str:
    if status == 404:
        return "missing"
    if status in (401, 403):
        return "denied"
    return "http-transient" if status >= 500 or status in (408, 429) else "http"


def _timeout_detail(e: BaseException) -> str:
    """Which host did not answer which request, within how long, and which variable sets that."""
    try:
        request = e.request  # httpx raises RuntimeError when the error has no request
        seconds = request.extensions["timeout"]["read"]
    except Exception:
        return f"{type(e).__name__}: {e}{_where(e)}"
    return (f"no answer from {request.url.host} to the {request.method} request within {seconds:g} s "
            f"({_timeout_var(request.method)})")


def _timeout_var(method: str) -> str:
    """The variable with huggingface_hub's timeout for a request: the lookup (HEAD) or the download."""
    return "HF_HUB_ETAG_TIMEOUT" if method == "HEAD" else "HF_HUB_DOWNLOAD_TIMEOUT"


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
    if kind == "redirects":
        return (f"the download of {name} from {endpoint} went round a redirect loop ({_short(detail).rstrip('.')}). "
                "HF_ENDPOINT, the mirror behind it or a proxy is misconfigured: check them, or copy the shards into "
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
    if kind == "timeout":
        return (f"no answer while downloading {name} from {repo} on {endpoint} ({tries}; last: {_short(detail)}). "
                "Check HF_ENDPOINT and any proxy, raise that timeout (in seconds) if the link is just slow, or copy "
                f"the shards into {path.parent} by hand.")
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


def _file_bar_class(quiet: bool):
    """The tqdm class for huggingface_hub's bar of each file (it takes a class, not arguments): one that never shows
    when quiet or when HF_HUB_DISABLE_PROGRESS_BARS is set (huggingface_hub honours it only for its own class), else
    data/progress.py's choice for stderr, so that in a log this bar writes whole lines too."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from tqdm import tqdm  # a dependency of huggingface_hub

    if quiet or are_progress_bars_disabled():
        return _with_arguments(tqdm, disable=True)
    if is_terminal(sys.stderr):
        return tqdm_class()
    # A log has no bar positions: left to tqdm, this bar would sit below the shard bar (position 1) and move the
    # cursor back up (ESC [A) after each of its lines.
    return _with_arguments(tqdm_class(), position=0)


def _with_arguments(bar_class, **fixed):
    """bar_class, a tqdm class, with some of its arguments fixed."""
    class Bar(bar_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **fixed})

    return Bar


def build_arg_parser(dataset: str) -> argparse.ArgumentParser:
    spec = _spec(dataset)
    default_n = min(shards_needed(SPEEDRUN_STEPS, SPEEDRUN_BATCH_TOKENS), spec.train_shards)
    count = f"{spec.train_shards}" if spec.exact else f"about {spec.train_shards}"
    parser = argparse.ArgumentParser(
        prog=f"cached_{dataset}.py", allow_abbrev=False,  # --retrie is a mistake, not --retries
        description=f"Download {dataset} ({spec.repo_id} on the Hugging Face Hub, {count} train shards of 100M "
                    f"GPT-2 tokens, about 200 MB each) into a data directory: the validation shard "
                    f"{spec.val_name()} and train shards {spec.train_name(1)} .. N. Shards already complete there "
                    "are kept without network access; incomplete ones are fetched again.",
        epilog="HF_ENDPOINT (a mirror), HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and the timeouts in seconds "
               "HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT (default 10 each) are honoured as by huggingface_hub. "
               "Exit status: 0 done, 1 download failed, 2 bad arguments.")
    parser.add_argument("num_train_shards", nargs="?", type=int, default=default_n, metavar="N",
                        help=f"train shards to fetch (default: {default_n}, what the speedrun preset reads: "
                             f"{SPEEDRUN_STEPS} steps x {SPEEDRUN_BATCH_TOKENS:,} tokens + 10%%, in shards of "
                             "100M tokens)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"where the shards go (default: data/{dataset} in the repository)")
    parser.add_argument("--retries", type=int, default=5, metavar="K",
                        help="retries per shard after a transient failure, with back-off from 1 s doubling "
                             "(default: %(default)s; 0 = try once). An attempt ends when a server sends nothing for "
                             "HF_HUB_ETAG_TIMEOUT (the lookup) or HF_HUB_DOWNLOAD_TIMEOUT (the transfer) seconds")
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
