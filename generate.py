"""generate.py: generation from the command line (not implemented yet: issue #5)."""
import sys


def main() -> int:
    print("generate.py: not implemented yet (generation lands with issue #5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
