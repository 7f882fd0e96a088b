"""Shim folder for nnU-Net's ``nnUNet_extTrainer`` lookup (see medmamba/nnunet/env.py).

nnU-Net imports the modules of this folder by bare name (the folder temporarily on ``sys.path``) and
drops them from ``sys.modules`` afterwards; they only re-export the trainers from
``medmamba.nnunet.trainers``, so the classes keep their canonical, picklable ``__module__``.
"""
