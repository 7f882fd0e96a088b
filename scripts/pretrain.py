#!/usr/bin/env python
"""Same as ``medmamba pretrain ...`` (MambaMIM pretraining on CT); see docs/pretraining.md.

    python scripts/pretrain.py --data /data/ct --arch umamba_bot --out runs/mim --steps 20000
"""
import sys

from medmamba.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
