"""Hugging Face LlamaForCausalLM folders (config.json + safetensors or pytorch_model*.bin) into
Meta's layout, and the facts both directions share: the tensor-name table and the per-head
rotary permutation of wq/wk (Hugging Face rotates halves of each head, Meta interleaved pairs);
the other direction too: transformers' model on a Meta checkpoint (hf_model_from_meta, the
reference beside ours in bench --vs-hf, eval --vs-hf and the tests).

    python -m llama_demo.convert --hf_dir Llama-2-7b-hf --out models/llama-2-7b --shards 2
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .checkpoint import LAYER_RE, open_checkpoint
from .folder import TOKENIZER_FILES, atomic_dir, check_out_dir
from .convert import CONVERTER_VERSION, ConvertError, ffn_params, resolve_dtype, save_converted
from ..config import LLAMA3_ROPE_SCALING, ModelArgs, first_line, read_json_object

# Files copied as they are from a Hugging Face folder: the tokenizer, and generation_config.json
# for its list of stop ids. tokenizer_config.json is rewritten (see _write_hf_tokenizer_config).
HF_COPIED_FILES = tuple(name for name in TOKENIZER_FILES if name != "tokenizer_config.json")


def meta_from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's per-head row permutation of wq/wk: HF rotates halves of each head,
    Meta rotates interleaved pairs. Pure reindexing, so it is bit-exact in any dtype."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_from_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The permutation FORMATS.md gives (Meta -> Hugging Face); the inverse of meta_from_hf_rotary."""
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


