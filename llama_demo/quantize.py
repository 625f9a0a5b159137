"""`python -m llama_demo.quantize`: the command lives in llama_demo.weights.quantize; this name stays for users' scripts."""
import sys

from .weights.quantize import main

if __name__ == "__main__":
    sys.exit(main())
