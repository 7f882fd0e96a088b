"""Plans presets (medmamba.nnunet.presets, `medmamba plan`) on synthetic nnU-Net plans: no data needed."""
import copy
import json

import pytest

from medmamba.nnunet import presets
from medmamba.nnunet.cli import add_parsers
from medmamba.nnunet.presets import PresetError, adapt_configuration, apply_preset, load_preset

ARCHS = ["umamba_bot", "umamba_enc", "lightm_unet", "swin_umamba", "swin_umamba_d", "msvm_unet", "vm_unet_mhs",
         "hymamba"]


def _plans():
    """nnU-Net 2.8 plans as planned for the IBSI sarcoma CTs (3d_fullres, 2d, and an inheriting config)."""
    def arch(dims, strides, kernels, feats):
        n = len(strides)
        return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": n, "features_per_stage": feats, "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
                                "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
                                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    s3 = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    k3 = [[1, 3, 3]] + [[3, 3, 3]] * 5
    return {
        "dataset_name": "Dataset901_Sarcoma", "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 11, "patch_size": [160, 160],
                   "architecture": arch(2, [[1, 1]] + [[2, 2]] * 5, [[3, 3]] * 6, [32, 64, 128, 256, 512, 512])},
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [56, 160, 160],
                           "spacing": [3.27, 0.977, 0.977],
                           "architecture": arch(3, s3, k3, [32, 64, 128, 256, 320, 320])},
            "3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4},
        },
    }


def test_every_architecture_has_a_preset():
    assert presets.available_presets() == sorted(ARCHS)
    for arch in ARCHS:
        p = load_preset(arch)
        assert p["arch"] == arch and p["topology"] in ("plans", "fixed") and p["trainer"].startswith("nnUNetTrainer")
        # by class name too
        assert load_preset(p["network_class_name"].rsplit(".", 1)[1])["arch"] == arch
    with pytest.raises(PresetError, match="available"):
        load_preset("unet_of_the_future")


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_preset(arch):
    plans = _plans()
    before = copy.deepcopy(plans)
    out = apply_preset(plans, arch, plans_name=f"nnUNetPlans_{arch}")
    assert plans == before, "the input plans must not be modified"
    preset = load_preset(arch)
    assert out["plans_name"] == f"nnUNetPlans_{arch}"
    for c in ("2d", "3d_fullres"):
        conf = out["configurations"][c]
        assert conf["architecture"]["network_class_name"] == preset["network_class_name"]
        assert conf["data_identifier"] == before["configurations"][c]["data_identifier"]  # no re-preprocessing
        kw = conf["architecture"]["arch_kwargs"]
        if preset["topology"] == "fixed":
            assert kw["strides"] == [[s] * len(conf["patch_size"]) for s in preset["strides"]]
            assert all(p % preset["patch_size_divisor"] == 0 for p in conf["patch_size"])
            assert len(kw["kernel_sizes"]) == len(kw["features_per_stage"]) == kw["n_stages"] == len(preset["strides"])
        else:
            assert kw["strides"] == before["configurations"][c]["architecture"]["arch_kwargs"]["strides"]
            assert conf["patch_size"] == before["configurations"][c]["patch_size"]
        assert ("patch_size" in kw) == bool(preset.get("pass_patch_size"))
    # the inheriting configuration keeps inheriting (and so gets the adapted architecture)
    assert out["configurations"]["3d_fullres_bs4"] == {"inherits_from": "3d_fullres", "batch_size": 4}
    # idempotent: adapting adapted plans changes nothing (trainers re-apply it in memory)
    assert apply_preset(out, arch) == out
    # a trainer adapts only its own configuration; an inheriting one then gets its own adapted values
    only = apply_preset(plans, arch, configurations=["3d_fullres_bs4"])
    assert only["configurations"]["3d_fullres"] == before["configurations"]["3d_fullres"]
    child = only["configurations"]["3d_fullres_bs4"]
    assert child["architecture"] == out["configurations"]["3d_fullres"]["architecture"] and child["batch_size"] == 4
    assert child["patch_size"] == out["configurations"]["3d_fullres"]["patch_size"]


