"""`python -m llama_demo.eval`: the command lives in llama_demo.commands.eval; this name stays for users' scripts."""
import sys

from .commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
