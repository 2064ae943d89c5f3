"""The argument checks every module shares, each raising ``ValueError`` that names the argument.

    check_positive_int("n_head", n_head)  # ValueError: n_head must be a positive integer, got 0

They run where values enter (constructors, configs, ``generate``, data loading, the command
line, a public function's arguments) and read Python values only, never tensor contents, so
they never wait for the device.
"""


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_ints(**values) -> None:
    """``check_positive_int`` for each ``name=value``, in order."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_non_negative_int(name: str, value, meaning: str = "") -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= 0 (not a bool);
    ``meaning`` (e.g. ``"0: one per core"``) goes into the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        note = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be an integer >= 0{note}, got {value!r}")
