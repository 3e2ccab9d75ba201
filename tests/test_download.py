"""data/fineweb.py through the real huggingface_hub download path, against a fake Hub on 127.0.0.1.

The fake speaks the part of the Hub protocol that hf_hub_download (huggingface_hub 2.4) uses for a file in a
dataset repo, as the real Hub does for LFS files:
  HEAD {endpoint}/datasets/{repo}/resolve/main/{file}
      -> 302 to a CDN URL on another origin, with X-Repo-Commit, X-Linked-Etag (sha256) and X-Linked-Size;
         404 + X-Error-Code: EntryNotFound for a missing file; 401 + X-Error-Code: RepoNotFound when access is refused;
  GET {cdn}/blobs/{sha256}  -> 200 with the bytes (and the file's name in Content-Disposition), or 206 +
      Content-Range for "Range: bytes=N-" (resume).
No X-Xet-* headers are sent, so huggingface_hub uses plain HTTP even with hf_xet installed. Faults (HTTP errors,
a transfer cut off midway, a connection dropped after the headers) are queued per file and consumed by content GETs;
a redirect loop can be switched on at either origin; every request is logged with its headers, so the tests can count
them. SilentServer is the other stand-in: it accepts connections and never answers.

huggingface_hub copies HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into module constants when it is imported.
data/fineweb.py reads HF_ENDPOINT and HF_HUB_OFFLINE again at call time, so in-process tests set them with
monkeypatch.setenv; HF_HOME's import-time copies (hub cache, token file) are pointed into tmp_path directly, so no
test sees the developer's own cache or token. The subprocess tests set the real environment variables instead.
time.sleep is recorded rather than slept (huggingface_hub's and fineweb's back-off), which keeps the file fast and
lets the tests check the back-off schedule.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest

import train_gpt
from conftest import ROOT, synthetic_tokens
from data import fineweb

REPO = "kjj0/fineweb10B-gpt2"
VAL, TRAIN1, TRAIN2, TRAIN3 = ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
                               "fineweb_train_000003.bin")
CHUNK = 512  # huggingface_hub's download chunk in these tests (10 MB in real use; see test_cut_transfer_...)
PROG_ERROR = "cached_fineweb10B.py: error: "
REAL_SLEEP = time.sleep


def shard_bytes(tokens) -> bytes:
    """The speedrun shard format written out by hand: 256 int32 header (magic, version, count), uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    return header.tobytes() + np.asarray(tokens).astype("<u2").tobytes()


# ----------------------------------------------------------------------------------------------------------------------
# The fake Hub


@dataclass
class Request:
    role: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case (HTTP header names are case-insensitive)

    @property
    def name(self) -> str:
        """The shard the request is about (for CDN requests, through the blob's sha256)."""
        return self.path.rsplit("/", 1)[-1]


