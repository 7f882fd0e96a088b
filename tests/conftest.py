import os

import torch

# On machines without a GPU the Triton kernels are exercised through Triton's interpreter. This must be
# set before medmamba.kernels first imports its Triton module (Triton reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DATA_DIR = os.environ.get("MEDMAMBA_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which is very slow on busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plans_kwargs(spatial_dims, strides, **extra):
    n = len(strides)
    kw = {"n_stages": n, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(n)],
          "conv_op": f"torch.nn.modules.conv.Conv{spatial_dims}d", "kernel_sizes": [[3] * spatial_dims] * n,
          "strides": strides, "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
          "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{spatial_dims}d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kw.update(extra)
    return kw