class LazyState(Mapping):
    """A state dict whose tensors are produced on access, so a big source is never held in memory
    whole: save_sharded reads each tensor once per output shard."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]]):
        self._makers = makers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the tensor
        return name in self._makers



_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_name(meta_name: str) -> str:
    """Meta's tensor name -> Hugging Face's (layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight)."""
    top = {meta: hf for hf, meta in _HF_TOP_NAMES.items()}
    if meta_name in top:
        return top[meta_name]
    m = LAYER_RE.match(meta_name)
    layer = {meta: hf for hf, meta in _HF_LAYER_NAMES.items()}.get(m.group(2)) if m else None
    if layer is None:
        raise KeyError(f"{meta_name} is not a LLaMA tensor name")
    return f"model.layers.{m.group(1)}.{layer}"


def convert_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, shards: int = 1,
               dtype: str | torch.dtype | None = None) -> Path:
    """Convert a Hugging Face LlamaForCausalLM folder into Meta's layout in out_dir (new or empty).
    Without dtype every tensor keeps its stored dtype and bits."""
    src, out = Path(hf_dir), Path(out_dir)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder; expected a Hugging Face model folder with config.json")
    check_out_dir(out)
    want_dtype = resolve_dtype(dtype)
    config = read_json_object(src / "config.json", ConvertError, "a Hugging Face model folder needs config.json")
    args, extra = _hf_model_args(config, src)
    sources = _hf_tensor_sources(src)  # name -> loader of the tensor as stored

    makers: dict[str, Callable[[], torch.Tensor]] = {}
    for name, load in sources.items():
        m = _HF_LAYER_RE.match(name)
        if m and m.group(2) in _HF_LAYER_NAMES:
            meta = f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"
        elif name in _HF_TOP_NAMES:
            meta = _HF_TOP_NAMES[name]
        elif name.endswith("rotary_emb.inv_freq"):  # older exports save the rotary table: recomputed
            continue
        else:
            raise ConvertError(f"{src} holds tensor {name}, which a LLaMA model does not have "
                               "(biases and other extras cannot be expressed in Meta's layout)")
        heads = args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads if meta.endswith("wk.weight") else None
        makers[meta] = _hf_maker(load, heads, want_dtype)
    if "output.weight" not in makers and "tok_embeddings.weight" in makers:
        if config.get("tie_word_embeddings") is False:
            raise ConvertError(f"{src}: config.json says tie_word_embeddings is false but there is no lm_head.weight")
        makers["output.weight"] = makers["tok_embeddings.weight"]
    extra["converted_from"] = {"file": src.name, "converter_version": CONVERTER_VERSION}

    with atomic_dir(out) as tmp:
        save_converted(LazyState(makers), args, tmp, shards, extra)
        _copy_hf_tokenizer(src, tmp)
    return out


def _hf_maker(load: Callable[[], torch.Tensor], heads: int | None, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        t = load()
        if heads is not None:
            t = meta_from_hf_rotary(t, heads)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return make


def _hf_model_args(c: dict, src: Path) -> tuple[ModelArgs, dict]:
    where = src / "config.json"
    archs = c.get("architectures") or []
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ConvertError(f"{where}: model_type {c.get('model_type')!r} / architectures {archs}; only LlamaForCausalLM can be converted")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in c]
    if missing:
        raise ConvertError(f"{where} lacks {', '.join(missing)}")
    if c.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{where}: hidden_act {c['hidden_act']!r}; LLaMA uses silu")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConvertError(f"{where}: attention/MLP biases cannot be expressed in Meta's layout")
    dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, dim // n_heads):
        raise ConvertError(f"{where}: head_dim {c['head_dim']} differs from hidden_size / num_attention_heads = {dim // n_heads}")
    # transformers 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = dict(c.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    scaling = c.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    use_scaled, factor = False, None
    if rope_type == "llama3":
        # Llama 3.1 uses factor 8, Llama 3.2 1B/3B 32; the other constants are Meta's fixed ones.
        got = {k: float(scaling.get(k, 0)) for k in LLAMA3_ROPE_SCALING}
        fixed = {k: v for k, v in LLAMA3_ROPE_SCALING.items() if k != "factor"}
        if {k: got[k] for k in fixed} != fixed or got["factor"] <= 0:
            raise ConvertError(f"{where}: rope scaling {got} differs from Meta's Llama 3 scaling {fixed} with a positive "
                               "factor, the only one use_scaled_rope supports")
        use_scaled, factor = True, (got["factor"] if got["factor"] != LLAMA3_ROPE_SCALING["factor"] else None)
    elif rope_type not in ("default", None):
        raise ConvertError(f"{where}: rope scaling type {rope_type!r} is not supported")
    args = ModelArgs(dim=dim, n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
                     n_kv_heads=int(c.get("num_key_value_heads") or n_heads), vocab_size=int(c["vocab_size"]),
                     norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, use_scaled_rope=use_scaled,
                     rope_scaling_factor=factor,
                     **ffn_params(dim, int(c["intermediate_size"])))
    extra = {}
    if c.get("max_position_embeddings"):
        extra["max_seq_len_trained"] = int(c["max_position_embeddings"])
    return args, extra


def _hf_tensor_sources(src: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Tensor name -> loader, for single or sharded safetensors / pytorch_model.bin files."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            weight_map = read_json_object(index, ConvertError, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        sources: dict[str, Callable[[], torch.Tensor]] = {}
        for f in files:
            if not (src / f).is_file():
                raise ConvertError(f"{src / f} is missing (listed in {index_name})")
            sources.update(_safetensors_sources(src / f) if f.endswith(".safetensors") else _bin_sources(src / f))
        return sources
    raise ConvertError(f"{src} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _safetensors_sources(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt")  # memory-mapped; get_tensor reads one tensor
        names = list(handle.keys())
    except Exception as e:
        raise ConvertError(f"{path} is not a readable safetensors file: {e}") from None
    return {n: (lambda n=n: handle.get_tensor(n)) for n in names}


def _bin_sources(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint: {first_line(e)}") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path} does not hold a state dict")
    return {n: (lambda t=t: t) for n, t in sd.items() if isinstance(t, torch.Tensor)}


def _copy_hf_tokenizer(src: Path, dst: Path) -> None:
    copied = [name for name in HF_COPIED_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file():
        _write_hf_tokenizer_config(src, dst)
    if not {"tokenizer.model", "tokenizer.json"} & set(copied):
        import warnings
        warnings.warn(f"{src} has no tokenizer.model or tokenizer.json: put the model's tokenizer beside the converted weights",
                      stacklevel=3)


def _write_hf_tokenizer_config(src: Path, dst: Path) -> None:
    """tokenizer_config.json with plain-string special tokens, add_bos_token and chat_template filled
    in from wherever this transformers version kept them."""
    cfg = read_json_object(src / "tokenizer_config.json", ConvertError)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if isinstance(cfg.get(key), dict):  # older files spell AddedToken as {"content": ...}
            cfg[key] = cfg[key].get("content")
    if "chat_template" not in cfg:
        if (src / "chat_template.jinja").is_file():
            cfg["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
        elif (src / "chat_template.json").is_file():
            template = read_json_object(src / "chat_template.json", ConvertError).get("chat_template")
            if isinstance(template, str):
                cfg["chat_template"] = template
    if not isinstance(cfg.get("add_bos_token"), bool):
        cfg["add_bos_token"] = _post_processor_adds_bos(src / "tokenizer.json", cfg.get("bos_token"))
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _post_processor_adds_bos(tokenizer_json: Path, bos: str | None) -> bool:
    """Llama 3's tokenizer.json adds BOS in its post-processor instead of saying add_bos_token."""
    if bos is None or not tokenizer_json.is_file():
        return bos is not None
    try:
        post = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("post_processor") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        for item in step.get("single", []) or []:
            if item.get("SpecialToken", {}).get("id") == bos:
                return True
    return False


def hf_model_from_meta(folder: Path, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM on a one-rank view of a Meta checkpoint (rotary rows permuted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ck = open_checkpoint(folder, 1)
    a = ck.args
    # Llama 3.1's scaled rotary frequencies (use_scaled_rope) are transformers' rope_type "llama3"
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **a.rope_scaling}
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      rms_norm_eps=a.norm_eps, rope_parameters=rope, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    sd = {}
    for name in ck.full_shapes:
        t = ck.rank_slice(name, 0, 1).to(dtype)
        if name.endswith("attention.wq.weight"):
            t = hf_from_meta_rotary(t, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = hf_from_meta_rotary(t, a.n_kv_heads)
        sd[hf_name(name)] = t
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.eval()
