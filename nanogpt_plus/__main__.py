"""`python -m nanogpt_plus` runs the command line, as `nanogpt-plus` does (and as `torchrun -m nanogpt_plus` needs).

Written by hand: nbdev generates the other modules from the notebooks, but a package's `__main__` has no notebook.
"""
import sys

from nanogpt_plus.cli import main

if __name__ == "__main__":
    sys.exit(main())
