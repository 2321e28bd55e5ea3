"""python export.py ... runs the same program as `lora-export` (the code is lora_core/cli/export.py)."""
import sys

from lora_core.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
