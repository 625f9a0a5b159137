"""`python -m llama_demo.download`: the command lives in llama_demo.weights.download; this name stays for users' scripts."""
import sys

from .weights.download import main

if __name__ == "__main__":
    sys.exit(main())
