"""``python -m gainsurgery.cli``: the command line (torchrun and accelerate launch it this way)."""

from gainsurgery.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
