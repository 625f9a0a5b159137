"""Model shapes from Meta's params.json, and the server's tunables.

One place per fact: derived sizes (head_dim, FFN hidden size) are computed here and nowhere else.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path


# --- defaults and limits: every other module imports these, none restates them ---------------------

DEFAULT_MAX_SEQ_LEN = 2048  # KV cache length per sequence (prompt + answer)
DEFAULT_MAX_BATCH_SIZE = 32  # sequences running together (decoded in one step), at most
# The KV cache is a pool of blocks of KV_BLOCK_SIZE positions (engine.kv_blocks); its default size
# is the memory of DEFAULT_KV_ROWS sequences of max_seq_len tokens (--kv_cache_tokens,
# --kv_cache_memory change it), which many more, shorter sequences share.
KV_BLOCK_SIZE = 16  # vLLM's default: a prefix is shared to within 15 tokens
# Speculative decoding's proposed tokens per verification, at most (--num_speculative_tokens).
# 4: vLLM's and llama.cpp's usual range (3-5); not yet chosen by measurement here (issue 25). The
# proposer shortens proposals, to none, where the measured step costs say they do not pay.
DEFAULT_SPECULATIVE_TOKENS = 4
DEFAULT_KV_ROWS = 8
DEFAULT_DIST_TIMEOUT = 1800.0  # seconds a collective may wait (init_process_group's timeout)
# Prompt chunks the start-up probe tries for a step's token budget (Engine.calibrate), on CPU and
# on CUDA: past these a CPU step only gets slower per token (attention grows with the chunk), and
# a GPU is full.
STEP_TOKEN_CANDIDATES = {False: (64, 128, 256, 512), True: (256, 512, 1024, 2048)}
DEFAULT_HEARTBEAT_INTERVAL = 60.0  # seconds between idle collectives; must stay below the timeout
# seconds a follower waits for bus messages rank 0 has sealed (they left rank 0 before the seal's
# broadcast, so only a lost ZeroMQ link takes this long)
BUS_TIMEOUT = 60.0


class ConfigError(ValueError):
    """A model folder or a setting is wrong in a way the user can fix; the message says how."""


def first_line(e: BaseException) -> str:
    """An exception's first line, for our one-line errors that quote a library's reason."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_json_object(path: Path, error: type[Exception] = ConfigError, missing: str | None = None) -> dict:
    """A JSON file that must hold an object, failures raised as `error` naming the file. A missing
    file is {} when `missing` is None, else an error saying `missing` (why it is needed)."""
    if not path.is_file():
        if missing is None:
            return {}
        raise error(f"{path} is missing: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        raise error(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


# Llama 3.1's long-context rotary scaling behind params.json's use_scaled_rope: the constants
# Meta's llama3 apply_scaling hard-codes ("values obtained from grid search"). Llama 3.2 1B/3B were
# trained with factor 32 (their Hugging Face config.json, fixed after release), though Meta's
# reference code still applies 8 (meta-llama/llama-models#241); params.json then carries
# "rope_scaling_factor" (the name Meta's llama4 args use), which our Hugging Face import writes.
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}

