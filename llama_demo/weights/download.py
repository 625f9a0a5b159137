"""Download Meta's LLaMA checkpoints from the signed link in Meta's e-mail, the way download.sh does,
but resumable and checked.

The link looks like `https://host/*?Policy=...&Signature=...`: each file's path replaces the `*`.
We fetch tokenizer_checklist.chk and every file it lists (tokenizer.model), then for each model
folder its checklist.chk and every file that lists (params.json, consolidated.NN.pth), so the shard
count always comes from Meta's own list. Each file goes to FILE.part first and is resumed with an
HTTP Range request after a dropped connection or an interrupted run; it becomes FILE only once its
md5 matches the checklist. A file already present with the right md5 is skipped.

    python -m llama_demo.download --url 'https://...' --model_size 7B,13B --folder models
    python -m llama_demo.download --url 'https://...' --model_size llama-2-7b-chat --folder models
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .folder import CheckpointError, parse_checklist

CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation: a stalled connection is retried, not waited on forever
RETRIES = 5
# Meta's shard counts (FORMATS.md), by parameter count: only used to warn about a short checklist.
META_SHARDS = {"7B": 1, "8B": 1, "13B": 2, "30B": 4, "33B": 4, "65B": 8, "70B": 8}


class DownloadError(Exception):
    """A file could not be fetched or verified; the message names it and says what to do."""


def file_url(url_template: str, rel_path: str) -> str:
    """Meta's signed link with its `*` replaced by the file's path (as download.sh does)."""
    if "*" not in url_template:
        raise DownloadError("the URL must contain '*' where each file's path goes: paste the whole signed link from Meta's e-mail")
    return url_template.replace("*", urllib.parse.quote(rel_path, safe="/"), 1)


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(url_template: str, rel_path: str, folder: Path, md5: str | None = None, progress: bool = True,
          retries: int = RETRIES) -> Path:
    """Fetch one file into folder/rel_path, resuming FILE.part; verify it against md5 when given.
    Without md5 (the checklists themselves) the file is always fetched afresh."""
    dest = folder / rel_path
    if md5 is not None and dest.is_file():
        if md5_of(dest) == md5:
            return dest
        dest.unlink()  # wrong content: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if md5 is None and part.exists():
        part.unlink()  # an unverifiable file is not worth resuming
    url = file_url(url_template, rel_path)
    for attempt in range(1, retries + 1):
        try:
            _transfer(url, rel_path, part, progress)
            break
        except _Retry as e:
            if attempt == retries:
                raise DownloadError(f"{rel_path}: {e} (gave up after {retries} attempts; run again to resume)") from None
            time.sleep(min(0.2 * 2 ** attempt, 10.0))
    if md5 is not None:
        got = md5_of(part)
        if got != md5:
            part.unlink()  # deleted so that a rerun fetches it whole
            raise DownloadError(f"{rel_path} is corrupted: md5 {got}, checklist says {md5}; deleted it, run again to re-fetch")
    os.replace(part, dest)
    return dest


class _Retry(Exception):
    """A transient failure: the next attempt resumes from what FILE.part holds."""


def _transfer(url: str, rel_path: str, part: Path, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left past our offset: the part is complete (md5 decides)
            return
        if e.code in (401, 403):
            raise DownloadError(f"{rel_path}: HTTP {e.code}: the signed URL is wrong or has expired "
                                "(Meta's links expire after 24 hours or a few downloads); request a new one") from None
        if e.code == 404:
            raise DownloadError(f"{rel_path}: HTTP 404, no such file: check --model_size (LLaMA 1 folders are 7B, 13B, ...; "
                                "Llama 2 folders are llama-2-7b, llama-2-7b-chat, ...)") from None
        if e.code >= 500 or e.code == 429:
            raise _Retry(f"HTTP {e.code}") from None
        raise DownloadError(f"{rel_path}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _Retry(f"cannot connect: {getattr(e, 'reason', e)}") from None
    with resp:
        if resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{rel_path}: the server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:  # 200: the server ignored the Range header and sends everything
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        from tqdm import tqdm
        with open(part, mode) as f, tqdm(total=None if expected is None else offset + expected, initial=offset,
                                         unit="B", unit_scale=True, unit_divisor=1024, desc=rel_path, leave=False,
                                         disable=None if progress else True) as bar:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, OSError) as e:  # dropped connection, timeout
                raise _Retry(f"connection lost after {offset + received} bytes ({type(e).__name__})") from None
        if expected is not None and received < expected:
            raise _Retry(f"connection closed after {offset + received} of {offset + expected} bytes")


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def download(url: str, model_sizes: list[str], folder: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Fetch the tokenizer and each model folder; returns the files, all verified."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file_url(url, "x")  # a URL without '*' fails here, before any request
    done = []
    tok_list = fetch(url, "tokenizer_checklist.chk", folder, progress=progress)
    tok_files: dict[str, str | None] = {"tokenizer.model": None}  # fetched even if the list forgets it
    tok_files.update(parse_checklist(tok_list.read_text(), "tokenizer_checklist.chk"))
    done.append(tok_list)
    for name, md5 in tok_files.items():
        done.append(fetch(url, name, folder, md5, progress))
    for size in model_sizes:
        if not size or Path(size).name != size or size in (".", ".."):
            raise DownloadError(f"model size {size!r} is not a folder name like 7B or llama-2-7b-chat")
        chk = fetch(url, f"{size}/checklist.chk", folder, progress=progress)
        listed = parse_checklist(chk.read_text(), f"{size}/checklist.chk")
        shards = sorted(n for n in listed if re.fullmatch(r"consolidated\.\d+\.pth", n))
        if not shards:
            raise DownloadError(f"{size}/checklist.chk lists no consolidated.NN.pth files; is {size} a model folder?")
        m = re.search(r"(\d+)b\b", size, re.IGNORECASE)
        want = META_SHARDS.get(f"{m.group(1)}B") if m else None
        if want is not None and want != len(shards):
            print(f"warning: {size}/checklist.chk lists {len(shards)} shards; Meta's {m.group(1)}B models have {want}",
                  file=sys.stderr)
        files: dict[str, str | None] = {"params.json": None}
        files.update(listed)
        done.append(chk)
        for name, md5 in files.items():
            done.append(fetch(url, f"{size}/{name}", folder, md5, progress))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_demo.download",
                                description="Download Meta's LLaMA weights from the signed link in Meta's e-mail; "
                                            "resumable, md5-checked.")
    p.add_argument("--url", required=True, help="the signed link from Meta's e-mail (quote it: it contains '*' and '&')")
    p.add_argument("--model_size", required=True,
                   help="comma-separated model folders: 7B,13B,30B,65B (LLaMA 1) or llama-2-7b,llama-2-7b-chat,... (Llama 2)")
    p.add_argument("--folder", required=True, help="where to put tokenizer.model and the model folders")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    sizes = [s.strip() for s in a.model_size.split(",") if s.strip()]
    try:
        files = download(a.url, sizes, a.folder, progress=not a.quiet)
    except (DownloadError, CheckpointError) as e:  # CheckpointError: a checklist the server sent is malformed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{len(files)} files in {a.folder}, all verified against Meta's checklists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
