"""CPU cost of one nnU-Net training step and one inference tile per trainer (docs/nnunet.md).

Builds every trainer's network from a dataset's real ``nnUNetPlans.json`` adapted to the reduced CPU
presets used in the tests, then times (batch 1) one forward+backward with nnU-Net's loss and one
inference forward at the patch size. Usage::

    nnUNet_preprocessed=... python -m medmamba.nnunet.cpu_timings Dataset901_Sarcoma
"""
import json
import os
import sys
import time

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medmamba.nnunet import trainers as T
from medmamba.nnunet.presets import apply_preset

REDUCED = {"umamba_bot": dict(patch_size=[32, 64, 64], n_stages=4, features_per_stage=[8, 16, 32, 64]),
           "umamba_enc": dict(patch_size=[32, 64, 64], n_stages=4, features_per_stage=[8, 16, 32, 64]),
           "lightm_unet": dict(patch_size=[32, 64, 64]), "swin_umamba": dict(patch_size=[32, 64, 64]),
           "swin_umamba_d": dict(patch_size=[32, 64, 64]), "msvm_unet": dict(patch_size=[32, 64, 64]),
           "vm_unet_mhs": dict(patch_size=[32, 64, 64]), "hymamba": dict(patch_size=[32, 64, 64])}


def main(dataset):
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("| trainer | patch | params (M) | train step (s) | inference tile (s) |")
    print("|---|---|---:|---:|---:|")
    for arch, over in REDUCED.items():
        cls = T.ARCH_TO_TRAINER[arch]
        pm = PlansManager(apply_preset(plans, arch, configurations=["3d_fullres"], batch_size=1, **over))
        cm = pm.get_configuration("3d_fullres")
        ds = bool(T.load_preset(arch)["deep_supervision"])
        net = cls.build_network_architecture(pm, cm, 1, 2, ds)
        x = torch.randn(1, 1, *cm.patch_size)
        opt = torch.optim.SGD(net.parameters(), 1e-3)

        def step():
            out = net(x)
            outs = out if isinstance(out, list) else [out]
            loss = sum(o.float().square().mean() for o in outs)
            opt.zero_grad()
            loss.backward()
            opt.step()

        net.train()
        step()  # warm-up
        train_s = []
        for _ in range(2):  # the faster of two: the cores are shared
            t = time.perf_counter()
            step()
            train_s.append(time.perf_counter() - t)
        train_s = min(train_s)
        net.eval()
        net.decoder.deep_supervision = False
        with torch.no_grad():
            net(x)
            infer_s = []
            for _ in range(2):
                t = time.perf_counter()
                net(x)
                infer_s.append(time.perf_counter() - t)
            infer_s = min(infer_s)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {cls.__name__} | {'x'.join(map(str, cm.patch_size))} | {params:.2f} | {train_s:.2f} | {infer_s:.2f} |",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "Dataset901_Sarcoma")
