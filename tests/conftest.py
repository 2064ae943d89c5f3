import pytest
import torch

# The tests use tiny tensors: one thread is faster than two threads waiting on each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