# params.json keys Meta's released models use (llama-models sku_list.py arch_args) that describe
# something this server cannot run: refused by name rather than silently ignored.
PARAMS_REFUSED = {
    "vision_chunk_size": "a Llama 3.2 Vision model (image encoder and cross-attention layers); only text models are supported",
    "vision_max_num_chunks": "a Llama 3.2 Vision model; only text models are supported",
    "vision_num_cross_attention_layers": "a Llama 3.2 Vision model; only text models are supported",
    "quantization_args": "Meta's own int4 QAT/SpinQuant layout, which this loader does not read; use the bfloat16 "
                         "release and --quantize int4 or python -m llama_demo.quantize",
    "lora_args": "Meta's int4 QAT+LoRA layout, which this loader does not read; use the bfloat16 release and "
                 "--quantize int4 or python -m llama_demo.quantize",
}
# Other spellings of our fields in Meta's params.json files (Llama Guard 3 1B INT4 uses executorch's).
PARAMS_ALIASES = {"rope_freq_base": "rope_theta"}


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> list[float]:
    """Inverse frequencies of Meta's rotary embedding (float64), with Llama 3's scaling when given
    (Meta's apply_scaling: long wavelengths slowed by `factor`, short ones kept, a blend between)."""
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if not scaling:
        return freqs
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention (Llama 2 70B, Llama 3); None = n_heads
    vocab_size: int = -1  # -1 in LLaMA 1/2 params.json: taken from the tokenizer
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling
    rope_scaling_factor: float | None = None  # with use_scaled_rope: None = Llama 3.1's 8 (see LLAMA3_ROPE_SCALING)
    hidden_dim: int | None = None  # FFN size given outright (pruned Llama Guard 3 1B) instead of derived from dim
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # KV cache length: a serving choice, not a property of the weights
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_scaling(self) -> dict | None:
        """Llama 3's rotary scaling parameters, or None without use_scaled_rope."""
        if not self.use_scaled_rope:
            return None
        return dict(LLAMA3_ROPE_SCALING, factor=self.rope_scaling_factor or LLAMA3_ROPE_SCALING["factor"])

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def kv_bytes_per_token(self, world_size: int, element_size: int) -> int:
        """One rank's KV cache per token: keys and values for every layer, of the KV heads this rank
        holds (replicated, not split, when there are more ranks than KV heads)."""
        local_kv = max(1, self.n_kv_heads // world_size)
        return 2 * self.n_layers * local_kv * self.head_dim * element_size

    def validate(self) -> None:
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            raise ConfigError(f"dim, n_layers and n_heads must be positive (got {self.dim}, {self.n_layers}, {self.n_heads})")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size is unknown: params.json says -1 and no tokenizer gave it")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ConfigError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ConfigError(f"hidden_dim (the FFN size) must be positive, got {self.hidden_dim}")

    def check_world_size(self, world_size: int) -> None:
        """Model-parallel ranks must divide the query heads and the KV heads (or be a multiple of
        the KV heads, which are then replicated)."""
        if self.n_heads % world_size:
            raise ConfigError(
                f"{world_size} ranks cannot split {self.n_heads} attention heads: use a rank count that divides {self.n_heads}")
        kv = self.n_kv_heads
        if kv % world_size and world_size % kv:
            raise ConfigError(
                f"{world_size} ranks cannot split or replicate {kv} KV heads: use a divisor or a multiple of {kv}")
        if self.dim % world_size or self.ffn_hidden % world_size:
            raise ConfigError(f"{world_size} ranks cannot split dim {self.dim} / FFN {self.ffn_hidden} evenly")
        if self.vocab_size > 0 and self.vocab_size % world_size:
            raise ConfigError(f"{world_size} ranks cannot split the output layer's {self.vocab_size} vocabulary rows evenly")

    def to_params(self) -> dict:
        """params.json content in Meta's spelling (serving fields left out)."""
        d = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
             "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
             "multiple_of": self.multiple_of, "norm_eps": self.norm_eps, "rope_theta": self.rope_theta}
        if self.ffn_dim_multiplier is not None:
            d["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.use_scaled_rope:
            d["use_scaled_rope"] = True
        if self.rope_scaling_factor is not None and self.rope_scaling_factor != LLAMA3_ROPE_SCALING["factor"]:
            d["rope_scaling_factor"] = self.rope_scaling_factor
        if self.hidden_dim is not None:
            d["hidden_dim"] = self.hidden_dim
        return d

    @classmethod
    def from_params_file(cls, path: str | os.PathLike, **overrides) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} is missing: a Meta checkpoint folder needs params.json beside consolidated.*.pth")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); expected Meta's params.json with dim, n_layers, n_heads, ...") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object with dim, n_layers, n_heads, ...")
        return cls.from_params(raw, source=str(path), **overrides)

    @classmethod
    def from_params(cls, raw: dict, source: str = "params", **overrides) -> "ModelArgs":
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}; expected Meta's params.json fields dim, n_layers, n_heads, norm_eps, ...")
        refused = [k for k in raw if k in PARAMS_REFUSED]
        if refused:
            raise ConfigError(f"{source} has {refused[0]}: {PARAMS_REFUSED[refused[0]]}")
        known = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in raw.items():
            k = PARAMS_ALIASES.get(k, k)
            if k not in known:
                continue  # e.g. "rope_scaling" notes in some exports: not used by Meta's code either
            if v is None and k in ("n_kv_heads", "ffn_dim_multiplier", "rope_scaling_factor", "hidden_dim"):
                kw[k] = None
                continue
            want = {"ffn_dim_multiplier": float, "norm_eps": float, "rope_theta": float, "use_scaled_rope": bool,
                    "rope_scaling_factor": float}.get(k, int)
            if isinstance(v, bool) and want is not bool or not isinstance(v, (int, float, bool)):
                raise ConfigError(f"{source}: {k} must be a number, got {v!r}")
            if want is int and float(v) != int(v):
                raise ConfigError(f"{source}: {k} must be an integer, got {v!r}")
            kw[k] = want(v)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# Shapes for benchmarks and tests: the 110M shape is the one the speed targets are stated for.
