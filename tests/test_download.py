"""llama_demo.weights.download against a local HTTP server that speaks Range, like Meta's CDN."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from llama_demo.weights import download as dl
from llama_demo.weights.download import DownloadError, download
from llama_demo.weights.folder import CheckpointError, parse_checklist


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_tree(shards: int = 1) -> dict[str, bytes]:
    files = {"tokenizer.model": b"\x0a\x0bsentencepiece" * 100, "7B/params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4}'}
    for s in range(shards):
        files[f"7B/consolidated.{s:02d}.pth"] = bytes(range(256)) * (400 + s)  # ~100 KB: several reads
    files["tokenizer_checklist.chk"] = f"{md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    files["7B/checklist.chk"] = "".join(f"{md5(v)}  {k.split('/')[1]}\n" for k, v in sorted(files.items())
                                        if k.startswith("7B/")).encode()
    return files


class FakeMeta:
    """Serves `files` under /<path>?Policy=..., honours `Range: bytes=N-`, and can drop a file's
    first transfer halfway (the client then sees fewer bytes than Content-Length)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_once: set[str] = set()
        self.ignore_range = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                path = url.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((path, rng))
                if "Policy=sig" not in url.query:
                    self.send_error(403)
                    return
                if path not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[path], 0
                if rng and not outer.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in outer.drop_once:
                    outer.drop_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/*?Policy=sig&Key-Pair-Id=k"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def paths_fetched(self) -> list[str]:
        return [p for p, _ in self.requests]


@pytest.fixture
def meta():
    server = FakeMeta(fake_tree())
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)


def assert_tree(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel
    assert not list(folder.rglob("*.part"))


def test_download_fetches_every_listed_file(meta, tmp_path):
    got = download(meta.url, ["7B"], tmp_path, progress=False)
    assert_tree(tmp_path, meta.files)
    assert {p.relative_to(tmp_path).as_posix() for p in got} == set(meta.files)
    assert all(rng is None for _, rng in meta.requests)


def test_rerun_skips_verified_files(meta, tmp_path):
    download(meta.url, ["7B"], tmp_path)  # with progress bars (tqdm)
    meta.requests.clear()
    download(meta.url, ["7B"], tmp_path, progress=False)
    assert sorted(meta.paths_fetched()) == ["7B/checklist.chk", "tokenizer_checklist.chk"]  # only the lists again


def test_dropped_connection_resumes_with_range(meta, tmp_path):
    meta.drop_once.add("7B/consolidated.00.pth")
    download(meta.url, ["7B"], tmp_path, progress=False)
    assert_tree(tmp_path, meta.files)
    shard = [rng for p, rng in meta.requests if p == "7B/consolidated.00.pth"]
    half = len(meta.files["7B/consolidated.00.pth"]) // 2
    assert shard == [None, f"bytes={half}-"]


def test_partial_file_from_an_interrupted_run_is_resumed(meta, tmp_path):
    data = meta.files["7B/consolidated.00.pth"]
    (tmp_path / "7B").mkdir()
    (tmp_path / "7B" / "consolidated.00.pth.part").write_bytes(data[:12345])
    download(meta.url, ["7B"], tmp_path, progress=False)
    assert_tree(tmp_path, meta.files)
    assert ("7B/consolidated.00.pth", "bytes=12345-") in meta.requests


def test_server_ignoring_range_restarts_the_file(meta, tmp_path):
    meta.ignore_range = True
    (tmp_path / "7B").mkdir()
    (tmp_path / "7B" / "consolidated.00.pth.part").write_bytes(b"garbage that must not stay in front")
    download(meta.url, ["7B"], tmp_path, progress=False)
    assert_tree(tmp_path, meta.files)


def test_complete_part_file_is_verified_and_kept(meta, tmp_path):
    data = meta.files["7B/consolidated.00.pth"]
    (tmp_path / "7B").mkdir()
    (tmp_path / "7B" / "consolidated.00.pth.part").write_bytes(data)
    download(meta.url, ["7B"], tmp_path, progress=False)  # the server answers 416: nothing past the end
    assert_tree(tmp_path, meta.files)


def test_corrupted_shard_is_rejected_naming_it_and_deleted(meta, tmp_path, capsys):
    good = meta.files["7B/consolidated.00.pth"]
    meta.files["7B/consolidated.00.pth"] = good[:-1] + b"X"
    with pytest.raises(DownloadError, match=r"7B/consolidated\.00\.pth is corrupted.*run again"):
        download(meta.url, ["7B"], tmp_path, progress=False)
    assert not (tmp_path / "7B" / "consolidated.00.pth").exists()
    assert not (tmp_path / "7B" / "consolidated.00.pth.part").exists()
    meta.files["7B/consolidated.00.pth"] = good  # the server is fixed: a rerun completes
    assert dl.main(["--url", meta.url, "--model_size", "7B", "--folder", str(tmp_path), "--quiet"]) == 0
    assert_tree(tmp_path, meta.files)


def test_existing_file_with_wrong_content_is_fetched_again(meta, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"stale")
    download(meta.url, ["7B"], tmp_path, progress=False)
    assert (tmp_path / "tokenizer.model").read_bytes() == meta.files["tokenizer.model"]


def test_cli_errors_are_one_line_and_nonzero(meta, tmp_path, capsys):
    bad_link = meta.url.replace("Policy=sig", "Policy=old")
    assert dl.main(["--url", bad_link, "--model_size", "7B", "--folder", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer_checklist.chk: HTTP 403") and err.count("\n") == 1
    assert dl.main(["--url", meta.url, "--model_size", "13B", "--folder", str(tmp_path), "--quiet"]) == 1
    assert "13B/checklist.chk: HTTP 404" in capsys.readouterr().err
    assert dl.main(["--url", "http://127.0.0.1/no-star", "--model_size", "7B", "--folder", str(tmp_path)]) == 1
    assert "must contain '*'" in capsys.readouterr().err


def test_several_shards_all_come_from_the_checklist(tmp_path):
    server = FakeMeta(fake_tree(shards=2))
    server.thread.start()
    try:
        download(server.url, ["7B"], tmp_path, progress=False)
    finally:
        server.server.shutdown()
        server.server.server_close()
    assert_tree(tmp_path, server.files)
    assert (tmp_path / "7B" / "consolidated.01.pth").is_file()


def test_checklist_cannot_name_files_outside_the_folder():
    with pytest.raises(CheckpointError, match="plain file name"):
        parse_checklist(f"{'0' * 32}  ../../etc/passwd\n", "7B/checklist.chk")
    assert parse_checklist(f"{'a' * 32} *consolidated.00.pth\n\n", "x") == {"consolidated.00.pth": "a" * 32}