class FakeHub:
    """A Hub origin and a CDN origin (two ThreadingHTTPServers) serving `files` as the dataset repo REPO."""

    def __init__(self, files: dict[str, bytes], repo_id: str = REPO):
        self.repo_id = repo_id
        self.files = dict(files)
        self.commit = hashlib.sha1(b"fake commit").hexdigest()
        self.log: list[Request] = []
        self.faults: dict[str, list[str]] = defaultdict(list)  # file -> faults for its next content GETs
        self.deny = False  # answer every Hub request with 401 RepoNotFound
        self.on_range = None  # called with the file name when a Range request arrives
        self.loop = None  # "hub-self", "hub-cycle" or "cdn-self": redirect every request there round a loop
        self.blob_origin = None  # another origin (a SilentServer) for the Hub's redirects to send downloads to
        self.lock = threading.Lock()
        self.hub = self._serve("hub")
        self.cdn = self._serve("cdn")

    def _serve(self, role: str) -> http.server.ThreadingHTTPServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.fake, server.role = self, role
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_port}"

    @property
    def cdn_url(self) -> str:
        return self.blob_origin or f"http://127.0.0.1:{self.cdn.server_port}"

    def sha(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def requests(self, role: str | None = None, method: str | None = None, name: str | None = None) -> list[Request]:
        with self.lock:
            log = list(self.log)
        if name is not None and role == "cdn":
            name = self.sha(name)
        return [r for r in log if (role is None or r.role == role) and (method is None or r.method == method)
                and (name is None or r.name == name)]

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(with_body=False)

    def do_GET(self) -> None:
        self._handle(with_body=True)

    def _handle(self, with_body: bool) -> None:
        fake: FakeHub = self.server.fake
        path = urllib.parse.urlsplit(self.path).path
        with fake.lock:
            fake.log.append(Request(self.server.role, self.command, path,
                                    {k.lower(): v for k, v in self.headers.items()}))
        if self.server.role == "hub":
            self._resolve(fake, path)
        else:
            self._blob(fake, path, with_body)

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self, fake: FakeHub, path: str) -> None:
        if fake.loop == "hub-self":
            self._reply(302, {"Location": self.path})
            return
        if fake.loop == "hub-cycle":  # between the file's URL and the same with ?hop
            self._reply(302, {"Location": path if "?" in self.path else f"{path}?hop"})
            return
        prefix = f"/datasets/{fake.repo_id}/resolve/main/"
        if fake.deny or not path.startswith(prefix):
            self._reply(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                        b"Repository not found")
            return
        name = urllib.parse.unquote(path[len(prefix):])
        if name not in fake.files:
            self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                              "X-Repo-Commit": fake.commit}, b"Entry not found")
            return
        sha = fake.sha(name)
        self._reply(302, {"Location": f"{fake.cdn_url}/blobs/{sha}", "X-Repo-Commit": fake.commit,
                          "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(fake.files[name])),
                          "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"'})

    def _blob(self, fake: FakeHub, path: str, with_body: bool) -> None:
        by_sha = {fake.sha(n): n for n in fake.files}
        name = by_sha.get(path.rsplit("/", 1)[-1])
        if name is None:
            self._reply(404, {}, b"no such blob")
            return
        if fake.loop == "cdn-self":
            self._reply(302, {"Location": self.path})
            return
        data = fake.files[name]
        fault = None
        if with_body:
            with fake.lock:
                if fake.faults[name]:
                    fault = fake.faults[name].pop(0)
        if fault is not None and fault.isdigit():
            self._reply(int(fault), {}, b"injected error")
            return
        start, status, headers = 0, 200, {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                                          "Content-Disposition": f'inline; filename="{name}";'}
        rng = self.headers.get("Range")
        if rng:
            if fake.on_range is not None:
                fake.on_range(name)
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault is None:
            self._reply(status, headers, body)
            return
        # "cut": the headers promise the whole body, half of it comes, then the connection closes;
        # "drop": the same with nothing after the headers.
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":
            self.wfile.write(body[:cut_point(len(body))])
        self.wfile.flush()
        self.close_connection = True


class SilentServer:
    """Accepts TCP connections on 127.0.0.1, reads nothing, answers nothing, and closes each connection after
    silence_s: a Hub behind a hung proxy or a firewall that swallows the traffic."""

    def __init__(self, silence_s: float):
        self.silence_s = silence_s
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        held: list[tuple[socket.socket, float]] = []
        while not self.done.is_set():
            try:
                held.append((self.sock.accept()[0], time.monotonic()))
                self.accepted += 1
            except TimeoutError:
                pass
            for conn, since in [h for h in held if time.monotonic() - h[1] > self.silence_s]:
                conn.close()
                held.remove((conn, since))
        for conn, _ in held:
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


def cut_point(size: int) -> int:
    """Where a "cut" transfer stops: about half-way, on a download-chunk boundary, so that huggingface_hub has written
    exactly this much to its temporary file when the connection breaks."""
    return max(CHUNK, size // 2 // CHUNK * CHUNK)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def hf_isolated(monkeypatch, tmp_path):
    """No token, no offline flag, no endpoint from the developer's environment; HF_HOME and its import-time copies
    in tmp_path; huggingface_hub's download chunk shrunk so a few-KB shard spans several chunks."""
    home = tmp_path / "hf_home"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list[float]:
    """Every time.sleep in the process (huggingface_hub's and fineweb's back-off), recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


@pytest.fixture
def real_sleep(sleeps, monkeypatch):
    """time.sleep back to normal, for tests that wait on subprocesses (subprocess polls with sleep)."""
    monkeypatch.setattr(time, "sleep", REAL_SLEEP)


@pytest.fixture
def served() -> dict[str, bytes]:
    """A validation shard and two train shards of a few thousand tokens, as the fake Hub serves them."""
    return {VAL: shard_bytes(synthetic_tokens(3000, seed=11)),
            TRAIN1: shard_bytes(synthetic_tokens(5000, seed=12)),
            TRAIN2: shard_bytes(synthetic_tokens(4000, seed=13))}


@pytest.fixture
def hub(served, monkeypatch):
    fake = FakeHub(served)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.close()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data" / "fineweb10B"


def partials(data_dir: Path) -> list[Path]:
    """huggingface_hub's temporary files in a local_dir download."""
    return sorted((data_dir / ".cache" / "huggingface" / "download").glob("*.incomplete"))


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra) -> dict[str, str]:
    """The test's environment for a subprocess, without PYTHONPATH: the scripts must find the repository
    themselves."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------------------------------
# Downloads that work


def test_fresh_download_gets_the_served_bytes_over_the_hub_protocol(hub, served, data_dir):
    paths = fineweb.download("fineweb10B", 2, data_dir=data_dir, quiet=True)
    assert paths == [data_dir / VAL, data_dir / TRAIN1, data_dir / TRAIN2]
    for path in paths:
        assert path.read_bytes() == served[path.name]
        assert train_gpt.read_shard_header(path) == (len(served[path.name]) - 1024) // 2
    for name in served:  # one HEAD on the Hub (answered by a redirect), one plain GET at the CDN
        heads = hub.requests("hub", "HEAD", name)
        assert [h.path for h in heads] == [f"/datasets/{REPO}/resolve/main/{name}"]
        gets = hub.requests("cdn", "GET", name)
        assert len(gets) == 1 and "range" not in gets[0].headers
    assert not hub.requests("hub", "GET")  # the download goes to the redirect target directly
    assert all("authorization" not in r.headers for r in hub.log)  # no token anywhere in this environment
    assert partials(data_dir) == []


def test_complete_shards_are_skipped_without_any_request(hub, served, data_dir, capsys):
    fineweb.download("fineweb10B", 2, data_dir=data_dir, quiet=True)
    hub.log.clear()
    hub.close()  # not even a connection attempt would succeed now
    paths = fineweb.download("fineweb10B", 2, data_dir=data_dir)
    assert hub.log == []
    assert [p.read_bytes() for p in paths] == list(served.values())
    assert "all 3 shards already in" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad magic", "longer"])
def test_corrupt_local_shard_is_replaced(hub, served, data_dir, damage, sleeps):
    fineweb.download("fineweb10B", 2, data_dir=data_dir, quiet=True)
    target = data_dir / TRAIN1
    good = served[TRAIN1]
    bad = {"truncated": good[:len(good) // 2], "empty": b"", "bad magic": b"\0" * 4 + good[4:],
           "longer": good + b"\0\0"}[damage]
    target.write_bytes(bad)
    hub.log.clear()
    fineweb.download("fineweb10B", 2, data_dir=data_dir, quiet=True)
    assert target.read_bytes() == good
    # Deleted before the download: huggingface_hub would otherwise hand back the damaged file as up to date
    # (its metadata still matches), and only the check after the download would catch it, at the cost of a retry.
    assert len(hub.requests("hub", "HEAD", TRAIN1)) == 1 and len(hub.requests("cdn", "GET", TRAIN1)) == 1
    assert sleeps == []
    assert {r.name for r in hub.requests("hub")} == {TRAIN1}  # the good shards were not even looked up


def test_cut_transfer_is_resumed_with_a_range_request_and_never_seen_half_written(hub, served, data_dir):
    """The CDN closes the connection half-way through TRAIN1; huggingface_hub continues from the bytes it has with
    a Range request, in the same hf_hub_download call (retries=0 leaves fineweb no second try of its own). While
    the transfer is broken, nothing exists under the final name. (In real use the chunk is 10 MB, so a resume
    continues from the last whole 10 MB of the 200 MB shard.)"""
    hub.faults[TRAIN1] = ["cut"]
    seen_during_resume = []
    hub.on_range = lambda name: seen_during_resume.append((name, (data_dir / name).exists()))
    fineweb.download("fineweb10B", 1, data_dir=data_dir, retries=0, quiet=True)
    assert (data_dir / TRAIN1).read_bytes() == served[TRAIN1]
    gets = hub.requests("cdn", "GET", TRAIN1)
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == f"bytes={cut_point(len(served[TRAIN1]))}-"
    assert seen_during_resume == [(TRAIN1, False)]
    assert partials(data_dir) == []


def test_interrupted_run_leaves_nothing_half_written_and_the_next_run_completes(hub, served, data_dir):
    """The connection breaks mid-file and every resume attempt fails too: the run gives up with a message naming the
    file, no file appears under its name, the temporary file is gone, and a second run fetches it whole."""
    hub.faults[TRAIN1] = ["cut"] + ["drop"] * 20
    with pytest.raises(fineweb.DownloadError, match=TRAIN1) as failure:
        fineweb.download("fineweb10B", 2, data_dir=data_dir, retries=0, quiet=True)
    assert "kept breaking" in str(failure.value)
    assert (data_dir / VAL).read_bytes() == served[VAL]
    assert not (data_dir / TRAIN1).exists() and not (data_dir / TRAIN2).exists()
    assert partials(data_dir) == []
    assert len(hub.requests("cdn", "GET", TRAIN1)) > 2  # huggingface_hub tried to resume before giving up

    hub.faults.clear()
    hub.log.clear()
    fineweb.download("fineweb10B", 2, data_dir=data_dir, retries=0, quiet=True)
    for name in (VAL, TRAIN1, TRAIN2):
        assert (data_dir / name).read_bytes() == served[name]
    assert {r.name for r in hub.requests("hub")} == {TRAIN1, TRAIN2}
    # huggingface_hub 2.4 resumes only within one call: its temporary file is unique to the attempt and deleted
    # when the attempt fails, so the next run fetches the shard from byte 0.
    assert ["range" in r.headers for r in hub.requests("cdn", "GET", TRAIN1)] == [False]


def test_http_500_once_is_retried_after_a_back_off(hub, served, data_dir, sleeps):
    hub.faults[TRAIN1] = ["500"]
    fineweb.download("fineweb10B", 1, data_dir=data_dir, retries=2, quiet=True)
    assert (data_dir / TRAIN1).read_bytes() == served[TRAIN1]
    assert len(hub.requests("cdn", "GET", TRAIN1)) == 2
    assert sleeps == [fineweb.BACKOFF_FIRST_S]


def test_persistent_503_gives_up_after_exponential_back_off(hub, data_dir, sleeps):
    hub.faults[TRAIN1] = ["503"] * 10
    with pytest.raises(fineweb.DownloadError) as failure:
        fineweb.download("fineweb10B", 1, data_dir=data_dir, retries=3, quiet=True)
    message = str(failure.value)
    assert TRAIN1 in message and REPO in message and "503" in message and "4 attempts" in message
    assert len(hub.requests("cdn", "GET", TRAIN1)) == 4
    assert sleeps == [1.0, 2.0, 4.0]
    assert not (data_dir / TRAIN1).exists() and partials(data_dir) == []


def test_a_served_file_that_is_not_a_shard_is_deleted_and_reported(hub, served, data_dir, sleeps):
    """Bytes that arrive whole (the size the Hub announced) but whose header disagrees with the size: fetched again,
    then reported; never left under the final name."""
    hub.files[TRAIN1] = served[TRAIN1] + b"\0\0"
    with pytest.raises(fineweb.DownloadError, match="not a valid shard") as failure:
        fineweb.download("fineweb10B", 1, data_dir=data_dir, retries=1, quiet=True)
    assert TRAIN1 in str(failure.value)
    assert len(hub.requests("cdn", "GET", TRAIN1)) == 2
    assert sleeps == [1.0]
    assert not (data_dir / TRAIN1).exists()


def test_hf_token_is_sent_to_the_hub_as_a_bearer_token(hub, data_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    fineweb.download("fineweb10B", 1, data_dir=data_dir, quiet=True)
    hub_requests = hub.requests("hub")
    assert len(hub_requests) == 2
    assert all(r.headers.get("authorization") == "Bearer hf_fake_token_for_tests" for r in hub_requests)
    # huggingface_hub drops the token when it follows the redirect to another origin (a CDN's signed URL).
    assert all("authorization" not in r.headers for r in hub.requests("cdn"))


def test_stale_temporary_files_are_cleaned_up(hub, data_dir):
    """A download killed outright leaves huggingface_hub's temporary file behind; huggingface_hub 2.4 never reuses it
    (each attempt has a unique name), so an old one is deleted. A recent one may be another process's live download."""
    download_dir = data_dir / ".cache" / "huggingface" / "download"
    download_dir.mkdir(parents=True)
    old, recent = download_dir / "abc.123.deadbeef.incomplete", download_dir / "abc.123.feedface.incomplete"
    old.write_bytes(b"x" * 100)
    recent.write_bytes(b"y" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    fineweb.download("fineweb10B", 1, data_dir=data_dir, quiet=True)
    assert not old.exists() and recent.exists()


@pytest.mark.parametrize("dataset, repo, prefix", [
    ("fineweb10B", "kjj0/fineweb10B-gpt2", "fineweb_"),
    ("fineweb100B", "kjj0/fineweb100B-gpt2", "fineweb_"),
    ("finewebedu10B", "kjj0/finewebedu10B-gpt2", "finewebedu_"),
])
def test_each_dataset_comes_from_its_repo_and_the_summary_says_how_to_train_on_it(dataset, repo, prefix, tmp_path,
                                                                                  monkeypatch, capsys):
    names = [f"{prefix}val_000000.bin", f"{prefix}train_000001.bin"]
    served = {name: shard_bytes(synthetic_tokens(2000, seed=i)) for i, name in enumerate(names)}
    fake = FakeHub(served, repo_id=repo)
    try:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        data_dir = tmp_path / "my data"
        assert fineweb.main(["1", "--data-dir", str(data_dir)], dataset) == 0
    finally:
        fake.close()
    for name in names:
        assert (data_dir / name).read_bytes() == served[name]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    flags = summary.split("train on them with: python train_gpt.py ")[1]
    hp = train_gpt.parse_args(shlex.split(flags))
    assert Path(hp.data_dir) == data_dir
    assert [Path(p).name for p in train_gpt.find_shards(hp.data_dir, hp.train_files, "train")] == names[1:]
    assert [Path(p).name for p in train_gpt.find_shards(hp.data_dir, hp.val_files, "val")] == names[:1]


# ----------------------------------------------------------------------------------------------------------------------
# Failures: one line, the right exit code, no traceback


def test_missing_shard_is_reported_at_once_naming_file_and_repo(hub, served, data_dir, capsys, sleeps):
    code = fineweb.main(["3", "--data-dir", str(data_dir), "--retries", "4", "--quiet"], "fineweb10B")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(PROG_ERROR) and err.count("\n") == 1
    assert TRAIN3 in err and REPO in err and "404" in err
    assert len(hub.requests("hub", "HEAD", TRAIN3)) == 1 and sleeps == []  # no retry of a 404
    for name in (VAL, TRAIN1, TRAIN2):  # what came before is kept
        assert (data_dir / name).read_bytes() == served[name]


def test_refused_repository_is_reported_at_once(hub, data_dir, capsys):
    hub.deny = True
    code = fineweb.main(["1", "--data-dir", str(data_dir), "--quiet"], "fineweb10B")
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(PROG_ERROR) and err.count("\n") == 1
    assert REPO in err and "401" in err and "HF_TOKEN" in err
    assert len(hub.log) == 1


def test_unreachable_endpoint_gives_the_offline_message(data_dir, monkeypatch, capsys, sleeps):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code = fineweb.main(["1", "--data-dir", str(data_dir), "--retries", "1"], "fineweb10B")
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(PROG_ERROR + "cannot reach the Hugging Face Hub at " + endpoint)
    assert "2 attempts" in last and "HF_ENDPOINT" in last and f"into {data_dir} by hand" in last
    assert "retrying in 1 s (attempt 2 of 2)" in err
    assert sleeps == [fineweb.BACKOFF_FIRST_S]  # the one back-off asked for; huggingface_hub adds none of its own
    assert not (data_dir / VAL).exists()


def test_hf_hub_offline_refuses_missing_shards_but_accepts_complete_ones(hub, served, data_dir, monkeypatch,
                                                                          capsys):
    args = ["2", "--data-dir", str(data_dir), "--quiet"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fineweb.main(args, "fineweb10B") == 1
    err = capsys.readouterr().err
    assert err.startswith(PROG_ERROR) and err.count("\n") == 1
    assert "HF_HUB_OFFLINE" in err and f"into {data_dir} by hand" in err and VAL in err
    assert hub.log == [] and not data_dir.exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert fineweb.main(args, "fineweb10B") == 0
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fineweb.main(args, "fineweb10B") == 0
    assert hub.log == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("loop", ["hub-self", "hub-cycle", "cdn-self"])
def test_redirect_loop_is_reported_at_once_and_leaves_nothing(loop, hub, data_dir, capsys, sleeps):
    """Bounded by requests, not seconds: one way round the client's limit of 20 redirects, and no retry."""
    hub.loop = loop
    code = fineweb.main(["1", "--data-dir", str(data_dir), "--retries", "3", "--quiet"], "fineweb10B")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(PROG_ERROR + f"the download of {VAL} from {hub.url} went round a redirect loop")
    assert err.count("\n") == 1 and "HF_ENDPOINT" in err
    assert sleeps == [] and len(hub.log) <= 2 + 20
    assert not (data_dir / VAL).exists() and partials(data_dir) == []


def test_a_hub_that_never_answers_ends_each_attempt_after_the_etag_timeout(tmp_path, real_sleep):
    """A fresh interpreter, so that huggingface_hub reads the timeouts from the environment as in real use. The
    bound comes from the test's own timeouts: two attempts of one timeout each and the back-off between them, against
    a server that stays silent twenty times that long; the run must end before half of the silence is over."""
    timeout_s, retries = 1, 1
    expected_s = (retries + 1) * timeout_s + fineweb.BACKOFF_FIRST_S
    server = SilentServer(silence_s=20 * expected_s)
    data_dir = tmp_path / "data"
    # Telemetry off: huggingface_hub would first ask the endpoint for its list of AI agents (3 s, once per process).
    env = script_env(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf_home_sub"), HF_HUB_DISABLE_TELEMETRY="1",
                     HF_HUB_ETAG_TIMEOUT=str(timeout_s), HF_HUB_DOWNLOAD_TIMEOUT=str(timeout_s))
    limit_s = server.silence_s / 2
    try:
        start = time.monotonic()
        run = subprocess.run([sys.executable, str(ROOT / "data" / "cached_fineweb10B.py"), "1", "--data-dir",
                              str(data_dir), "--retries", str(retries), "--quiet"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=limit_s)
        elapsed_s = time.monotonic() - start
    except subprocess.TimeoutExpired:
        pytest.fail(f"no result within {limit_s:g} s from a download with {timeout_s} s timeouts and {retries} retry")
    finally:
        server.close()
    assert run.returncode == 1
    assert run.stderr.startswith(PROG_ERROR + "no answer while downloading " + VAL) and run.stderr.count("\n") == 1
    assert f"to the HEAD request within {timeout_s} s (HF_HUB_ETAG_TIMEOUT)" in run.stderr
    assert "2 attempts" in run.stderr
    assert server.accepted == retries + 1  # one lookup per attempt: huggingface_hub retried none of them itself
    assert elapsed_s >= (retries + 1) * timeout_s  # the timeout was waited for, not skipped
    assert not (data_dir / VAL).exists() and partials(data_dir) == []


def test_a_cdn_that_never_answers_ends_each_attempt_after_one_download_timeout(hub, data_dir, monkeypatch, capsys,
                                                                             sleeps):
    """The Hub answers the lookup; the CDN it redirects to never answers. huggingface_hub would send each attempt's
    GET 6 times (its resume loop); bounded by requests, so the test's speed does not matter."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)  # read by huggingface_hub at each GET
    silent = SilentServer(silence_s=60)
    hub.blob_origin = silent.url
    try:
        code = fineweb.main(["1", "--data-dir", str(data_dir), "--retries", "1", "--quiet"], "fineweb10B")
    finally:
        silent.close()
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(PROG_ERROR + "no answer while downloading " + VAL) and err.count("\n") == 1
    assert "no answer from 127.0.0.1 to the GET request within 1 s (HF_HUB_DOWNLOAD_TIMEOUT)" in err
    assert "2 attempts" in err
    assert silent.accepted == 2  # one GET per attempt
    assert not (data_dir / VAL).exists() and partials(data_dir) == []


@pytest.mark.parametrize("endpoint", ["nonsense", "ftp://mirror.example", "http://[::1", "http://host:port"])
def test_malformed_hf_endpoint_is_named(endpoint, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert fineweb.main(["1", "--data-dir", str(data_dir)], "fineweb10B") == 1
    err = capsys.readouterr().err
    assert err == f"{PROG_ERROR}HF_ENDPOINT={endpoint!r} is not an http:// or https:// URL: set it to the Hub " \
                  "(https://huggingface.co) or a mirror's address, or unset it\n"


@pytest.mark.parametrize("argv, complaint", [
    (["0"], "N must be at least 1"),
    (["104"], "fineweb10B has 103 train shards"),
    (["two"], "invalid int value"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2(argv, complaint, capsys, data_dir):
    assert fineweb.main(argv + ["--data-dir", str(data_dir)], "fineweb10B") == 2
    assert complaint in capsys.readouterr().err
    assert not data_dir.exists()


@pytest.mark.parametrize("dataset", list(fineweb.DATASETS))
@pytest.mark.parametrize("abbreviation", ["--retrie=1", "--data=elsewhere", "--qui"])
def test_abbreviated_flags_are_refused(dataset, abbreviation, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it taken for the flag, the run would stop offline (exit 1)
    assert fineweb.main([abbreviation, "--data-dir", str(data_dir)], dataset) == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err
    # The scripts parse nothing themselves: fineweb.main's parser is the only one.
    assert "ArgumentParser" not in (ROOT / "data" / f"cached_{dataset}.py").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# The scripts, as a user runs them (real environment variables, fresh interpreter, from another directory)


@pytest.mark.slow
def test_script_downloads_with_hf_endpoint_from_the_environment_and_fails_cleanly_offline(hub, served, tmp_path,
                                                                                          real_sleep):
    data_dir = tmp_path / "elsewhere"
    script = str(ROOT / "data" / "cached_fineweb10B.py")
    env = script_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home_sub"))
    run = subprocess.run([sys.executable, script, "2", "--data-dir", str(data_dir), "--quiet"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    for name in served:
        assert (data_dir / name).read_bytes() == served[name]

    hub.log.clear()
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, script, "3", "--data-dir", str(data_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(PROG_ERROR + "HF_HUB_OFFLINE is set") and TRAIN3 in run.stderr
    assert hub.log == []


def test_progress_written_to_a_log_is_whole_lines(hub, served, tmp_path, real_sleep):
    """With stderr in a file, both bars (the shards', and huggingface_hub's for each file) and the note of a retry
    write whole lines."""
    data_dir, log = tmp_path / "elsewhere", tmp_path / "download.log"
    hub.faults[TRAIN1] = ["500"]
    env = script_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home_sub"))
    with open(log, "w") as stderr:
        run = subprocess.run([sys.executable, str(ROOT / "data" / "cached_fineweb10B.py"), "2", "--data-dir",
                              str(data_dir)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr,
                             text=True, timeout=120)
    assert run.returncode == 0
    raw = log.read_bytes()  # not read_text, which would turn each "\r" into a line end
    assert b"\r" not in raw and b"\x1b" not in raw  # no redraws, no cursor movements
    lines = raw.decode().splitlines()
    assert any(line.startswith("fineweb10B: 100%") and "3/3" in line for line in lines)
    assert f"{TRAIN1}: HTTP 500; retrying in 1 s (attempt 2 of 6)" in lines
    for name in served:
        assert any(line.startswith(f"{name}: 100%") for line in lines)


@pytest.mark.parametrize("dataset", list(fineweb.DATASETS))
def test_entry_point_help(dataset, tmp_path, real_sleep):
    script = ROOT / "data" / f"cached_{dataset}.py"
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=script_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    help_text = " ".join(run.stdout.split())
    assert help_text.startswith(f"usage: cached_{dataset}.py [-h] [--data-dir DIR] [--retries K] [--quiet] [N]")
    assert fineweb.DATASETS[dataset].repo_id in help_text
    assert "default: 8," in help_text and f"default: data/{dataset}" in help_text


# ----------------------------------------------------------------------------------------------------------------------
# How many shards a run needs


def test_shards_needed():
    assert fineweb.shards_needed(1695, 393_216) == 8  # the speedrun: 0.67B tokens + 10%
    assert fineweb.shards_needed(1, 1) == 1
    assert fineweb.shards_needed(100, 1_000_000, margin=0) == 1  # exactly one shard
    assert fineweb.shards_needed(101, 1_000_000, margin=0) == 2
    assert fineweb.shards_needed(3000, 1_000_000) == 33  # 3.3B tokens exactly; float arithmetic rounds up to 34
    assert fineweb.shards_needed(1000, 1000, tokens_per_shard=1000, margin=0.5) == 1500
    for bad in [dict(num_iterations=0), dict(global_batch_tokens=-1), dict(margin=-0.1), dict(tokens_per_shard=0)]:
        with pytest.raises(ValueError):
            fineweb.shards_needed(**{**dict(num_iterations=10, global_batch_tokens=10), **bad})


def test_default_shard_count_follows_the_speedrun_preset():
    hp = train_gpt.Hyperparameters()
    assert (fineweb.SPEEDRUN_STEPS, fineweb.SPEEDRUN_BATCH_TOKENS) == (hp.num_iterations, hp.global_batch_tokens)
    for dataset in fineweb.DATASETS:
        assert fineweb.build_arg_parser(dataset).parse_args([]).num_train_shards == 8
    assert [fineweb.default_dir(d) for d in fineweb.DATASETS] == [ROOT / "data" / d for d in fineweb.DATASETS]
    assert Path(hp.data_dir) == fineweb.default_dir("fineweb10B").relative_to(ROOT)
    assert fineweb.shard_names("finewebedu10B", 2) == ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin",
                                                       "finewebedu_train_000002.bin"]
