"""train.py: training from the command line (not implemented yet: issue #4)."""
import sys


def main() -> int:
    print("train.py: not implemented yet (training lands with issue #4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
