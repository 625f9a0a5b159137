"""Run under torchrun by tests/test_meta_reference.py: write a tiny random checkpoint the way
Meta's code makes one, and Meta's own logits for it.

Every rank builds Meta's llama3 Transformer (llama_models.llama3.model, on fairscale's layers)
inside a real model-parallel group of WORLD_SIZE ranks, fills its parameters with random values
and saves its `state_dict()` as consolidated.0<rank>.pth: exactly how Meta's shards are made, so
each shard's split of every tensor is whatever Meta's layer classes hold, not what we think they
hold. Then Meta's forward (prefill of the prompt, one decode step) gives the reference logits.

Families: "llama3" is the model as shipped (VocabParallelEmbedding, Llama 3.1's scaled rope,
grouped-query attention). llama-models has no Llama 2 model; Llama 2's llama/model.py is the same
network (same norms, rope, attention, FFN) but for its ParallelEmbedding and rope theta 10000, so
"llama2" swaps in that embedding and writes Llama 2's params.json (vocab_size -1, no n_kv_heads).

    argv: out_dir family[,family...] seed prompt_json   ("{family}" in out_dir: one folder each)
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import initialize_model_parallel
from fairscale.nn.model_parallel.layers import ParallelEmbedding
from llama_models.llama3.args import ModelArgs
from llama_models.llama3.model import Transformer

out_template, families, seed, prompt = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), json.loads(sys.argv[4])
FAMILIES = {
    # Llama 3.1's params.json keys, scaled down; 12 heads, 6 KV heads, vocab 384: every count of
    # 1, 2 or 3 shards or ranks divides them
    "llama3": {"dim": 96, "n_layers": 2, "n_heads": 12, "n_kv_heads": 6, "vocab_size": 384, "multiple_of": 48,
               "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
    # Llama 2 7B's params.json keys
    "llama2": {"dim": 96, "multiple_of": 48, "n_heads": 12, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1},
    # Llama 3.1 with its real vocabulary, for Meta's tiktoken tokenizer.model; narrow to stay small
    "llama3-128k": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 16,
                    "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
}

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
initialize_model_parallel(world)
torch.set_num_threads(1)
for family in families:
    PARAMS = FAMILIES[family]
    VOCAB = PARAMS["vocab_size"] if PARAMS["vocab_size"] > 0 else 384
    out = Path(out_template.replace("{family}", family))
    meta_args = dict(PARAMS, vocab_size=VOCAB, max_seq_len=64, max_batch_size=len(prompt))
    if family == "llama2":
        meta_args["rope_theta"] = 10000.0  # Llama 2's precompute_freqs_cis default
    model = Transformer(ModelArgs(**meta_args))
    if family == "llama2":
        model.tok_embeddings = ParallelEmbedding(VOCAB, PARAMS["dim"], init_method=lambda x: x)

    # Meta's layers are built with init_method identity (uninitialised memory): fill them. Split
    # parameters differ per rank (each holds its own slice of one random model); norms are replicated,
    # so every rank draws the same values for them.
    split_g = torch.Generator().manual_seed(seed * 100 + rank)
    shared_g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=shared_g))
            else:
                p.copy_(torch.randn(p.shape, generator=split_g) * (0.5 if "tok_embeddings" in name else 0.08))

    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / f"consolidated.{rank:02d}.pth")
    if rank == 0:
        (out / "params.json").write_text(json.dumps(PARAMS))

    tokens = torch.tensor(prompt)
    T = tokens.shape[1] - 1
    prefill = model(tokens[:, :T], 0)  # (B, T, vocab), gathered on every rank
    decode = model(tokens[:, T:], T)  # one more token per row, through Meta's KV cache
    if rank == 0:
        torch.save({"prefill": prefill, "decode": decode}, out / "meta_logits.pt")
    dist.barrier()
dist.destroy_process_group()
