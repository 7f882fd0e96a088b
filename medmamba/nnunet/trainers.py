"""nnU-Net v2 trainers for our networks.

=============================  ==============  =================================================================
trainer                        network         schedule (differences from nnU-Net's default)
=============================  ==============  =================================================================
nnUNetTrainerUMamba            U-Mamba Bot     nnU-Net's: SGD 1e-2 Nesterov, poly, DS, 1000 epochs (= ...Bot)
nnUNetTrainerUMambaBot         U-Mamba Bot     same
nnUNetTrainerUMambaEnc         U-Mamba Enc     same
nnUNetTrainerLightMUNet        LightM-UNet     Adam 1e-4 (wd 1e-5), poly, no deep supervision
nnUNetTrainerSwinUMamba        Swin-UMamba     AdamW 1e-4 (wd 0.05), cosine to 1e-6, DS; encoder frozen for the
                                               first 10 epochs when pretrained weights were loaded
nnUNetTrainerSwinUMambaD       Swin-UMamba-D   same as Swin-UMamba
nnUNetTrainerMSVMUNet          MSVM-UNet       AdamW 5e-4 (wd 1e-3), cosine, loss 0.4 CE + 0.6 Dice, no DS
nnUNetTrainerVMUNetMHS         VM-UNet-MHS     AdamW 1e-3 (wd 1e-2), cosine to 1e-5, no DS
nnUNetTrainerHyMamba           HyMamba         AdamW 1e-4 (wd 1e-5), cosine, no DS (MambaMIM's fine-tuning
                                               follows UNETR's BTCV pipeline)
=============================  ==============  =================================================================

Each has ``<name>_5epochs`` (5 epochs of 250 iterations), ``<name>_debug`` (1 epoch of 2 training and
1 validation iterations, no test-time mirroring in the final validation or in ``nnUNetv2_predict``) and
``<name>_demo`` (4 epochs of 10 + 2 iterations, no test-time mirroring; U-Mamba at half the plans'
channels; what ``medmamba demo`` runs).

Common behaviour (:class:`nnUNetTrainerMedMamba`):

* the plans configuration in use is adapted in memory to the architecture's preset
  (:mod:`medmamba.nnunet.presets`) before nnU-Net's ``__init__``, so the results folder's ``plans.json``
  (which ``nnUNetv2_predict`` rebuilds the network from) is the adapted one; ``-p nnUNetPlans_<arch>``
  plans written by ``medmamba plan`` are left unchanged (the adaptation is idempotent);
* ``build_network_architecture`` (nnU-Net's 5-argument staticmethod, also used by ``nnUNetv2_predict``)
  builds our class from the configuration;
* deep-supervision targets are cut to the network's own outputs (checked at initialisation);
* torch.compile follows nnU-Net (on for CUDA unless ``nnUNet_compile=f``): the selective scans are opaque
  PyTorch operators (``medmamba.kernels.ops``), so every network compiles as one graph;
* TensorBoard logs under ``<fold folder>/tensorboard`` (:mod:`medmamba.nnunet.tensorboard`);
* ``-pretrained_weights`` accepts nnU-Net and MambaMIM checkpoints (:mod:`medmamba.nnunet.pretrained`);
* ``-num_gpus N`` (nnU-Net's DDP): nnU-Net converts BatchNorm to SyncBatchNorm and wraps DDP itself;
  freezing/unfreezing the encoder rebuilds the DDP wrapper (:func:`medmamba.runtime.distributed.rewrap_ddp`),
  since DDP only reduces the parameters that required grad when it was built.

Mixed precision: nnU-Net autocasts on CUDA; every Mamba scan in our networks runs in float32 with
autocast disabled (``medmamba.layers.mamba.fp32_region``), so AMP is safe (LightM-UNet's released trainer
disabled AMP; we keep nnU-Net's AMP for it too, see docs/nnunet.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch.optim.lr_scheduler import _LRScheduler

from medmamba.runtime.distributed import rewrap_ddp
from medmamba.nnunet import pretrained as _pretrained
from medmamba.nnunet.presets import adapt_configuration, apply_preset, load_preset
from medmamba.nnunet.tensorboard import attach_tensorboard

__all__ = [
    "nnUNetTrainerMedMamba", "CosineLRScheduler", "build_network", "network_ds_scales", "ENCODER_MODULES",
    "ARCH_TO_TRAINER", "TRAINER_NAMES",
]

# submodules of each network that make up its encoder (what MambaMIM pretrains; frozen by FREEZE_ENCODER_EPOCHS)
ENCODER_MODULES = {
    "umamba_bot": ("encoder", "mamba_layer"),
    "umamba_enc": ("encoder",),
    "lightm_unet": ("encoder",),
    "swin_umamba": ("encoder",),
    "swin_umamba_d": ("encoder",),
    "msvm_unet": ("encoder",),
    "vm_unet_mhs": ("encoder",),
    "hymamba": ("embeddings", "mae"),
}


def build_network(arch: str, plans_manager, configuration_manager, num_input_channels: int,
                  num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
    """Our network for ``arch`` from an nnU-Net configuration (adapted to the preset first; idempotent),
    built the way nnU-Net's ``get_network_from_plans`` builds plans architectures."""
    conf = adapt_configuration(configuration_manager.configuration, load_preset(arch))
    a = conf["architecture"]
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a.get("_kw_requires_import", []),
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)


