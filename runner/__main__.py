"""``python -m runner``: the same command line as ``dq-run``."""

from runner.ops.cli import main

if __name__ == "__main__":
    main()
