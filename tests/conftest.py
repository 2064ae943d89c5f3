import pytest
import torch

# The tests use tiny tensors: one thread is faster than two threads waiting on each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def decode_in_chunks():
    """``decode(layer, x, chunks, cache)``: ``x`` ``(B, T, n_embd)`` fed through ``cache`` in
    pieces of the sizes in ``chunks`` (checking ``cache.length`` after each), the outputs
    concatenated back to ``(B, T, n_embd)``, to compare with the full pass."""

    def decode(layer, x, chunks, cache):
        outs, start = [], 0
        for size in chunks:
            outs.append(layer(x[:, start : start + size], cache=cache))
            start += size
            assert cache.length == start
        return torch.cat(outs, dim=1)

    return decode
