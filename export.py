"""export.py: export from the command line (not implemented yet: issue #6)."""
import sys


def main() -> int:
    print("export.py: not implemented yet (export lands with issue #6)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
