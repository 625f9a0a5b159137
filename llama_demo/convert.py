"""`python -m llama_demo.convert`: the command lives in llama_demo.commands.convert; this name stays for users' scripts."""
import sys

from .commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
