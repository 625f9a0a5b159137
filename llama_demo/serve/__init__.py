"""Serving: the loop every rank runs, rank 0's request gate, bus, OpenAI routes and chat page."""
