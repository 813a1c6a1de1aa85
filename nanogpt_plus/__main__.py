"""`python -m nanogpt_plus` runs the command line, as `nanogpt-plus` does (and as `torchrun -m nanogpt_plus` needs).

Written by hand: nbdev generates the other modules from the notebooks, but a package's `__main__` has no notebook.
It ends through `end_process` (chapter 15): under torchrun the process skips Python's shutdown, in which gloo's
leftover worker threads can abort it after all its work is done.
"""
from nanogpt_plus.cli import main
from nanogpt_plus.distributed import end_process

if __name__ == "__main__":
    end_process(main())