def network_ds_scales(network: torch.nn.Module, pool_op_kernel_sizes) -> list[list[float]]:
    """Per-axis scales (1 = full resolution) of the network's deep-supervision outputs, highest first.

    Fixed-topology networks declare them (``ds_scales``: downsampling factors; ``scales``: levels, the
    last one without an output); the others (U-Mamba, LightM-UNet) follow the plans' strides like
    nnU-Net's U-Nets: one output per stage but the deepest.
    """
    net = _pretrained.unwrap(network)
    cum = np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0)
    default = [list(map(float, 1 / c)) for c in cum][:-1]
    dims = cum.shape[1]
    if hasattr(net, "ds_scales"):
        return [[1.0 / f] * dims for f in net.ds_scales]
    if hasattr(net, "scales"):
        return [[1.0 / f] * dims for f in list(net.scales)[:-1]]
    return default


class CosineLRScheduler(_LRScheduler):
    """Cosine annealing from ``initial_lr`` to ``min_lr`` over ``max_steps`` epochs, with the interface of
    nnU-Net's ``PolyLRScheduler`` (``step(current_step)``, called once per epoch).

    ``t_max``: when given, the closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=t_max)``
    stepped once per epoch instead: lr = min + (initial - min) (1 + cos(pi epoch / t_max)) / 2 for every
    epoch, which is periodic (period 2 t_max) when the run is longer than t_max epochs (MHS-VM / VM-UNet:
    T_max 50 over 300 epochs)."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, min_lr: float = 0.0, current_step: int = None,
                 t_max: int | None = None):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.max_steps = max(1, int(max_steps))
        self.min_lr = min_lr
        self.t_max = None if t_max is None else max(1, int(t_max))
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        if self.t_max is not None:
            t = max(current_step, 0) / self.t_max
        else:
            t = min(max(current_step, 0), self.max_steps) / self.max_steps
        new_lr = self.min_lr + (self.initial_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


class nnUNetTrainerMedMamba(nnUNetTrainer):
    """Base of our trainers; subclasses set ``arch`` and the schedule class attributes below."""

    arch: str | None = None             # registry name, e.g. "umamba_bot"
    OPTIMIZER = "sgd"                   # "sgd" (nnU-Net's), "adam", "adamw"
    LR_SCHEDULE = "poly"                # "poly" (nnU-Net's) or "cosine"
    MIN_LR = 0.0                        # cosine floor
    COSINE_T_MAX: int | None = None     # cosine period/2 in epochs (CosineAnnealingLR T_max); None: the whole run
    INITIAL_LR: float | None = None     # None: nnU-Net's 1e-2
    WEIGHT_DECAY: float | None = None   # None: nnU-Net's 3e-5
    NUM_EPOCHS: int | None = None       # None: nnU-Net's 1000
    NUM_ITERATIONS: int | None = None   # training iterations per epoch (None: 250)
    NUM_VAL_ITERATIONS: int | None = None  # (None: 50)
    DEEP_SUPERVISION: bool | None = None   # None: the preset's
    LOSS_WEIGHTS: tuple | None = None   # (weight_ce, weight_dice); None: nnU-Net's (1, 1)
    FREEZE_ENCODER_EPOCHS = 0           # freeze the encoder for the first N epochs ...
    FREEZE_ONLY_IF_PRETRAINED = True    # ... only when -pretrained_weights were loaded
    TTA_MIRRORING = True                # False: no mirroring at inference (final validation, predict)
    TENSORBOARD = True
    PRESET_OVERRIDES: dict = {}         # extra presets.adapt_configuration keywords (e.g. width_factor)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.arch is None:
            raise TypeError(f"{type(self).__name__} is abstract: use a trainer with an architecture, e.g. "
                            f"nnUNetTrainerUMamba")
        # adapt the configuration in use to the preset before nnU-Net reads it (patch size, strides)
        plans = apply_preset(plans, self.arch, configurations=[configuration], **self.PRESET_OVERRIDES)
        super().__init__(plans, configuration, fold, dataset_json, device)
        preset = load_preset(self.arch)
        self.enable_deep_supervision = bool(preset["deep_supervision"] if self.DEEP_SUPERVISION is None
                                            else self.DEEP_SUPERVISION)
        for attr, value in (("initial_lr", self.INITIAL_LR), ("weight_decay", self.WEIGHT_DECAY),
                            ("num_epochs", self.NUM_EPOCHS), ("num_iterations_per_epoch", self.NUM_ITERATIONS),
                            ("num_val_iterations_per_epoch", self.NUM_VAL_ITERATIONS)):
            if value is not None:
                setattr(self, attr, value)
        self.pretrained_weights_loaded = False
        self._encoder_frozen = False
        self._compile_logged = False
        self.tensorboard = attach_tensorboard(self) if self.TENSORBOARD else None
        if self.tensorboard is not None:
            self.tensorboard.update_config({"medmamba": self._describe()})
        _pretrained.install(self)
        self.print_to_log_file(f"medmamba: {self._describe()}", also_print_to_console=True)

    def _describe(self) -> dict:
        cm = self.configuration_manager
        return {"trainer": type(self).__name__, "arch": self.arch,
                "network": cm.network_arch_class_name, "patch_size": list(cm.patch_size),
                "strides": [list(s) for s in cm.pool_op_kernel_sizes], "batch_size": cm.batch_size,
                "optimizer": self.OPTIMIZER, "lr": self.initial_lr, "weight_decay": self.weight_decay,
                "schedule": self.LR_SCHEDULE, "epochs": self.num_epochs,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "deep_supervision": self.enable_deep_supervision,
                "tensorboard": None if self.tensorboard is None else self.tensorboard.log_dir}

    # -- network -----------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # overridden in every concrete trainer (a staticmethod does not know its class)
        raise TypeError("nnUNetTrainerMedMamba is abstract: use e.g. nnUNetTrainerUMamba")

    def initialize(self):
        super().initialize()
        self._check_deep_supervision_scales()

    def _check_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return
        net_scales = network_ds_scales(self.network, self.configuration_manager.pool_op_kernel_sizes)
        ours = self._get_deep_supervision_scales()
        if [list(map(float, s)) for s in ours] != net_scales:
            raise RuntimeError(f"{type(self).__name__}: the deep-supervision targets {ours} (from the plans' strides "
                               f"{self.configuration_manager.pool_op_kernel_sizes}) do not match the network's outputs "
                               f"{net_scales}; the plans do not suit {self.arch} (re-create them with medmamba plan)")

    def _get_deep_supervision_scales(self):
        scales = super()._get_deep_supervision_scales()
        if scales is None or self.network is None:
            return scales
        n = len(network_ds_scales(self.network, self.configuration_manager.pool_op_kernel_sizes))
        return scales[:n]  # the network's outputs are a prefix of nnU-Net's targets (checked in initialize)

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net switches DS back on after the final validation; networks trained without it stay off
        super().set_deep_supervision_enabled(bool(enabled) and self.enable_deep_supervision)

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.OPTIMIZER == "sgd" and self.LR_SCHEDULE == "poly":
            return super().configure_optimizers()
        params = self.network.parameters()
        if self.OPTIMIZER == "sgd":
            optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
        elif self.OPTIMIZER == "adam":
            optimizer = torch.optim.Adam(params, self.initial_lr, weight_decay=self.weight_decay)
        elif self.OPTIMIZER == "adamw":
            optimizer = torch.optim.AdamW(params, self.initial_lr, weight_decay=self.weight_decay)
        else:
            raise ValueError(f"{type(self).__name__}: unknown OPTIMIZER {self.OPTIMIZER!r}")
        if self.LR_SCHEDULE == "poly":
            scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        elif self.LR_SCHEDULE == "cosine":
            scheduler = CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.MIN_LR,
                                          t_max=self.COSINE_T_MAX)
        else:
            raise ValueError(f"{type(self).__name__}: unknown LR_SCHEDULE {self.LR_SCHEDULE!r}")
        return optimizer, scheduler

    def _build_loss(self):
        loss = super()._build_loss()
        if self.LOSS_WEIGHTS is not None:
            inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
            inner.weight_ce, inner.weight_dice = self.LOSS_WEIGHTS
        return loss

    def on_train_epoch_start(self):
        self._update_encoder_freeze()
        super().on_train_epoch_start()

    FREEZE_MODULES: tuple | None = None  # submodules frozen by FREEZE_ENCODER_EPOCHS (None: the encoder modules)

    def _encoder_modules(self):
        net = _pretrained.unwrap(self.network)
        names = self.FREEZE_MODULES or ENCODER_MODULES.get(self.arch, ("encoder",))
        out = []
        for m in names:
            try:
                out.append(net.get_submodule(m))
            except AttributeError:
                continue
        return out

    def _update_encoder_freeze(self):
        want = (self.FREEZE_ENCODER_EPOCHS > 0 and self.current_epoch < self.FREEZE_ENCODER_EPOCHS
                and (self.pretrained_weights_loaded or not self.FREEZE_ONLY_IF_PRETRAINED))
        if want == self._encoder_frozen:
            return
        for m in self._encoder_modules():
            for p in m.parameters():
                p.requires_grad_(not want)
        self._encoder_frozen = want
        if self.is_ddp:
            self.network = rewrap_ddp(self.network)
        self.print_to_log_file(f"medmamba: encoder {'frozen' if want else 'unfrozen'} at epoch {self.current_epoch}"
                               + (f" (frozen for the first {self.FREEZE_ENCODER_EPOCHS} epochs)" if want else ""))

    # -- inference ---------------------------------------------------------------------------------
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.TTA_MIRRORING:
            self.inference_allowed_mirroring_axes = None  # saved in the checkpoint: predict skips TTA too
        return out

    # -- pretrained weights ------------------------------------------------------------------------
    def load_pretrained_weights(self, fname, verbose: bool = False) -> dict:
        """Load ``-pretrained_weights`` (nnU-Net or MambaMIM checkpoint) into the network; see
        :mod:`medmamba.nnunet.pretrained`. Raises ``PretrainedWeightsError`` listing offending keys."""
        if not self.was_initialized:
            self.initialize()
        net = _pretrained.unwrap(self.network)
        heads = _pretrained.head_keys_by_rebuild(
            net, lambda n: self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                           self.num_input_channels, n, self.enable_deep_supervision),
            self.label_manager.num_segmentation_heads)
        report = _pretrained.load_weights(net, fname, encoder_modules=ENCODER_MODULES.get(self.arch, ("encoder",)),
                                          head_keys=heads, verbose=verbose,
                                          log=lambda s: self.print_to_log_file(s, also_print_to_console=True))
        self.pretrained_weights_loaded = True
        return report

    def on_train_end(self):
        super().on_train_end()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.tensorboard is not None:
            self.tensorboard.close()


def _builder(arch: str):
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return build_network(arch, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                             enable_deep_supervision)

    build_network_architecture.__doc__ = f"nnU-Net's network builder (training and nnUNetv2_predict): {arch}."
    return staticmethod(build_network_architecture)


# -- one trainer per architecture ----------------------------------------------------------------------
class nnUNetTrainerUMambaBot(nnUNetTrainerMedMamba):
    """U-Mamba Bot with nnU-Net's schedule (as U-Mamba was trained)."""
    arch = "umamba_bot"
    build_network_architecture = _builder("umamba_bot")


