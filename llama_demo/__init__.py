"""llama_demo: a model-parallel LLaMA chat server. See ARCHITECTURE.md for what each package holds."""
