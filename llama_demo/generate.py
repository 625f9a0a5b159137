"""`python -m llama_demo.generate`: the command lives in llama_demo.commands.generate; this name stays for users' scripts."""
import sys

from .commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
