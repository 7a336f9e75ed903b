"""``autothink eval``: greedy generation in auto/long/short thinking modes, scored per difficulty.

:func:`megatron_autothink.eval.runner.evaluate` is the Python entry point (used by the demo);
:mod:`megatron_autothink.eval.summary` holds the pure aggregation functions.
"""