class nnUNetTrainerUMamba(nnUNetTrainerUMambaBot):
    """The recommended default: U-Mamba Bot (same as nnUNetTrainerUMambaBot)."""


class nnUNetTrainerUMambaEnc(nnUNetTrainerMedMamba):
    """U-Mamba Enc with nnU-Net's schedule; the network is built for the configuration's patch size."""
    arch = "umamba_enc"
    build_network_architecture = _builder("umamba_enc")


class nnUNetTrainerLightMUNet(nnUNetTrainerMedMamba):
    """LightM-UNet: Adam 1e-4, weight decay 1e-5, poly schedule, no deep supervision (as released)."""
    arch = "lightm_unet"
    build_network_architecture = _builder("lightm_unet")
    OPTIMIZER, INITIAL_LR, WEIGHT_DECAY = "adam", 1e-4, 1e-5
    DEEP_SUPERVISION = False


class nnUNetTrainerSwinUMamba(nnUNetTrainerMedMamba):
    """Swin-UMamba: AdamW 1e-4, weight decay 0.05, cosine to 1e-6, deep supervision; the encoder is frozen
    for the first 10 epochs when pretrained weights were loaded (upstream fine-tunes ImageNet weights)."""
    arch = "swin_umamba"
    build_network_architecture = _builder("swin_umamba")
    OPTIMIZER, INITIAL_LR, WEIGHT_DECAY = "adamw", 1e-4, 0.05
    LR_SCHEDULE, MIN_LR = "cosine", 1e-6
    DEEP_SUPERVISION = True
    FREEZE_ENCODER_EPOCHS = 10
    # as SwinUMamba.freeze_encoder (JiarunLiu/Swin-UMamba @ 50eecc89): the VSS stages and merging layers;
    # the conv stem and the patch embedding (not ImageNet weights) keep training
    FREEZE_MODULES = ("encoder.layers", "encoder.downsamples")


