"""Text: tokenizers, chat formats, streaming detokenization and stop strings."""
