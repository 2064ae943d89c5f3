"""``attnbook.calls.CallLog``: the operations a computation runs, with their first shapes."""

import torch

from attnbook.calls import CallLog


def test_call_log_records_each_operation_with_its_first_shape_and_changes_nothing():
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    with CallLog() as log:
        out = (a @ b).relu()
    assert log.calls == [("mm", (2, 3)), ("relu", (2, 4))]
    assert torch.equal(out, (a @ b).relu())


def test_a_repeat_interleave_shows_its_copy():
    k = torch.randn(1, 2, 5, 8)
    with CallLog() as log:
        k.repeat_interleave(4, dim=1)
    assert ("clone", (1, 2, 4, 5, 8)) in log.calls  # the 4 copies of each head, made once
