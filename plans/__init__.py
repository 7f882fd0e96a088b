"""Plans presets (one JSON per architecture), installed as package data ``medmamba.plans``.

Read by ``medmamba.nnunet.presets`` (``medmamba plan DATASET --arch NAME``); see docs/nnunet.md.
"""
