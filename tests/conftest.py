import os
import sys

import pytest
import torch

# Tests import the packages from the checkout even without an editable install.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
