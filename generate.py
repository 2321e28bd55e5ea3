"""python generate.py ... runs the same program as `lora-generate` (the code is lora_core/cli/generate.py)."""
import sys

from lora_core.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
