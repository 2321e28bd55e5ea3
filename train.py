"""python train.py ... runs the same program as `lora-train` (the code is lora_core/cli/train.py)."""
import sys

from lora_core.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
