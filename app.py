"""Entry point: `python app.py` or `torchrun --nproc_per_node N app.py --ckpt_dir ...`."""
import sys

from llama_demo.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
