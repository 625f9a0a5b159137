"""`python -m llama_demo.bench`: the command lives in llama_demo.commands.bench; this name stays for users' scripts."""
import sys

from .commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
