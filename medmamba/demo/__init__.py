"""``medmamba demo``: nnU-Net end to end (plan, preprocess, train, predict, evaluate) on synthetic phantoms
(``phantom.py``) or real data; the steps are in ``pipeline.py``. This package replaces the old module
``medmamba.demo`` and keeps its names."""
from medmamba.demo.pipeline import (DEFAULT_TRAINER, DEMO_DATASET_ID, DEMO_DATASET_NAME, add_parser, cmd_demo, run_demo,
                                    synthetic_cases)

__all__ = ["DEFAULT_TRAINER", "DEMO_DATASET_ID", "DEMO_DATASET_NAME", "add_parser", "cmd_demo", "run_demo",
           "synthetic_cases"]
