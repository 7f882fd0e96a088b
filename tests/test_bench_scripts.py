"""Smoke tests of the benchmark scripts (scripts/bench_networks.py, bench_scaling.py, bench_all.py).

Tiny sizes on the CPU, in-process, into tmp_path: the files are written with the expected keys, a network
that cannot run at the size gets an error row instead of a crash. No timing assertions.
"""
import json
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)

import bench_all  # noqa: E402
import bench_networks  # noqa: E402
import bench_scaling  # noqa: E402

META_KEYS = {"level", "device_kind", "device", "date", "command", "versions"}
VERSION_KEYS = {"torch", "triton", "monai", "nnunetv2", "dynamic_network_architectures", "medmamba", "python"}


def _check_meta(meta, level):
    assert META_KEYS <= set(meta)
    assert VERSION_KEYS <= set(meta["versions"])
    assert meta["level"] == level and meta["device_kind"] == "cpu"


def test_plans_for_patch_matches_model_card_at_128():
    from model_card import nnunet_plans

    for resenc in (False, True):
        assert bench_networks.plans_for_patch((128, 128, 128), resenc) == nnunet_plans(3, resenc=resenc)
    small = bench_networks.plans_for_patch((16, 32, 32), resenc=True)
    assert small["n_stages"] == len(small["strides"]) == len(small["features_per_stage"]) == 4
    assert small["strides"][-1] == [1, 2, 2] and len(small["n_conv_per_stage_decoder"]) == 3


