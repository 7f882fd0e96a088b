"""Published checkpoints in, medmamba state dicts out (``medmamba weights import``).

An integration layer: it imports ``medmamba.nets`` (never the reverse). Each converter takes the state
dict of an OFFICIAL checkpoint (key names and tensor layouts of the official code, read from the
repositories listed in ``docs/model_card.md``), builds our network for it and returns a state dict of
ours that loads strictly and computes what the official network computes from the same weights.

API:

* ``convert(source, ckpt, arch, spatial_dims=None, net_kwargs=None, seed=0, inflate="average")``
  -> ``Converted(state_dict, arch, net_kwargs, spatial_dims, notes)``. ``ckpt``: a path or an already
  loaded checkpoint object. ``source``: one of :data:`SOURCES`.
* ``save(converted, out, overwrite=False, source=..., ckpt_name=...)``: writes ``{"network_weights":
  state dict, "medmamba_weights": {...}}`` atomically (temporary file + rename); refuses an existing
  file unless ``overwrite``. That file is what ``nnUNetv2_train ... -pretrained_weights`` (our trainers,
  and nnU-Net's own loader: every key present) and ``medmamba bundle create --checkpoint`` read.
* ``inflate_2d_to_3d``: the documented 2D -> 3D inflation used for our 3D variants of 2D-only networks.
* ``CheckpointError``: unreadable file, checkpoint of another network, missing keys (named).

Sources: ``umamba`` (bowang-lab/U-Mamba nnU-Net fork ``checkpoint_final.pth``: UMambaBot/UMambaEnc 2D
or 3D), ``lightm_unet`` (MrBlankness/LightM-UNet nnU-Net fork), ``swin_umamba`` (JiarunLiu/Swin-UMamba
nnU-Net fork: ``SwinUMamba`` into ``swin_umamba``, ``SwinUMambaD`` into ``swin_umamba_d``), ``vmamba``
(MzeroMiko/VMamba v0 ImageNet ``vssm_tiny``-style ``{"model": ...}``: the Swin-UMamba / Swin-UMamba-D
encoder, loaded the way their ``load_pretrained_ckpt`` does), ``msvm_unet`` (gndlwch2w/msvm-unet),
``mhs_vm`` (PixDeep/MHS-VM ``VMUNet``: into ``vm_unet_mhs``), ``vm_unet`` (JCruan519/VM-UNet ``VMUNet``,
or the VMamba ImageNet weights its ``load_from`` reads: into ``vm_unet_mhs`` with ``mixer="ss2d"``). All
of these are 2D upstream except U-Mamba / LightM-UNet; ``spatial_dims=3`` inflates the 2D weights into our
3D variant (:func:`inflate_2d_to_3d`; tensors without a 3D rule keep their seeded initialisation and are
named in the notes). ``mambamim`` (FengheTan9/MambaMIM): its HyMamba checkpoints (the encoder-only
``*_timm_style.pth`` the readme publishes, the ``{"module": ...}`` pretraining file, or a fine-tuned
``Hybird`` state dict) into ``hymamba``, key for key; pretraining-only tensors (mask tokens, the light
decoder) are dropped and an encoder-only file leaves the segmentation decoder seeded, both listed in
the notes. ``REFUSED`` (sources recognised but not convertible) is empty.
"""
from medmamba.weights.convert import (CheckpointError, Converted, REFUSED, SOURCES, clean_key, convert,
                                      extract_state_dict, inflate_2d_to_3d, load_checkpoint, save)

__all__ = ["CheckpointError", "Converted", "REFUSED", "SOURCES", "clean_key", "convert", "extract_state_dict",
           "inflate_2d_to_3d", "load_checkpoint", "save"]