class nnUNetTrainerSwinUMambaD(nnUNetTrainerSwinUMamba):
    """Swin-UMamba-dagger (Mamba decoder), Swin-UMamba's schedule."""
    arch = "swin_umamba_d"
    build_network_architecture = _builder("swin_umamba_d")


class nnUNetTrainerMSVMUNet(nnUNetTrainerMedMamba):
    """MSVM-UNet: AdamW 5e-4, weight decay 1e-3, cosine, loss 0.4 CE + 0.6 Dice, no deep supervision."""
    arch = "msvm_unet"
    build_network_architecture = _builder("msvm_unet")
    OPTIMIZER, INITIAL_LR, WEIGHT_DECAY = "adamw", 5e-4, 1e-3
    LR_SCHEDULE = "cosine"
    DEEP_SUPERVISION = False
    LOSS_WEIGHTS = (0.4, 0.6)


class nnUNetTrainerVMUNetMHS(nnUNetTrainerMedMamba):
    """VM-UNet with Multi-Head Scan, as MHS-VM's released configuration (PixDeep/MHS-VM
    ``configs/config_setting.py`` @ 3e4241e9, ``engine.py``): AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight decay 1e-2; CosineAnnealingLR T_max 50, eta_min 1e-5, stepped once per epoch (so periodic over
    its 300 epochs); no deep supervision."""
    arch = "vm_unet_mhs"
    build_network_architecture = _builder("vm_unet_mhs")
    OPTIMIZER, INITIAL_LR, WEIGHT_DECAY = "adamw", 1e-3, 1e-2
    LR_SCHEDULE, MIN_LR, COSINE_T_MAX = "cosine", 1e-5, 50
    DEEP_SUPERVISION = False


