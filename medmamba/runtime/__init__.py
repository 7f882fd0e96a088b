"""Process plumbing shared by the training integrations: ``distributed.py`` (torchrun process groups,
CPU SyncBatchNorm, DDP re-wrapping). It imports nothing from medmamba, so any layer may use it
(docs/architecture.md).
"""
