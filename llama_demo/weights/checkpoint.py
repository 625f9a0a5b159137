"""Meta's sharded checkpoints: the split table, the tensors a folder must hold, reshard N files to
M ranks (finding the folder's files and writing one: folder.py).

A folder holds params.json and consolidated.00.pth ... consolidated.NN.pth, one file per
model-parallel rank the model was saved with. Each split tensor holds 1/N of the full tensor
along the dimension the split table names (fairscale's Column/RowParallelLinear and
ParallelEmbedding). When the rank count differs from the shard count, each rank reads the
memory-mapped shards and copies out only its own slice, so no rank ever holds the whole model.

How a folder's shards split each tensor is read from the shards' shapes, not assumed: Meta's
LLaMA 1/2 code splits the token embedding by its feature dimension (ParallelEmbedding), Llama 3.x
by vocabulary rows (VocabParallelEmbedding), and params.json says neither. Our model splits its
own embedding by features at run time (SPLIT_DIM); resharding copes with the stored split being
a different one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import ModelArgs
from ..model.quant_format import QUANT_AUX, QuantSpec
from .folder import CheckpointError, find_shards, load_model_args, model_folder, open_shard


# The split table: for each tensor, the dimension along which each shard/rank holds a 1/N slice
# (None: replicated). Layer index is stripped before lookup.
SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,      # ParallelEmbedding splits the embedding dimension (run time; stored: see EMBEDDING_LAYOUTS)
    "attention.wq.weight": 0,        # ColumnParallelLinear: output rows
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,        # RowParallelLinear: input columns
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
# The splits Meta's code stores tok_embeddings.weight [vocab, dim] with, one file per rank.
EMBEDDING_LAYOUTS: dict[int, str] = {
    1: "LLaMA 1/2, split by features: fairscale ParallelEmbedding",
    0: "Llama 3.x, split by vocabulary: fairscale VocabParallelEmbedding",
}
EMBEDDING = "tok_embeddings.weight"
IGNORED = {"rope.freqs"}  # LLaMA 1 stores its rotary table; we recompute it
KV_NAMES = ("attention.wk.weight", "attention.wv.weight")
LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")  # Meta's per-layer tensor names: layers.N.rest
# The Column/RowParallelLinear weights: what a quantized checkpoint stores as integers.
LINEAR_KEYS = tuple(k for k, d in SPLIT_DIM.items() if d is not None and k != "tok_embeddings.weight")
def _weight_name(name: str) -> str:
    """`X.scales` / `X.zeros` -> `X.weight`: companions split like their weight's rows or columns."""
    for suffix in QUANT_AUX:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return name


def is_linear_weight(name: str) -> bool:
    return table_key(name) in LINEAR_KEYS


def is_quantized_weight(name: str, quant: QuantSpec | None) -> bool:
    """Whether a `quant` checkpoint stores `name` (an X.weight) as integers with scales."""
    return quant is not None and (is_linear_weight(name) or (quant.embedding and name == "tok_embeddings.weight"))


def table_key(name: str) -> str:
    m = LAYER_RE.match(name)
    return m.group(2) if m else name


def split_dim(name: str, quant: QuantSpec | None = None) -> int | None:
    key = table_key(_weight_name(name))
    if key not in SPLIT_DIM:
        raise KeyError(name)
    d = SPLIT_DIM[key]
    if name.endswith(QUANT_AUX) and d == 1 and (quant is None or quant.method == "int8"):
        return None  # per-output-row scales of a row-parallel layer: every rank needs all of them
    return d


