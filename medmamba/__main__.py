"""``python -m medmamba`` (and ``torchrun ... -m medmamba pretrain ...``): the ``medmamba`` command."""
import sys

from medmamba.cli import main

if __name__ == "__main__":
    sys.exit(main())
