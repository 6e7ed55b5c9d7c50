import sys

from bench.cli import main

# asv imports every module of the benchmark folder, this one included, so run only as a script.
if __name__ == "__main__":
    sys.exit(main())
