"""llama_demo: a model-parallel LLaMA chat server. See ARCHITECTURE.md for what each package holds."""

import os as _os

# 2 MB pages for torch's large CPU allocations (weights, KV cache), read by torch at its first large
# allocation, so set before any: a decode step streams every weight once, and with 4 KB pages the
# float32 products of SmolLM2-135M read ~20% slower on the VM we measured (28 vs 22 ms a token). A
# value the user set wins; THP_MEM_ALLOC_ENABLE=0 turns it off.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