class nnUNetTrainerHyMamba(nnUNetTrainerMedMamba):
    """HyMamba (MambaMIM's build_hybird): AdamW 1e-4, weight decay 1e-5, cosine, no deep supervision. MambaMIM's
    readme fine-tunes with UNETR's BTCV pipeline (Project-MONAI research-contributions UNETR/BTCV), whose
    defaults are AdamW lr 1e-4, weight decay 1e-5 and a warmup-cosine schedule (50 warmup epochs of 5000);
    here cosine without warmup over nnU-Net's epochs, with nnU-Net's patch sampling and augmentation. ``-pretrained_weights``: a file written by ``medmamba weights import --from
    mambamim`` (encoder-only: the decoder stays fresh)."""
    arch = "hymamba"
    build_network_architecture = _builder("hymamba")
    OPTIMIZER, INITIAL_LR, WEIGHT_DECAY = "adamw", 1e-4, 1e-5
    LR_SCHEDULE = "cosine"
    DEEP_SUPERVISION = False


_BASES = [nnUNetTrainerUMamba, nnUNetTrainerUMambaBot, nnUNetTrainerUMambaEnc, nnUNetTrainerLightMUNet,
          nnUNetTrainerSwinUMamba, nnUNetTrainerSwinUMambaD, nnUNetTrainerMSVMUNet, nnUNetTrainerVMUNetMHS,
          nnUNetTrainerHyMamba]


