"""eval_hellaswag.py: packed scoring equals scoring each ending alone, the accuracies and their standard errors
follow from the losses, the validation file is downloaded once (from a local server here) and bad input costs one
line."""

from __future__ import annotations

import http.server
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval_hellaswag as eh
import train_gpt as tg
from conftest import ROOT, subprocess_env
from test_generate import CPU, loaded, random_ckpt, trained  # noqa: F401  (fixtures)


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per character (the scoring does not depend on which tokenizer made the ids)."""
    return [ord(c) % 5000 for c in text]


def example_lines(n: int, seed: int, words: tuple[int, int] = (3, 30)) -> list[dict]:
    """n examples in the file's format (its other fields included), contexts and endings of random words."""
    gen = torch.Generator().manual_seed(seed)
    vocab = "the a man woman dog runs onto roof table ball then slowly he she they it".split()

    def text(lo, hi):
        count = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (count,), generator=gen))

    return [{"ind": i, "activity_label": "Test", "ctx_a": (c := text(*words)), "ctx_b": "", "ctx": c, "split": "val",
             "split_type": "indomain", "label": int(torch.randint(0, 4, (1,), generator=gen)),
             "endings": [text(1, words[1]) for _ in range(4)], "source_id": f"test~{i}"} for i in range(n)]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def examples_of(items: list[dict]) -> list[eh.Example]:
    return [eh.Example(i["ctx"], tuple(i["endings"]), i["label"]) for i in items]


