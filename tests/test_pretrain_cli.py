"""End-to-end ``medmamba pretrain`` on real CT (CPU, tiny networks, 32^3 crops at 4 mm)."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from medmamba.cli import main
from medmamba.pretrain.network import ENCODER_MODULES, build_downstream_network, encoder_state_keys
from medmamba.pretrain.train import PretrainConfig, run_pretraining

DATA = os.environ.get("MEDMAMBA_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
STS_DIR = os.path.join(DATA, "ibsi_sts")
pytestmark = [pytest.mark.skipif(not glob.glob(os.path.join(STS_DIR, "STS_*", "CT_image.nii.gz")),
                                 reason=f"real CT not found under {DATA} (set MEDMAMBA_DATA)"),
              pytest.mark.usefixtures("one_thread")]




TINY = {
    "umamba_bot": {"features_per_stage": [4, 8, 16], "strides": [1, 2, 2], "n_blocks_per_stage": [1, 1, 1]},
    "umamba_enc": {"features_per_stage": [4, 8, 16], "strides": [1, 2, 2], "n_blocks_per_stage": [1, 1, 1],
                   "patch_size": [32, 32, 32]},
    "swin_umamba": {"feature_size": 8, "dims": [8, 16, 32], "depths": [1, 1, 1], "drop_path_rate": 0.0},
}
COMMON = ["--data", STS_DIR, "--patch", "32", "32", "32", "--spacing", "4", "4", "4", "--batch-size", "2",
          "--device", "cpu", "--decoder-width", "32", "--workers", "1", "--no-progress"]


def _scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_cli_pretrain_logs_checkpoints_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["pretrain", "--arch", "umamba_bot", "--out", out, *COMMON, "--net-kwargs", json.dumps(TINY["umamba_bot"]),
            "--lr", "3e-3", "--warmup", "3", "--log-every", "1", "--image-every", "20", "--save-every", "20"]
    assert main([*args, "--steps", "40"]) == 0
    assert "network weights:" in capsys.readouterr().out

    # TensorBoard: loss, learning rate and the image slices
    ea = _scalars(out)
    for tag in ("train/loss", "train/lr", "train/weight_decay", "train/grad_norm", "train/crops_per_s"):
        assert tag in ea.Tags()["scalars"], tag
    for tag in ("images/input", "images/masked", "images/reconstruction"):
        assert tag in ea.Tags()["images"], tag
    loss = [e.value for e in ea.Scalars("train/loss")]
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 41))
    assert np.mean(loss[-8:]) < np.mean(loss[:8]), loss  # the loss falls
    lr = [e.value for e in ea.Scalars("train/lr")]
    assert max(lr) == pytest.approx(3e-3, rel=1e-3) and lr[-1] < 1e-4  # warmup + cosine

    # final checkpoint: strict load; encoder pretrained, decoder = a fresh build with the recorded seed
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["arch"] == "umamba_bot" and ckpt["step"] == 40 and ckpt["pretrain_config"]["mask_ratio"] == 0.75
    target = build_downstream_network("umamba_bot", in_channels=1, out_channels=2, seed=123,
                                      network_kwargs=TINY["umamba_bot"])
    target.load_state_dict(ckpt["network_weights"], strict=True)
    fresh = build_downstream_network("umamba_bot", network_kwargs=TINY["umamba_bot"], seed=ckpt["decoder_init_seed"])
    fresh_sd = fresh.state_dict()
    enc_keys = set(encoder_state_keys(fresh, "umamba_bot"))
    assert set(ckpt["pretrained_keys"]) == enc_keys
    changed = [k for k in enc_keys if not torch.equal(ckpt["network_weights"][k], fresh_sd[k])]
    assert len(changed) > 0.8 * len([k for k in enc_keys if fresh_sd[k].is_floating_point()])
    for k, v in ckpt["network_weights"].items():
        if k not in enc_keys:
            assert torch.equal(v, fresh_sd[k]), k
    # the light decoder of pretraining is not what lands in the segmentation network's decoder
    latest = torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=False)
    assert latest["step"] == 40
    assert not any(k.startswith("decoder.") and not k.startswith("decoder.encoder.") for k in ckpt["pretrained_keys"])

    # an existing run is not overwritten by accident
    assert main([*args, "--steps", "40"]) == 2
    assert "--resume" in capsys.readouterr().err

    # resume continues from step 40 to 50 (same model, optimizer and schedule)
    assert main([*args, "--steps", "50", "--resume"]) == 0
    latest = torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=False)
    assert latest["step"] == 50 and latest["scheduler"]["last_epoch"] == 50
    steps = [e.step for e in _scalars(out).Scalars("train/loss")]
    assert steps == list(range(1, 51))
    assert torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)["step"] == 50

    # --overwrite starts again
    assert main([*args, "--steps", "2", "--overwrite"]) == 0
    assert torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=False)["step"] == 2


@pytest.mark.parametrize("arch", ["umamba_enc", "swin_umamba"])
def test_pretrain_other_architectures(tmp_path, arch):
    s = run_pretraining(PretrainConfig(data=[STS_DIR], arch=arch, out=str(tmp_path), patch=[32, 32, 32],
                                       spacing=[4, 4, 4], batch_size=2, steps=6, device="cpu", decoder_width=16,
                                       workers=0, net_kwargs=TINY[arch], progress=False, lr=1e-3))
    assert all(np.isfinite(s["losses"]))
    ckpt = torch.load(s["final_checkpoint"], weights_only=False)
    net = build_downstream_network(arch, network_kwargs=TINY[arch], seed=5)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    assert ckpt["pretrained_modules"] == list(ENCODER_MODULES[arch])


def _small_plans(path):
    plans = {
        "dataset_name": "Dataset901_Sts", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.27, 0.977, 0.977], "original_median_shape_after_transp": [51, 154, 150],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1501.0, "mean": 42.46, "median": 36.0, "min": -788.0,
                                                              "percentile_00_5": -111.0, "percentile_99_5": 822.0,
                                                              "std": 102.48}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 64, 64], "median_image_size_in_voxels": [51.0, 154.5, 149.5],
            "spacing": [6.0, 3.0, 3.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 4, "features_per_stage": [4, 8, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                                "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                                "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                                "n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }
    path.mkdir(parents=True)
    (path / "nnUNetPlans.json").write_text(json.dumps(plans))
    (path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, "tumour": 1, "oedema": 2},
                                                   "numTraining": 10, "file_ending": ".nii.gz"}))
    return str(path / "nnUNetPlans.json")


def test_pretrain_with_nnunet_plans(tmp_path, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    plans = _small_plans(tmp_path / "Dataset901_Sts")
    out = str(tmp_path / "run")
    assert main(["pretrain", "--data", STS_DIR, "--arch", "umamba_bot", "--plans", plans, "--configuration", "3d_fullres",
                 "--out", out, "--steps", "3", "--batch-size", "2", "--device", "cpu", "--decoder-width", "16",
                 "--workers", "0", "--no-progress"]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["patch_size"] == [16, 64, 64] and ckpt["spacing"] == [6.0, 3.0, 3.0]  # from the plans
    assert ckpt["intensity"]["mode"] == "ct" and ckpt["out_channels"] == 3  # from dataset.json
    net = build_downstream_network("umamba_bot", plans, "3d_fullres", 1, 3, seed=9)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    load_pretrained_weights(net, os.path.join(out, "checkpoint_final.pth"))  # what -pretrained_weights runs
    assert [tuple(o.shape) for o in net(torch.zeros(1, 1, 16, 64, 64))][0] == (1, 3, 16, 64, 64)


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "CT_mask.nii.gz").write_bytes(b"")
    assert main(["pretrain", "--data", str(empty), "--arch", "umamba_bot", "--out", str(tmp_path / "a"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "no CT volumes found" in capsys.readouterr().err
    assert main(["pretrain", "--data", STS_DIR, "--arch", "lightm_unet", "--out", str(tmp_path / "b"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "lightm_unet" in err and "umamba_bot, umamba_enc, swin_umamba" in err
    assert main(["pretrain", "--data", STS_DIR, "--arch", "umamba_bot", "--out", str(tmp_path / "c"),
                 "--device", "cpu", "--resume"]) == 2
    assert "no " in capsys.readouterr().err
