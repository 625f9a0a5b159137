"""A start-up error under torchrun: our one-line reason is the last line the user reads, after
torchrun's own report of the failed ranks (commands/startup.say_after_torchrun)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, make_checkpoint, subprocess_env, torchrun
from llama_demo.model.parallel import free_port


def _broken(tmp_path: Path) -> Path:
    folder = make_checkpoint(tmp_path / "broken", "mha", n_shards=2)
    (folder / "consolidated.01.pth").write_bytes((folder / "consolidated.01.pth").read_bytes()[:1000])  # truncated
    return folder


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_generate_on_two_ranks_ends_with_the_reason(tmp_path, monkeypatch):
    folder = _broken(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the ranks' marker file goes
    proc = torchrun(2, ["-m", "llama_demo.generate", "--ckpt_dir", str(folder), "--prompt", "hi",
                        "--max_new_tokens", "2"], check=False)
    assert proc.returncode != 0
    assert "ChildFailedError" in proc.stderr  # torchrun reported the failed ranks, before our line
    last = _last_line(proc.stderr)
    assert last.startswith("error: ") and "consolidated.01.pth" in last, proc.stderr[-3000:]
    # rank 1 reads the truncated shard: when it fails first torchrun kills rank 0, whose own line
    # may never come; the reason comes once at the end in any case
    assert not list((tmp_path / "tmp").glob("llama_demo-reason-*"))  # the marker is gone


def test_launch_sh_server_on_two_ranks_ends_with_the_reason(tmp_path):
    """launch.sh MODEL 2 (app.py under the real torchrun) on a folder with a truncated shard."""
    folder = _broken(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "torchrun").write_text(f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    (venv / "bin" / "torchrun").chmod(0o755)
    (venv / ".requirements.md5").write_text(hashlib.md5((ROOT / "requirements.txt").read_bytes()).hexdigest() + "\n")
    env = dict(subprocess_env(), LLAMA_DEMO_VENV=str(venv), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(ROOT / "launch.sh"), str(folder), "2", "--port", str(free_port()),
                           "--zmq_port", str(free_port())], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "ChildFailedError" in proc.stderr
    last = _last_line(proc.stderr)
    assert last.startswith("error: ") and "consolidated.01.pth" in last, proc.stderr[-3000:]
