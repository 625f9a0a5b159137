"""The lock-step engine: KV rows and admission, sampling, the step every rank runs."""