def expected_shapes(args: ModelArgs, quant: QuantSpec | None = None) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of the model, in Meta's names (with `quant`: the
    shapes of a quantized checkpoint, see QuantSpec)."""
    shapes = _float_shapes(args)
    if quant is None:
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if not is_quantized_weight(name, quant):
            out[name] = shape
            continue
        rows, cols = shape
        base = name[: -len(".weight")]
        if quant.method == "int8":
            out.update({name: (rows, cols), base + ".scales": (rows,)})
        else:
            groups = (rows, cols // quant.group_size)
            out.update({name: (rows, cols // 2), base + ".scales": groups, base + ".zeros": groups})
    return out


def quant_dtype(name: str, quant: QuantSpec) -> torch.dtype | None:
    """The stored dtype a quantized checkpoint's tensor must have (None: any float type)."""
    if not is_quantized_weight(_weight_name(name), quant):
        return None
    if name.endswith(".weight"):
        return torch.int8 if quant.method == "int8" else torch.uint8
    return torch.float32 if quant.method == "int8" else torch.float16


def _float_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    d, hd, f, v = args.dim, args.head_dim, args.ffn_hidden, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.n_kv_heads * hd, d),
            p + "attention.wv.weight": (args.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


def kv_heads_of_part(n_kv: int, part: int, n_parts: int) -> list[int]:
    """KV heads held by `part` of `n_parts` (a shard or a rank): a contiguous slice when the parts
    divide the heads, one replicated head when there are more parts than heads."""
    if n_parts <= n_kv:
        per = n_kv // n_parts
        return list(range(part * per, (part + 1) * per))
    return [part // (n_parts // n_kv)]


@dataclass
class ShardedCheckpoint:
    """The shards of one folder, opened lazily, addressed as if they were one full state dict."""

    args: ModelArgs
    paths: list[Path]
    quant: QuantSpec | None = None  # params.json's "quantization": see QuantSpec
    embedding_split: int = 1  # how the files split tok_embeddings.weight: a key of EMBEDDING_LAYOUTS

    def __post_init__(self) -> None:
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        self.full_shapes = expected_shapes(self.args, self.quant)

    @property
    def n(self) -> int:
        return len(self.paths)

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._open:
            sd = open_shard(self.paths[i])
            self._check_shard(i, sd)
            self._open[i] = sd
        return self._open[i]

    def _check_shard(self, i: int, sd: dict[str, torch.Tensor]) -> None:
        path = self.paths[i]
        names = set(sd) - IGNORED
        missing = sorted(set(self.full_shapes) - names, key=_natural)
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors (first: {missing[0]}); params.json says n_layers={self.args.n_layers}")
        extra = sorted(names - set(self.full_shapes), key=_natural)
        if extra:
            raise CheckpointError(f"{path} holds unexpected tensors (first: {extra[0]}); params.json says n_layers={self.args.n_layers}")
        for name, full in self.full_shapes.items():
            want = self.shard_shape(name, full)
            got = tuple(sd[name].shape)
            if got != want:
                raise CheckpointError(
                    f"{path}: {name} has shape {list(got)}, expected {list(want)} "
                    f"(params.json: dim={self.args.dim}, n_heads={self.args.n_heads}, n_kv_heads={self.args.n_kv_heads}, "
                    f"vocab_size={self.args.vocab_size}, {self.n} shard(s))")
            want_dtype = quant_dtype(name, self.quant) if self.quant else None
            if want_dtype is not None and sd[name].dtype != want_dtype:
                raise CheckpointError(f"{path}: {name} is {str(sd[name].dtype).replace('torch.', '')}, expected "
                                      f"{str(want_dtype).replace('torch.', '')} for a {self.quant.method} checkpoint (params.json \"quantization\")")

    def stored_split(self, name: str) -> int | None:
        """The dimension along which the shards on disk split `name` (see EMBEDDING_LAYOUTS)."""
        if self.embedding_split == 0 and _weight_name(name) == EMBEDDING:
            return 0  # rows are vocabulary entries: the weight and its companions alike
        return split_dim(name, self.quant)

    def shard_shape(self, name: str, full: tuple[int, ...], d: int | None = None, n: int | None = None) -> tuple[int, ...]:
        """Shape of one shard's `name` when `n` shards split it along `d` (None: replicated); with
        neither given, this folder's shard count and stored split."""
        d = self.stored_split(name) if d is None and n is None else d
        n = self.n if n is None else n
        if d is None:
            return full
        shape = list(full)
        if table_key(_weight_name(name)) in KV_NAMES:
            shape[0] = len(kv_heads_of_part(self.args.n_kv_heads, 0, n)) * self.args.head_dim
        else:
            if full[d] % n:
                raise CheckpointError(f"{name} of size {full[d]} cannot have been split over {n} shards; is params.json right?")
            shape[d] = full[d] // n
        return tuple(shape)

    def detect_embedding_split(self) -> None:
        """Read from shard 0's tok_embeddings.weight which of Meta's layouts the folder uses."""
        if self.n == 1:
            return  # one shard holds the whole table: nothing to tell apart
        path, full = self.paths[0], self.full_shapes[EMBEDDING]
        sd = open_shard(path)
        if EMBEDDING not in sd:
            self._check_shard(0, sd)  # says what is missing
        got = tuple(sd[EMBEDDING].shape)
        for d in EMBEDDING_LAYOUTS:
            if full[d] % self.n == 0 and got == self.shard_shape(EMBEDDING, full, d, self.n):
                self.embedding_split = d
                self._check_shard(0, sd)  # the rest of shard 0 against that layout; keep it open
                self._open[0] = sd
                return
        layouts = " or ".join(f"{list(self.shard_shape(EMBEDDING, full, d, self.n))} ({EMBEDDING_LAYOUTS[d]})"
                              for d in EMBEDDING_LAYOUTS if full[d] % self.n == 0)
        raise CheckpointError(f"{path}: {EMBEDDING} has shape {list(got)}, which fits no known layout of "
                              f"{self.n} shards: expected {layouts or 'sizes divisible by ' + str(self.n)} for params.json's "
                              f"vocab_size={self.args.vocab_size}, dim={self.args.dim}; is params.json right?")

    def rank_slice(self, name: str, rank: int, world: int) -> torch.Tensor:
        """This rank's part of tensor `name`, copied out of the memory-mapped shards."""
        full = self.full_shapes[name]
        d = split_dim(name, self.quant)
        if d is None and self.stored_split(name) is None:
            return self.shard(0)[name].clone()
        whole = d is None  # replicated at run time, split on disk (a vocab-split embedding's int8 scales)
        d = 0 if whole else d
        if table_key(_weight_name(name)) in KV_NAMES:  # rows are heads: weight, scales, zeros alike
            hd, n_kv = self.args.head_dim, self.args.n_kv_heads
            blocks = []
            for h in kv_heads_of_part(n_kv, rank, world):
                # find a shard holding head h and its offset there
                for s in range(self.n):
                    held = kv_heads_of_part(n_kv, s, self.n)
                    if h in held:
                        blocks.append(self.shard(s)[name].narrow(0, held.index(h) * hd, hd))
                        break
            return torch.cat(blocks, 0)
        lo, hi = (0, full[d]) if whole else (rank * full[d] // world, (rank + 1) * full[d] // world)
        src = self.stored_split(name)
        if src is None:  # one full copy on disk (replicated): every shard has it
            return self.shard(0)[name].narrow(d, lo, hi - lo).clone()
        if src != d:  # split one way on disk, the other way at run time: a strip of every shard
            return torch.cat([self.shard(s)[name].narrow(d, lo, hi - lo) for s in range(self.n)], src)
        per_shard = full[d] // self.n
        pieces = []
        for s in range(lo // per_shard, (hi - 1) // per_shard + 1):
            a, b = max(lo, s * per_shard), min(hi, (s + 1) * per_shard)
            pieces.append(self.shard(s)[name].narrow(d, a - s * per_shard, b - a))
        return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces, d)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def open_checkpoint(ckpt_dir: str | Path, world_size: int, **overrides) -> ShardedCheckpoint:
    """Check the folder and the rank count before touching any weights; fill in vocab_size."""
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist; expected a folder with params.json and consolidated.00.pth, ...")
    ckpt_dir = model_folder(ckpt_dir)
    args = load_model_args(ckpt_dir, **overrides)
    quant = load_quant_spec(ckpt_dir)
    paths = find_shards(ckpt_dir)
    if args.vocab_size <= 0:
        # LLaMA 1/2 say -1. The output layer is column-parallel in every Meta layout, so its rows
        # times the shard count are the vocabulary (the embedding's rows are not: Llama 3 splits them).
        out = open_shard(paths[0]).get("output.weight")
        if out is None or out.dim() != 2:
            raise CheckpointError(f"{paths[0]} has no 2-D output.weight; expected a Meta consolidated.NN.pth")
        args.vocab_size = out.shape[0] * len(paths)
    args.validate()
    args.check_world_size(world_size)
    n = len(paths)
    if args.n_heads % n or (args.n_kv_heads % n and n % args.n_kv_heads):
        raise CheckpointError(f"{n} shards cannot split {args.n_heads} heads / {args.n_kv_heads} KV heads; is params.json right?")
    if quant is not None:
        quant.check(args)
        quant.check(args, n, "shard")
        quant.check(args, world_size, "rank")
    ckpt = ShardedCheckpoint(args, paths, quant)
    ckpt.detect_embedding_split()
    return ckpt


def load_quant_spec(ckpt_dir: str | Path) -> QuantSpec | None:
    """params.json's "quantization" entry, None for a float checkpoint."""
    path = model_folder(ckpt_dir) / "params.json"
    raw = json.loads(path.read_text())  # load_model_args has already checked it parses
    return QuantSpec.from_params(raw["quantization"], str(path)) if "quantization" in raw else None


def iter_rank_state(ckpt: ShardedCheckpoint, rank: int, world: int, dtype: torch.dtype | None,
                    progress: Callable[[Iterator], Iterator] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of this rank's slices, one tensor in memory at a time, float tensors
    in `dtype` (None: as stored). A quantized layer's integers, scales and zeros stay as stored:
    the layer (quant.py) converts what its kernel needs."""
    names = sorted(ckpt.full_shapes, key=_natural)
    it = progress(names) if progress else names
    for name in it:
        t = ckpt.rank_slice(name, rank, world)
        if dtype is not None and t.is_floating_point() and not (ckpt.quant and quant_dtype(name, ckpt.quant)):
            t = t.to(dtype)
        yield name, t


def save_sharded(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, n_shards: int,
                 extra_params: dict | None = None, quant: QuantSpec | None = None) -> list[Path]:
    """Write a full state dict (Meta's names and layout) as params.json + n_shards consolidated files;
    with `quant`, the state holds quantized linear layers (see QuantSpec) and params.json says so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.check_world_size(n_shards)
    if quant is not None:
        quant.check(args)
        quant.check(args, n_shards, "shard")
    shapes = expected_shapes(args, quant)
    for name, shape in shapes.items():
        if name not in state:
            raise CheckpointError(f"state dict lacks {name}")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{name} has shape {list(state[name].shape)}, expected {list(shape)}")
        want_dtype = quant_dtype(name, quant) if quant else None
        if want_dtype is not None and state[name].dtype != want_dtype:
            raise CheckpointError(f"{name} is {state[name].dtype}, expected {want_dtype} for {quant.method}")
    fake = ShardedCheckpoint(args, [Path("<memory>")], quant)
    fake._open[0] = state
    paths = []
    for s in range(n_shards):
        shard = {name: fake.rank_slice(name, s, n_shards).contiguous() for name in shapes}
        p = out / f"consolidated.{s:02d}.pth"
        torch.save(shard, p)
        paths.append(p)
    params = args.to_params()
    params.update(extra_params or {})
    if quant is not None:
        params["quantization"] = quant.to_params()
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return paths


