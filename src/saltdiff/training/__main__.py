"""``python -m saltdiff.training``: train (or resume) the built-in model; see :mod:`saltdiff.training`."""

from .cli import main

if __name__ == "__main__":
    main()
