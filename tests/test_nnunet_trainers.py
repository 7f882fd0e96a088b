"""Trainer behaviour without data: schedules, compile policy, deep-supervision scales, mixed precision,
TensorBoard logging. (Training on real CT is in test_nnunet_real_data.py.)"""
import copy
import inspect
import math

import pytest
import torch

import medmamba.layers.cross_scan as cross_scan
import medmamba.layers.mamba as mamba
from medmamba import nets
from medmamba.nnunet import trainers as T
from medmamba.nnunet.tensorboard import TensorBoardLogger

from test_nnunet_presets import _plans

BASE_TRAINERS = ["nnUNetTrainerUMamba", "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc", "nnUNetTrainerLightMUNet",
                 "nnUNetTrainerSwinUMamba", "nnUNetTrainerSwinUMambaD", "nnUNetTrainerMSVMUNet",
                 "nnUNetTrainerVMUNetMHS", "nnUNetTrainerHyMamba"]
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 5,
                "file_ending": ".nii.gz"}


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("MEDMAMBA_TENSORBOARD", "1")
    return tmp_path


def _trainer(name, device="cpu", **plans_overrides):
    plans = copy.deepcopy(_plans())
    plans.update({"image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
                  "transpose_backward": [0, 1, 2]})
    plans["continue_training"] = False
    return getattr(T, name)(plans, "3d_fullres", 0, DATASET_JSON, torch.device(device))


def test_trainer_set():
    for name in BASE_TRAINERS:
        for suffix in ("", "_5epochs", "_debug", "_demo"):
            cls = getattr(T, name + suffix)
            assert cls.__module__ == "medmamba.nnunet.trainers" and issubclass(cls, T.nnUNetTrainerMedMamba)
            assert name + suffix in T.TRAINER_NAMES
            # nnU-Net records __init__'s arguments by name: the explicit signature must stay
            assert list(inspect.signature(cls.__init__).parameters) == \
                ["self", "plans", "configuration", "fold", "dataset_json", "device"]
            # the 5-argument staticmethod nnUNetv2_predict calls on the class
            assert isinstance(inspect.getattr_static(cls, "build_network_architecture"), staticmethod)
            assert "plans_manager" in inspect.signature(cls.build_network_architecture).parameters
    assert T.nnUNetTrainerUMamba.arch == "umamba_bot" and T.ARCH_TO_TRAINER["umamba_bot"] is T.nnUNetTrainerUMamba
    assert set(T.ARCH_TO_TRAINER) == set(nets.available())


@pytest.mark.parametrize("name", BASE_TRAINERS)
def test_schedules(name, nnunet_dirs):
    tr = _trainer(name)
    expected = {  # (optimizer, lr, weight decay, schedule, deep supervision)
        "nnUNetTrainerUMamba": ("sgd", 1e-2, 3e-5, "poly", True),
        "nnUNetTrainerUMambaBot": ("sgd", 1e-2, 3e-5, "poly", True),
        "nnUNetTrainerUMambaEnc": ("sgd", 1e-2, 3e-5, "poly", True),
        "nnUNetTrainerLightMUNet": ("adam", 1e-4, 1e-5, "poly", False),
        "nnUNetTrainerSwinUMamba": ("adamw", 1e-4, 0.05, "cosine", True),
        "nnUNetTrainerSwinUMambaD": ("adamw", 1e-4, 0.05, "cosine", True),
        "nnUNetTrainerMSVMUNet": ("adamw", 5e-4, 1e-3, "cosine", False),
        "nnUNetTrainerVMUNetMHS": ("adamw", 1e-3, 1e-2, "cosine", False),
        "nnUNetTrainerHyMamba": ("adamw", 1e-4, 1e-5, "cosine", False),
    }[name]
    assert (tr.OPTIMIZER, tr.initial_lr, tr.weight_decay, tr.LR_SCHEDULE, tr.enable_deep_supervision) == expected
    assert tr.num_epochs == 1000 and tr.num_iterations_per_epoch == 250
    # the configuration in use is adapted in memory (this is what plans.json in the results folder gets)
    conf = tr.plans_manager.plans["configurations"]["3d_fullres"]
    assert conf["architecture"]["network_class_name"] == T.load_preset(tr.arch)["network_class_name"]
    assert tr.configuration_manager.network_arch_class_name == conf["architecture"]["network_class_name"]
    d = _trainer(name + "_debug")
    assert (d.num_epochs, d.num_iterations_per_epoch, d.num_val_iterations_per_epoch, d.TTA_MIRRORING) == (1, 2, 1, False)
    assert _trainer(name + "_5epochs").num_epochs == 5


