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
