"""Commands on shared start-up code: generate, eval, bench, serve."""