# -- short schedules: <Trainer>_5epochs, <Trainer>_debug, <Trainer>_demo -------------------------------------
def _variant(base, suffix: str, doc: str, **attrs):
    name = f"{base.__name__}_{suffix}"
    cls = type(name, (base,), {"__doc__": doc, "__module__": __name__, "__qualname__": name, **attrs})
    globals()[name] = cls
    return cls


def _follows_plans(arch: str) -> bool:
    return load_preset(arch)["topology"] == "plans"


_VARIANTS = []
for _base in _BASES:
    _VARIANTS.append(_variant(_base, "5epochs", f"{_base.__name__} for 5 epochs (250 iterations each).",
                              NUM_EPOCHS=5))
    _VARIANTS.append(_variant(_base, "debug", f"{_base.__name__} smoke test: 1 epoch of 2 training and 1 validation "
                              "iterations, no test-time mirroring.", NUM_EPOCHS=1, NUM_ITERATIONS=2,
                              NUM_VAL_ITERATIONS=1, TTA_MIRRORING=False))
    _demo = dict(NUM_EPOCHS=4, NUM_ITERATIONS=10, NUM_VAL_ITERATIONS=2, TTA_MIRRORING=False)
    if _follows_plans(_base.arch):  # U-Mamba: half the plans' channels, so the demo fits a CPU
        _demo["PRESET_OVERRIDES"] = {"width_factor": 0.5}
    _VARIANTS.append(_variant(_base, "demo", f"{_base.__name__} for `medmamba demo`: 4 epochs of 10 training and 2 "
                              "validation iterations, no test-time mirroring"
                              + (", half the plans' channels" if "PRESET_OVERRIDES" in _demo else "")
                              + " (minutes on a CPU; not a real schedule).", **_demo))
del _base, _demo

TRAINER_NAMES = [c.__name__ for c in _BASES + _VARIANTS]
# arch -> the trainer for it (used by medmamba.pretrain to build the exact downstream network)
ARCH_TO_TRAINER = {c.arch: c for c in reversed(_BASES)}  # umamba_bot -> nnUNetTrainerUMambaBot
ARCH_TO_TRAINER["umamba_bot"] = nnUNetTrainerUMamba

__all__ += TRAINER_NAMES