def alone(model: tg.GPT, window_blocks: int, cand: eh.Candidate) -> float:
    """The ending's summed loss with the candidate as the only document of a forward: the definition."""
    tokens = torch.tensor(cand.tokens())
    logits = model(tokens, window_blocks=window_blocks)
    first = len(cand.context)
    return F.cross_entropy(logits[first:first + len(cand.ending)], tokens[first + 1:], reduction="sum").item()


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("words, aligned", [((2, 6), False), ((15, 25), True)])
def test_packed_scores_equal_each_ending_alone(loaded, words, aligned):  # noqa: F811
    """Short examples fit the final short window (2 blocks) wherever they start, so they pack end to end; longer
    ones span more blocks and start at a block each. Several batch sizes: the scores never depend on the packing."""
    model, window = loaded.model, loaded.window_blocks
    cands = eh.candidates(examples_of(example_lines(6, seed=len(words) + words[0], words=words)), encode)
    longest = max(len(c.tokens()) for c in cands)
    assert eh.aligned_starts(model, window, longest) is aligned
    want = torch.tensor([alone(model, window, c) for c in cands])
    fits = -(-longest // tg.FLEX_BLOCK_SIZE) * tg.FLEX_BLOCK_SIZE  # the smallest batch that holds every candidate
    for batch_tokens in (fits, 2 * fits, 8192):
        batches = eh.pack(cands, batch_tokens, aligned)
        assert len(batches) > 1 or batch_tokens == 8192
        starts = [start for batch in batches for _, start in batch]
        assert any(s % tg.FLEX_BLOCK_SIZE for s in starts) is not aligned
        got = torch.zeros(len(cands))
        for batch in batches:
            sums, counts = eh.score_batch(model, window, cands, batch, CPU)
            assert counts.tolist() == [len(cands[i].ending) for i, _ in batch]
            got[[i for i, _ in batch]] = sums
        # fp32 sums of ~100 terms of size ~10: the packed and lone forwards differ in rounding only
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_long_endings_packed_unaligned_would_see_other_windows(loaded):  # noqa: F811
    """The reason for aligned starts: packed end to end, endings that span more blocks than the short window
    lose part of their context and score differently."""
    model, window = loaded.model, loaded.window_blocks
    cands = eh.candidates(examples_of(example_lines(4, seed=3, words=(15, 25))), encode)
    want = torch.tensor([alone(model, window, c) for c in cands])
    got = torch.zeros(len(cands))
    for batch in eh.pack(cands, 4096, aligned=False):
        got[[i for i, _ in batch]] = eh.score_batch(model, window, cands, batch, CPU)[0]
    assert (got - want).abs().max() > 0.01


def test_pack_respects_the_batch_and_refuses_what_cannot_fit():
    cands = eh.candidates(examples_of(example_lines(5, seed=1)), encode)
    for aligned in (False, True):
        batches = eh.pack(cands, 300, aligned)
        assert [i for b in batches for i, _ in b] == list(range(len(cands)))  # in order, each once
        for batch in batches:
            assert max(start + len(cands[i].tokens()) for i, start in batch) <= 300
            ends = [start + len(cands[i].tokens()) for i, start in batch]
            assert all(e <= s for e, (_, s) in zip(ends, batch[1:]))  # no overlap
    with pytest.raises(eh.EvalError, match="does not fit --batch-tokens 16"):
        eh.pack(cands, 16, False)


def test_candidates_are_bos_context_then_the_ending_after_a_space():
    (ex,) = examples_of(example_lines(1, seed=2))
    cands = eh.candidates([ex], encode)
    assert len(cands) == 4 and all(c.example == 0 for c in cands)
    for cand, ending in zip(cands, ex.endings):
        assert cand.tokens() == [tg.BOS_ID, *encode(ex.context), *encode(" " + ending)]


def test_accuracy_picks_the_lowest_sum_and_the_lowest_mean():
    acc = eh.Accuracy()
    acc.add(0, [10.0, 12.0, 11.0, 13.0], [5, 4, 6, 7])  # sum: 0 (10.0); mean: 2.0, 3.0, 1.83, 1.86 -> 2
    acc.add(2, [10.0, 12.0, 11.0, 13.0], [5, 4, 6, 7])
    acc.add(1, [9.0, 1.0, 9.0, 9.0], [3, 3, 3, 3])  # both pick 1
    assert (acc.examples, acc.correct, acc.correct_norm) == (3, 2, 2)
    p, se = eh.Accuracy.rate(2967, 10042)
    assert p == 2967 / 10042 and se == pytest.approx(math.sqrt(p * (1 - p) / 10042)) and 0.0045 < se < 0.0046
    line = acc.summary()
    assert line.startswith("hellaswag acc_norm 0.6667 ± 0.2722 (2/3), acc 0.6667 ± 0.2722 (2/3)")
    assert "not the standard 10,042-example set" in line


def test_evaluate_counts_every_example_once_whatever_the_batches(loaded):  # noqa: F811
    """The running tally takes an example once all its endings are scored, so any batch size gives one result."""
    items = example_lines(9, seed=4)
    exs = examples_of(items)
    results = {b: eh.evaluate(loaded.model, loaded.window_blocks, exs, encode, CPU, batch_tokens=b, quiet=True)
               for b in (256, 700, 8192)}
    cands = eh.candidates(exs, encode)
    sums = [alone(loaded.model, loaded.window_blocks, c) for c in cands]
    want = eh.Accuracy()
    for e, ex in enumerate(exs):
        want.add(ex.label, sums[4 * e:4 * e + 4], [len(c.ending) for c in cands[4 * e:4 * e + 4]])
    for acc in results.values():
        assert (acc.examples, acc.correct, acc.correct_norm) == (want.examples, want.correct, want.correct_norm)


# ----------------------------------------------------------------------------------------------------------------------
# The validation file


class Server:
    """A local HTTP server: the first `failures` requests get a 503, then path -> the file's bytes (404 elsewhere);
    with `cut`, each answer promises more bytes than it sends (a connection lost mid-file)."""

    def __init__(self, files: dict[str, bytes], failures: int = 0, cut: bool = False):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = files.get(self.path)
                if len(server.requests) <= failures or body is None:
                    self.send_error(503 if len(server.requests) <= failures else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if cut else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    body = write_jsonl(tmp_path / "upstream.jsonl", example_lines(7, seed=5)).read_bytes()
    servers = []

    def start(failures=0, cut=False):
        server = Server({"/hellaswag_val.jsonl": body}, failures, cut)
        servers.append(server)
        monkeypatch.setenv(eh.URL_ENV, server.url + "/hellaswag_val.jsonl")
        return server

    monkeypatch.setattr(eh.time, "sleep", lambda s: None)
    yield start, body
    for server in servers:
        server.close()


def test_downloads_once_into_the_data_dir(served, tmp_path, capsys):
    start, body = served
    server = start(failures=1)  # one server error first: tried again
    path = eh.validation_file(tmp_path / "hs")
    assert path == tmp_path / "hs" / eh.FILE_NAME and path.read_bytes() == body
    assert len(server.requests) == 2 and list(path.parent.iterdir()) == [path]  # no temporary file left
    err = capsys.readouterr().err
    assert f"downloading {server.url}/hellaswag_val.jsonl to {path}" in err and "100%" in err
    assert eh.validation_file(tmp_path / "hs") == path and len(server.requests) == 2  # present: not fetched again
    assert len(eh.read_examples(path)) == 7


@pytest.mark.parametrize("where", ["missing file", "closed port", "cut off"])
def test_a_failed_download_says_where_to_put_the_file(served, tmp_path, capsys, monkeypatch, where):
    start, _ = served
    server = start(cut=where == "cut off")
    url = {"missing file": server.url + "/nothing.jsonl", "closed port": "http://127.0.0.1:9/hellaswag_val.jsonl",
           "cut off": server.url + "/hellaswag_val.jsonl"}[where]
    monkeypatch.setenv(eh.URL_ENV, url)
    with pytest.raises(eh.EvalError) as e:
        eh.validation_file(tmp_path / "hs", quiet=True)
    message = str(e.value)
    assert message.startswith(f"cannot download HellaSwag's validation set from {url} (")
    assert f"put {eh.FILE_NAME} from {eh.VAL_URL} at {tmp_path / 'hs' / eh.FILE_NAME}" in message
    assert "\n" not in message and not list(tmp_path.glob("hs/*")) + list(tmp_path.glob("hs/.*"))  # nothing partial
    assert len(server.requests) == {"missing file": 1, "closed port": 0, "cut off": eh.ATTEMPTS}[where]  # 404: once


@pytest.mark.parametrize("line, number", [('{"ctx": "a", "endings": ["b", "c"]}', 2), ("not json", 2),
                                          ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', 2)])
def test_a_malformed_file_names_its_line(tmp_path, line, number):
    path = tmp_path / eh.FILE_NAME
    path.write_text(json.dumps(example_lines(1, seed=6)[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(eh.EvalError, match=f"^{path}:{number} is not a HellaSwag example"):
        eh.read_examples(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(eh.EvalError, match="holds no examples"):
        eh.read_examples(path)


# ----------------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_command_line_on_a_trained_checkpoint(trained, served, tmp_path):  # noqa: F811
    """A subprocess, as a user runs it: downloads from the server, scores with the GPT-2 tokenizer and prints one
    result line; a second run (the file present) with --limit; bad flags and checkpoints in one line."""
    start, _ = served
    server = start()
    env = subprocess_env(HELLASWAG_URL=server.url + "/hellaswag_val.jsonl")
    cmd = [sys.executable, "eval_hellaswag.py", "--checkpoint", str(trained), "--data-dir", str(tmp_path / "hs"),
           "--device", "cpu", "--batch-tokens", "1024"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith("hellaswag acc_norm ") and "(not the standard 10,042-example set)" in line
    assert "/7), acc " in line and f"{trained / 'step_000003.pt'} step 3" in line
    assert "run T, step 3" in r.stderr and len(server.requests) == 1
    r = subprocess.run(cmd + ["--limit", "2", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "/2), acc " in r.stdout and len(server.requests) == 1 and "%|" not in r.stderr
    for extra, words in [(["--batch-tokens", "64"], "--batch-tokens must be 128 or more"),
                         (["--limit", "-1"], "--limit must be 0 or more"),
                         (["--checkpoint", str(tmp_path / "none")], "does not exist")]:
        r = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("eval_hellaswag.py: error: ") and words in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
