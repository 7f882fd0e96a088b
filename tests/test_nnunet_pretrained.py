"""-pretrained_weights loading (medmamba.nnunet.pretrained) on small networks: no data needed."""
import pytest
import torch

from medmamba import nets
from medmamba.nnunet import pretrained
from medmamba.nnunet.pretrained import PretrainedWeightsError, load_weights

ENC = ("encoder", "mamba_layer")  # U-Mamba Bot's encoder (what MambaMIM pretrains)


def _net(features=(8, 16, 32), classes=2, seed=0):
    torch.manual_seed(seed)
    return nets.create("umamba_bot", 1, classes, 3, features_per_stage=list(features), strides=[1, 2, 2],
                       deep_supervision=True)


def _save(tmp_path, name, sd, **extra):
    path = tmp_path / name
    torch.save({"network_weights": sd, **extra}, path)
    return str(path)


def _same(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_full_nnunet_checkpoint_of_the_same_architecture(tmp_path):
    src, dst = _net(seed=1), _net(classes=3, seed=2)  # another task: the heads differ
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    # nnU-Net checkpoints may carry DDP / torch.compile prefixes
    path = _save(tmp_path, "full.pth", {"module._orig_mod." + k: v for k, v in src.state_dict().items()})
    heads = {k for k in dst.state_dict() if ".seg_layers." in k}
    report = load_weights(dst, path, encoder_modules=ENC, log=lambda s: None)
    assert report["mode"] == "full" and set(report["skipped_heads"]) == heads
    after = dst.state_dict()
    body = [k for k in after if k not in heads]
    assert _same(after, src.state_dict(), body)
    assert _same(after, before, heads)  # heads stay fresh (nnU-Net's rule: they depend on the task)


def test_encoder_only_mambamim_checkpoint_leaves_the_decoder_fresh(tmp_path):
    src, dst = _net(seed=1), _net(seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    enc = {k: v for k, v in src.state_dict().items() if k.split(".")[0] in ENC}
    assert any(k.startswith("decoder.encoder.") for k in dst.state_dict())  # U-Mamba's decoder holds the encoder
    report = load_weights(dst, _save(tmp_path, "enc.pth", enc), encoder_modules=ENC, log=lambda s: None)
    canonical, _ = pretrained._canonical(dst)  # aliases (e.g. dynamic_network_architectures' all_modules) once
    assert report["mode"] == "encoder" and report["loaded"] == len([k for k in canonical if k in enc])
    after = dst.state_dict()
    assert _same(after, src.state_dict(), enc)
    # the alias decoder.encoder.* is the same module: it carries the pretrained weights too
    assert _same(after, src.state_dict(), [k for k in after if k.startswith("decoder.encoder.")])
    decoder_own = [k for k in after if k.split(".")[0] == "decoder" and not k.startswith("decoder.encoder.")]
    assert decoder_own and _same(after, before, decoder_own)


def test_pretrain_format_with_pretrained_keys(tmp_path):
    """medmamba pretrain's final checkpoint: a full state dict plus the list of its pretrained keys."""
    src, dst = _net(seed=1), _net(seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    keys = [k for k in sd if k.split(".")[0] in ENC]
    load_weights(dst, _save(tmp_path, "mim.pth", sd, pretrained_keys=keys, arch="umamba_bot"), encoder_modules=ENC,
                 log=lambda s: None)
    after = dst.state_dict()
    assert _same(after, sd, keys)
    assert _same(after, before, [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.encoder.")])


def test_mismatches_raise_a_clear_error_listing_the_keys(tmp_path):
    dst = _net()
    # other widths: shape mismatch, listed with both shapes
    path = _save(tmp_path, "wide.pth", _net(features=(8, 16, 64)).state_dict())
    with pytest.raises(PretrainedWeightsError) as err:
        load_weights(dst, path, encoder_modules=ENC, log=lambda s: None)
    msg = str(err.value)
    assert "shape mismatch" in msg and "mamba_layer" in msg and "checkpoint (" in msg and "vs network (" in msg
    # encoder-only checkpoint with one key missing
    enc = {k: v for k, v in _net().state_dict().items() if k.split(".")[0] in ENC}
    gone = sorted(enc)[3]
    del enc[gone]
    with pytest.raises(PretrainedWeightsError, match="missing in the checkpoint") as err:
        load_weights(dst, _save(tmp_path, "enc.pth", enc), encoder_modules=ENC, log=lambda s: None)
    assert gone in str(err.value) and "encoder-only" in str(err.value)
    # renamed keys (another model's naming): missing ones and unknown ones are both listed
    ren = {"backbone." + k: v for k, v in _net().state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as err:
        load_weights(dst, _save(tmp_path, "ren.pth", ren), encoder_modules=ENC, log=lambda s: None)
    assert "missing in the checkpoint" in str(err.value) and "in the checkpoint but not in the network" in str(err.value)
    assert "backbone.decoder." in str(err.value) and "prefix 'backbone.'" in str(err.value)
    # not a checkpoint at all
    torch.save([1, 2, 3], tmp_path / "junk.pth")
    with pytest.raises(PretrainedWeightsError, match="expected a checkpoint dict"):
        load_weights(dst, str(tmp_path / "junk.pth"), log=lambda s: None)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_weights(dst, str(tmp_path / "nope.pth"), log=lambda s: None)


def test_heads_found_by_rebuilding_on_meta():
    net = _net()
    heads = pretrained.head_keys_by_rebuild(net, lambda n: _net(classes=n), 2)
    assert heads == {k for k in net.state_dict() if ".seg_layers." in k}


def test_hook_dispatches_only_our_trainers_networks(tmp_path, monkeypatch):
    import nnunetv2.run.run_training as rt

    calls = []
    monkeypatch.setattr(rt, "load_pretrained_weights", lambda network, fname, verbose=False: calls.append(fname))
    monkeypatch.setattr(pretrained, "_ORIGINAL", None)

    class FakeTrainer:
        def __init__(self):
            self.network = _net()

        def load_pretrained_weights(self, fname, verbose=False):
            calls.append(("ours", fname))

    t = FakeTrainer()
    assert pretrained.install(t) and rt.load_pretrained_weights is pretrained._dispatch
    assert pretrained.install(t)  # idempotent
    rt.load_pretrained_weights(t.network, "a.pth", verbose=True)
    rt.load_pretrained_weights(torch.nn.Linear(2, 2), "b.pth", verbose=True)  # someone else's network
    assert calls == [("ours", "a.pth"), "b.pth"]