def test_cosine_scheduler():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    s = T.CosineLRScheduler(opt, 1e-4, 10, 1e-6)
    lrs = []
    for epoch in range(11):
        s.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_compile_follows_nnunet_on_cuda(nnunet_dirs, monkeypatch):
    """The scans are opaque operators, so our trainers keep nnU-Net's default: compile on CUDA unless
    nnUNet_compile=f (a CUDA trainer can be constructed without a GPU; only the decision is checked)."""
    monkeypatch.delenv("nnUNet_compile", raising=False)
    with pytest.warns(Warning) if not torch.cuda.is_available() else _nullcontext():
        tr = _trainer("nnUNetTrainerUMamba", device="cuda")
    assert tr._do_i_compile() is True
    monkeypatch.setenv("nnUNet_compile", "f")
    assert tr._do_i_compile() is False
    assert _trainer("nnUNetTrainerUMamba")._do_i_compile() is False  # CPU: nnU-Net never compiles


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_deep_supervision_scales_follow_the_network():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    swin = nets.create("swin_umamba", 1, 2, 3, feature_size=8, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                       deep_supervision=True)
    assert T.network_ds_scales(swin, strides) == [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3]
    umamba = nets.create("umamba_bot", 1, 2, 3, features_per_stage=[8, 16, 32], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]])
    assert T.network_ds_scales(umamba, [[1, 1, 1], [1, 2, 2], [2, 2, 2]]) == [[1.0] * 3, [1.0, 0.5, 0.5]]


# tiny versions of every network: do the Mamba scans stay float32 under autocast?
TINY = {
    "umamba_bot": dict(features_per_stage=[8, 16, 32, 64], strides=[1, 2, 2, 2]),
    "umamba_enc": dict(features_per_stage=[8, 16, 32, 64], strides=[1, 2, 2, 2], patch_size=(32, 32, 32)),
    "lightm_unet": dict(init_filters=8),
    "swin_umamba": dict(feature_size=8, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
    "swin_umamba_d": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depth=1),
    "msvm_unet": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1)),
    "vm_unet_mhs": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1)),
    "hymamba": dict(channels=(4, 8, 8, 12, 12), depths=(1, 1, 1, 1, 1), mamba_depth=1, img_size=32),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_mixed_precision_keeps_the_scan_fp32(arch, monkeypatch, one_thread):
    """nnU-Net autocasts on CUDA; here CPU bfloat16 autocast stands in: every selective scan must get
    float32 inputs with autocast off, and the logits must be finite."""
    seen = []

    def spy(fn):
        def wrapped(u, delta, A, B, C, *args, **kwargs):
            seen.append({t.dtype for t in (u, delta, A, B, C)} | {torch.is_autocast_enabled("cpu")})
            return fn(u, delta, A, B, C, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(mamba, "selective_scan", spy(mamba.selective_scan))
    monkeypatch.setattr(cross_scan, "selective_scan", spy(cross_scan.selective_scan))
    torch.manual_seed(0)
    net = nets.create(arch, 1, 2, 3, deep_supervision=True, **TINY[arch]).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 1, 32, 32, 32))
    assert seen and all(s == {torch.float32, False} for s in seen), seen
    for o in out if isinstance(out, list) else [out]:
        assert torch.isfinite(o.float()).all()


def test_tensorboard_logger_through_nnunets_metalogger(tmp_path):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    meta = MetaLogger(str(tmp_path), False)
    tb = TensorBoardLogger(str(tmp_path / "tensorboard"))
    meta.loggers.append(tb)
    meta.update_config({"trainer": "x"})
    for epoch in range(2):
        meta.log("epoch_start_timestamps", 100.0 + epoch * 10, epoch)
        meta.log("lrs", 0.01 / (epoch + 1), epoch)
        meta.log("train_losses", 1.0 - epoch * 0.1, epoch)
        meta.log("val_losses", 0.9 - epoch * 0.1, epoch)
        meta.log("mean_fg_dice", 0.5 + epoch * 0.1, epoch)
        meta.log("dice_per_class_or_region", [0.4 + epoch * 0.1, float("nan")], epoch)
        meta.log("epoch_end_timestamps", 103.5 + epoch * 10, epoch)
    meta.log_summary("final_val/foreground_dice", 0.7)
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    scalars = {t: [(e.step, round(e.value, 6)) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    assert scalars["loss/train"] == [(0, 1.0), (1, 0.9)]
    assert scalars["loss/val"] == [(0, 0.9), (1, 0.8)]
    assert scalars["lr"] == [(0, 0.01), (1, 0.005)]
    assert scalars["pseudo_dice/mean"] == [(0, 0.5), (1, 0.6)]
    assert scalars["pseudo_dice/ema"][0] == (0, 0.5)  # nnU-Net's moving average, logged by the MetaLogger
    assert scalars["pseudo_dice/class_1"] == [(0, 0.4), (1, 0.5)] and "pseudo_dice/class_2" not in scalars  # NaN
    assert scalars["time/epoch_s"] == [(0, 3.5), (1, 3.5)]
    assert scalars["final_val/foreground_dice"] == [(1, 0.7)]
    assert any(t.startswith("config/trainer") for t in ea.Tags()["tensors"])
