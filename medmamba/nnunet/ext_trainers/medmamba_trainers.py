"""Re-exports medmamba's nnU-Net trainers for nnU-Net's ``nnUNet_extTrainer`` lookup. Do not add code here."""
from medmamba.nnunet.trainers import *  # noqa: F401,F403
from medmamba.nnunet.trainers import TRAINER_NAMES as __all__  # noqa: F401