NAMED_SHAPES: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, multiple_of=32),
    "110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, rope_theta=500000.0),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where llama_demo keeps what it makes once and reuses (the converted default model, bench's
    reference copies): cache_dir, else $LLAMA_DEMO_CACHE, else ~/.cache/llama_demo."""
    root = cache_dir or os.environ.get("LLAMA_DEMO_CACHE") or Path.home() / ".cache" / "llama_demo"
    return Path(root).expanduser()


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be a number") from None


DEFAULT_ZMQ_PORT = 5557
DEFAULT_PORT = 7860


@dataclass(frozen=True)
class SamplingDefaults:
    """One set of sampling defaults per front end; the engine's are OpenAI's."""
    temperature: float
    top_p: float
    max_new_tokens: int
    top_k: int = 0
    repetition_penalty: float = 1.0
    repeat_guard: int = 0  # stop an answer whose last tokens repeat one short cycle (see REPEAT_GUARD_*); 0 = off


# What a request that names nothing gets: OpenAI's defaults (temperature 1, top_p 1, 16 tokens
# for /v1/completions; chat answers as much as fits, up to the server's --max_new_tokens).
API_SAMPLING = SamplingDefaults(temperature=1.0, top_p=1.0, max_new_tokens=16)
# `python -m llama_demo.generate`: Meta's example scripts' values (example_text_completion.py).
CLI_SAMPLING = SamplingDefaults(temperature=0.6, top_p=0.9, max_new_tokens=64)
# Runaway repetition ("la femme de France, la femme de France, ..." for 512 tokens, seen on the
# page with a 135M model): the page stops an answer once its last tokens are one cycle of at most
# REPEAT_GUARD_MAX_PERIOD tokens repeated REPEAT_GUARD_MIN_REPEATS times or more, covering at
# least PAGE_REPEAT_GUARD tokens. A detector rather than a default repetition penalty: a penalty
# also bends every normal answer (code, lists and names legitimately repeat tokens), while a
# 64-token loop is never an answer anyone wants. The API keeps OpenAI's semantics (no guard).
REPEAT_GUARD_MAX_PERIOD = 32
REPEAT_GUARD_MIN_REPEATS = 4
PAGE_REPEAT_GUARD = 64
# The chat page's initial sliders: low enough that small models stay on topic. A model folder's
# Hugging Face generation_config.json, when present, gives its own (page_sampling).
PAGE_SAMPLING = SamplingDefaults(temperature=0.3, top_p=0.9, max_new_tokens=512, repeat_guard=PAGE_REPEAT_GUARD)


def page_sampling(model_dir: str | os.PathLike | None, temperature: float | None = None, top_p: float | None = None,
                  max_new_tokens: int | None = None) -> SamplingDefaults:
    """The chat page's defaults: the flags, else the model's generation_config.json (temperature,
    top_p, top_k, repetition_penalty; do_sample false = greedy), else PAGE_SAMPLING."""
    gen = {}
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is not None and path.is_file():
        try:
            gen = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not readable JSON ({e}): fix or remove it") from None
        gen = gen if isinstance(gen, dict) else {}

    def pick(key: str, flag, default, kind):
        v = flag if flag is not None else gen.get(key, default)
        return default if isinstance(v, bool) or not isinstance(v, (int, float)) else kind(v)

    model_temperature = 0.0 if gen.get("do_sample") is False else None
    return SamplingDefaults(
        temperature=pick("temperature", temperature if temperature is not None else model_temperature,
                         PAGE_SAMPLING.temperature, float),
        top_p=pick("top_p", top_p, PAGE_SAMPLING.top_p, float),
        max_new_tokens=max_new_tokens if max_new_tokens is not None else PAGE_SAMPLING.max_new_tokens,
        top_k=pick("top_k", None, PAGE_SAMPLING.top_k, int),
        repetition_penalty=pick("repetition_penalty", None, PAGE_SAMPLING.repetition_penalty, float),
        repeat_guard=PAGE_SAMPLING.repeat_guard)

# Below this a temperature is treated as greedy: dividing logits by 1e-300 overflows to inf and
# the softmax to NaN (vLLM uses the same epsilon).
GREEDY_BELOW_TEMPERATURE = 1e-5
# Stop strings are matched on rank 0 for every new token; bounded so matching stays cheap.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_CHAT_MESSAGES = 4096
MAX_SEED = 2**64  # torch.Generator takes seeds in [0, 2**64); larger integers are reduced modulo this
MAX_REPETITION_PENALTY = 100.0
# OpenAI's ranges: presence/frequency penalties in [-2, 2], logit_bias values in [-100, 100]
MAX_PRESENCE_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024  # token ids one request may bias (OpenAI's limit is 300)
# Alternatives per token with logprobs: OpenAI allows 20 (chat top_logprobs; completions take 5,
# vLLM 20); each costs one top-k over the vocabulary on rank 0, only for requests that ask.
MAX_TOP_LOGPROBS = 20
# Choices one request may ask for (n, times the prompts of a batch): each is its own engine request,
# and all of them must fit the queue at once (all-or-nothing, else 429).
MAX_CHOICES = 128
# Requests admitted beyond the KV rows wait here; more than this many waiting is a 429.
DEFAULT_MAX_WAITING = 64
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # a request body larger than this is a 413
RETRY_AFTER_S = 2  # what a 429 tells clients to wait
# SIGTERM or Ctrl-C drains (serve.shutdown): requests in flight get this many seconds to finish.
# Below the 30 s that torchrun (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and Kubernetes
# (terminationGracePeriodSeconds) wait before they kill, leaving time to exit after the drain.
DEFAULT_DRAIN_TIMEOUT = 20.0
# /v1/responses keeps stored answers (for previous_response_id and GET) in rank 0's memory, the
# oldest dropped first past either bound; dropped ids are remembered (ids only, 10x as many) so a
# client is told its response expired rather than that it never existed.
RESPONSE_STORE_MAX = 1000
RESPONSE_STORE_BYTES = 64 * 2**20

# An SSE comment (": keep-alive") goes out after this many seconds without an event, so proxies
# and clients with read timeouts keep a stream open while its request waits for a KV row.
SSE_KEEPALIVE_S = 10.0

# Secrets come from the environment (or a file), never from every rank's command line.
API_KEY_ENV = "LLAMA_DEMO_API_KEY"
AUTH_ENV = "LLAMA_DEMO_AUTH"  # USER:PASS for the chat page (and /v1 when no API key is set)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # safe by default: only this machine can reach the UI unless asked
    port: int = DEFAULT_PORT
    zmq_port: int = DEFAULT_ZMQ_PORT
    share: bool = False
    auth: tuple[str, str] | None = None  # the chat page's login (and /v1's, when api_key is unset)
    api_key: str | None = None  # OpenAI-style bearer token for /v1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_waiting: int = DEFAULT_MAX_WAITING
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    dist_timeout: float = DEFAULT_DIST_TIMEOUT
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    chat: bool | None = None  # None: decide from the model folder
    page: SamplingDefaults = PAGE_SAMPLING  # the chat page's sliders; max_new_tokens is also chat's API default
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API; none by default
    sse_keepalive_s: float = SSE_KEEPALIVE_S
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # seconds a stop signal leaves requests in flight
