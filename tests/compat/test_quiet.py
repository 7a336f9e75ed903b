"""compat/quiet.py: megatron-core's known-harmless import warnings are silenced by exact
message and category; every other warning still shows, and PYTHONWARNINGS=default shows all."""

from __future__ import annotations

import warnings

from megatron_autothink.compat.quiet import KNOWN_HARMLESS, silence_known_warnings


def test_only_the_listed_messages_and_categories_are_silenced() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        silence_known_warnings()
        silence_known_warnings()  # idempotent
        warnings.warn(
            "Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=2
        )
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back to X",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn(
            "Apex is not installed. Falling back to Torch Norm", RuntimeWarning, stacklevel=2
        )
        warnings.warn("Transformer Engine failed to load its kernels", UserWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == [
        "Apex is not installed. Falling back to Torch Norm",  # another category: shown
        "Transformer Engine failed to load its kernels",  # another message: shown
    ]
    assert len(KNOWN_HARMLESS) == 5


def test_pythonwarnings_default_shows_them_again() -> None:
    """The filters are appended: a user's PYTHONWARNINGS / -W filter (earlier in the list)
    wins. The real emitters (megatron-core's imports) are checked on `autothink train`'s stderr
    in tests/convert/test_export_run.py."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")  # what PYTHONWARNINGS=default installs at start-up
        silence_known_warnings()
        warnings.warn(
            "Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=2
        )
    assert len(seen) == 1