def test_patch_rounding_and_overrides():
    conf = _plans()["configurations"]["3d_fullres"]
    a = adapt_configuration(conf, "swin_umamba")
    assert a["patch_size"] == [64, 160, 160]  # 56 -> nearest multiple of 32
    assert adapt_configuration(conf, "lightm_unet")["patch_size"] == [56, 160, 160]  # already a multiple of 8
    r = adapt_configuration(conf, "umamba_bot", patch_size=[32, 64, 64], batch_size=1, n_stages=4,
                            features_per_stage=[8, 16, 32, 64])
    kw = r["architecture"]["arch_kwargs"]
    assert r["patch_size"] == [32, 64, 64] and r["batch_size"] == 1
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [8, 16, 32, 64] and len(kw["strides"]) == 4
    assert len(kw["n_conv_per_stage_decoder"]) == 3
    e = adapt_configuration(conf, "umamba_enc", patch_size=[32, 64, 64], n_stages=4)
    assert e["architecture"]["arch_kwargs"]["patch_size"] == [32, 64, 64]
    with pytest.raises(PresetError, match="divisible"):
        adapt_configuration(conf, "umamba_bot", patch_size=[30, 64, 64])
    with pytest.raises(PresetError, match="divisible by 32"):
        adapt_configuration(conf, "swin_umamba", patch_size=[48, 64, 64])
    with pytest.raises(PresetError, match="fixed topology"):
        adapt_configuration(conf, "msvm_unet", n_stages=4)
    with pytest.raises(PresetError, match="fixed widths"):
        adapt_configuration(conf, "lightm_unet", features_per_stage=[8, 16, 32, 64])
    w = adapt_configuration(conf, "umamba_bot", width_factor=0.25)
    assert w["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 80, 80]
    with pytest.raises(PresetError, match="configuration '2d'"):
        apply_preset(_plans(), "umamba_bot", patch_size=[32, 64, 64])  # 3 axes for a 2d configuration


def _run_cli(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="medmamba")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_medmamba_plan_writes_next_to_plans(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "Dataset901_Sarcoma"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    for dataset in ("901", "Dataset901_Sarcoma"):
        rc = _run_cli(["plan", dataset, "--arch", "swin_umamba", "--overwrite"])
        assert rc == 0
    out = folder / "nnUNetPlans_swin_umamba.json"
    plans = json.loads(out.read_text())
    assert plans["plans_name"] == out.stem
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [64, 160, 160]
    assert "nnUNetv2_train Dataset901_Sarcoma 3d_fullres 0 -tr nnUNetTrainerSwinUMamba -p nnUNetPlans_swin_umamba" \
        in capsys.readouterr().out
    # refuses to overwrite, leaves the file and no temporary files behind
    mtime = out.stat().st_mtime_ns
    assert _run_cli(["plan", "901", "--arch", "swin_umamba"]) == 2
    assert "exists" in capsys.readouterr().err and out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json", "nnUNetPlans_swin_umamba.json"]
    # reduced preset for one configuration, under a chosen name
    assert _run_cli(["plan", "901", "--arch", "umamba_bot", "-c", "3d_fullres", "--patch-size", "32", "64", "64",
                     "--batch-size", "1", "--n-stages", "4", "--name", "nnUNetPlans_ci"]) == 0
    ci = json.loads((folder / "nnUNetPlans_ci.json").read_text())
    assert ci["plans_name"] == "nnUNetPlans_ci" and ci["configurations"]["3d_fullres"]["batch_size"] == 1
    assert ci["configurations"]["2d"]["architecture"]["network_class_name"].endswith("PlainConvUNet")  # untouched
    # errors
    assert _run_cli(["plan", "902", "--arch", "umamba_bot"]) == 2
    assert "Dataset902" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_preprocessed")
    assert _run_cli(["plan", "901", "--arch", "umamba_bot"]) == 2
    assert "nnUNet_preprocessed" in capsys.readouterr().err
