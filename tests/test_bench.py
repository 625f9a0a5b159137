"""The benchmark command runs end to end on a tiny shape: ours and transformers side by side, and
one run per rank count under torchrun. Figures are not asserted (timed tests lie on shared CPUs);
their presence and sanity are."""
import json
import os
import subprocess
import sys

from conftest import ROOT, python_module, subprocess_env

ARGS = ["llama_demo.bench", "--shape", "tiny", "--prompt_len", "8", "--new_tokens", "6", "--concurrency", "1,3",
        "--repeats", "1"]


def _run(args, tmp_path):
    env = subprocess_env()
    env["LLAMA_DEMO_CACHE"] = str(tmp_path)  # the random checkpoint is written here, not in ~/.cache
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bench_json_has_every_figure_for_us_and_transformers(tmp_path):
    proc = _run(ARGS + ["--vs-hf", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["ranks"] == 1 and r["dtype"] == "float32"
    for who in ("llama_demo", "transformers"):
        for key in ("ttft_s", "decode_tok_s_c1", "decode_tok_s_c3"):
            assert r[who][key] > 0, (who, key)
    assert r["llama_demo"]["peak_mem_mb"] > 0
    assert os.path.isfile(tmp_path / "bench" / "random-tiny" / "params.json")


def test_bench_compares_rank_counts_and_quantized(tmp_path):
    proc = _run(ARGS + ["--ranks", "1,2", "--quantize", "int8"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dtype float32+int8" in out and "2 ranks (1 thread(s) each), vs 1 rank(s):" in out
    assert out.count("decode tok/s, 3 req") == 2


def test_bench_refuses_bad_values(tmp_path):
    proc = python_module(["llama_demo.bench", "--shape", "tiny", "--new_tokens", "1"])
    assert proc.returncode == 2 and "--new_tokens must be >= 2" in proc.stderr


def test_bench_puts_float_int8_and_int4_side_by_side(tmp_path):
    proc = _run(["llama_demo.bench", "--shape", "tiny", "--prompt_len", "8", "--new_tokens", "6", "--concurrency", "1,3",
                 "--repeats", "2", "--weights", "float32,int8,int4", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["weights"]
    assert [w["dtype"] for w in rows] == ["float32", "float32+int8", "float32+int4"]
    for w in rows:
        for key in ("ttft_s", "decode_tok_s_c1", "decode_tok_s_c3"):
            lo, hi = w[key + "_range"]
            assert 0 < lo <= w[key] <= hi, (w["label"], key)
    assert rows[0]["weight_mb"] > 3 * rows[1]["weight_mb"] and rows[1]["weight_mb"] > 1.2 * rows[2]["weight_mb"] > 0


def test_bench_weights_with_a_tokenizer_reports_perplexity(tmp_path):
    """A checkpoint with a tokenizer: --weights measures each precision's perplexity on --text
    beside its speed (the path the default model's table takes), and the text table prints."""
    from conftest import make_checkpoint

    folder = make_checkpoint(tmp_path / "ckpt", "mha", seed=3)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = ["llama_demo.bench", "--ckpt_dir", str(folder), "--prompt_len", "8", "--new_tokens", "4", "--concurrency",
            "1", "--repeats", "1", "--weights", "float32,int8", "--text", str(text), "--ppl_tokens", "64",
            "--no-llama-cpp"]
    proc = _run(args + ["--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["weights"]
    assert [w["label"] for w in rows] == ["float32", "int8"]
    # a random model over a 400-token vocabulary: perplexity near the vocabulary size, int8 close to float32
    assert 50 < rows[0]["perplexity"] < 2000 and abs(rows[1]["perplexity"] / rows[0]["perplexity"] - 1) < 0.02
    proc = _run(args, tmp_path)
    assert proc.returncode == 0 and "perplexity" in proc.stdout and "vs float32, 1 req" in proc.stdout, proc.stderr