def test_bench_networks_cpu_tiny(tmp_path, one_thread):
    args = bench_networks.build_parser().parse_args(
        ["--device", "cpu", "--networks", "PlainConvUNet", "umamba_bot", "SwinUNETR", "--patch", "16",
         "--batch-size", "1", "--volume", "16x16x24", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    result = bench_networks.run(args, "pytest")
    assert set(result["files"]) == {"json", "md"}
    data = json.loads((tmp_path / "networks_cpu.json").read_text())
    _check_meta(data["meta"], "networks")
    assert data["config"]["patch"] == [16, 16, 16] and data["config"]["volume"] == [16, 16, 24]
    rows = {r["network"]: r for r in data["rows"]}
    assert list(rows) == ["PlainConvUNet", "umamba_bot", "SwinUNETR"]
    for name in ("PlainConvUNet", "umamba_bot"):
        r = rows[name]
        assert "error" not in r and "train_error" not in r and "infer_error" not in r, r
        for key in ("params_m", "train_ms", "train_peak_gib", "train_voxels_per_s", "infer_s", "infer_peak_gib",
                    "train_x_resenc", "infer_x_resenc"):
            assert key in r, (name, key)
        assert r["train_ms"] > 0 and r["infer_s"] > 0
    assert rows["umamba_bot"]["train_target"].startswith("GPU target")
    # SwinUNETR needs sizes divisible by 32: an error row, not a crash
    assert "train_error" in rows["SwinUNETR"] and "infer_error" in rows["SwinUNETR"]
    assert data["targets"]["assessed"] is False
    assert set(data["reference_h100"]) == {"PlainConvUNet", "ResEnc-M", "SwinUNETR"}
    md = (tmp_path / "networks_cpu.md").read_text()
    assert "reference (issue, H100 2026-11-23)" in md and "| ResEnc-M | 108 | 6.4 | 3.0 |" in md
    assert "83 ms/step, 4.7 GiB, inference 2.4 s" in md  # reference column of the PlainConvUNet row
    assert "GPU target" in md and "| umamba_bot |" in md


def test_bench_scaling_cpu_tiny(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    args = bench_scaling.build_parser().parse_args(
        ["--device", "cpu", "--layer-sizes", "4", "6x8x8", "--infer-sizes", "16", "16x16x32", "--patch", "16",
         "--d-model", "16", "--repeats", "1", "--out", str(tmp_path)])
    bench_scaling.run(args, "pytest")
    for name in ("scaling_cpu.json", "scaling_cpu.md", "scaling_layer_cpu.png", "scaling_inference_cpu.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "scaling_layer_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "scaling_cpu.json").read_text())
    _check_meta(data["meta"], "scaling")
    assert [r["voxels"] for r in data["layer"]] == [64, 384]
    for r in data["layer"]:
        for key in ("fwd_s", "fwd_bwd_s", "fwd_ns_per_voxel", "fwd_bwd_ns_per_voxel", "fwd_peak_gib"):
            assert key in r, key
    assert [r["windows"] for r in data["inference"]] == [1, 3]
    assert all("infer_s" in r and "infer_ns_per_voxel" in r for r in data["inference"])
    assert set(data["fits"]) == {"layer_fwd", "layer_fwd_bwd", "inference", "inference_vs_window_voxels"}
    assert [r["window_voxels"] for r in data["inference"]] == [4096, 3 * 4096]
    assert data["fits"]["layer_fwd"] is not None
    assert "scaling_layer_cpu.png" in (tmp_path / "scaling_cpu.md").read_text()


def test_fit_exponent():
    assert bench_scaling.fit_exponent([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)
    assert bench_scaling.fit_exponent([1, 10], [1, 100]) == pytest.approx(2.0)
    assert bench_scaling.fit_exponent([5], [1]) is None


def test_bench_all_cpu_tiny(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    rc = bench_all.main(["--device", "cpu", "--out", str(tmp_path),
                         "--kernels-args=--shapes 1,4,32 --dtype float32 --repeats 1",
                         "--networks-args=--networks umamba_bot --patch 16 --volume 16 --repeats 1 --warmup 0",
                         "--scaling-args=--layer-sizes 4 --infer-sizes 16 --patch 16 --d-model 16"])
    assert rc == 0
    for name in ("kernels_cpu.json", "kernels_cpu.md", "networks_cpu.json", "networks_cpu.md", "scaling_cpu.json",
                 "scaling_cpu.md", "scaling_layer_cpu.png", "scaling_inference_cpu.png", "bench_all_cpu.json",
                 "bench_all_cpu.md"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "bench_all_cpu.json").read_text())
    _check_meta(summary["meta"], "all")
    assert set(summary["levels"]) == {"kernels", "networks", "scaling"}
    assert all("error" not in v and "level_command" in v for v in summary["levels"].values())
    kernels = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert kernels["rows"] and VERSION_KEYS <= set(kernels["meta"]["versions_all"])
    assert "bench_all.py" in kernels["meta"]["via"]
    nets = json.loads((tmp_path / "networks_cpu.json").read_text())
    assert "bench_all.py" in nets["meta"]["command"] and nets["rows"][0]["network"] == "umamba_bot"


def test_bench_kernels_torch_methods_tiny(one_thread):
    """bench_kernels.py --torch-methods: before (doubling) and after (blocked) agree, rows and table written;
    the doubling scan is patched back out afterwards."""
    import bench_kernels
    from medmamba.kernels import scan_torch

    blocked = scan_torch._blocked_forward
    rows = bench_kernels.bench_torch_methods({"tiny": (1, 8, 100, 4, 2), "tiny N1": (1, 6, 50, 1, 3)}, repeats=1)
    assert scan_torch._blocked_forward is blocked
    assert len(rows) == 2 and all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert {"doubling_fwd_ms", "blocked_fwd_ms", "doubling_fwd_bwd_ms", "blocked_fwd_bwd_ms"} <= set(rows[0])
    md = bench_kernels.torch_methods_markdown({"device": "cpu", "date": "today", "command": "pytest"}, rows)
    assert md.count("\n| tiny") == 2


def test_bench_cpu_inference_table():
    import bench_cpu_inference

    results = {"plain/torch": {"seconds": 10.0, "peak_rss_mib": 2000},
               "umamba_bot/torch": {"seconds": 17.0, "peak_rss_mib": 2500},
               "umamba_bot/onnxruntime": {"error": "export failed"}, "umamba_bot/export": {"seconds": 5.0}}
    md = bench_cpu_inference.table(results)
    assert "| U-Mamba Bot | PyTorch eager | 17.0 | 1.70 | 2500 |" in md
    assert "export failed" in md
