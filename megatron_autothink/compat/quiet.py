"""Known-harmless warnings of the libraries we import, silenced before they are imported.

Every ``autothink`` command that touches megatron-core printed six warnings on its import (issue
#22 item 9), none of which asks the user to do anything. Each filter below matches one exact
message start and category, so any other warning of the same modules, or of ours, still shows:

* ``Transformer Engine and Apex are not installed. Falling back to ...`` / ``Apex is not
  installed. Falling back to Torch Norm`` (``UserWarning``, megatron-core at import): without
  TE and Apex megatron uses its torch implementations, which is what this package runs on CPU
  and with ``model.transformer_impl=local``. The choice that matters is ours and never silent:
  ``models/specs.resolve_backend`` refuses ``transformer_impl=transformer_engine`` or FP8
  without TE before any work starts.
* ``full scope is deprecated. Use empty cuda_graph_scope ...`` (``UserWarning``): megatron-core
  0.16's own ``TransformerConfig`` default (``cuda_graph_scope="full"``) trips its own
  deprecation on every model built; we use no CUDA graphs.
* ``Please use DTensor instead and we are deprecating ShardedTensor`` and ``\\`load_state_dict\\`
  is deprecated`` (``FutureWarning``, torch.distributed.checkpoint called by megatron's
  dist-checkpointing on every checkpoint load): megatron-core's choice, not the user's.

Installed by :func:`megatron_autothink.cli.main` before any command imports torch or megatron,
appended after the interpreter's filters: ``PYTHONWARNINGS=default`` (or ``-W default``) comes
first in the list and shows them all again.
"""

from __future__ import annotations

import warnings

KNOWN_HARMLESS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Transformer Engine and Apex are not installed\. Falling back to ", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning),
    (r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`load_state_dict` is deprecated and will be removed in future versions", FutureWarning),
)
"""(message regex matched at the start of the message, category) of each silenced warning."""


def silence_known_warnings() -> None:
    """Append the filters of :data:`KNOWN_HARMLESS` (idempotent: ``warnings`` does not add a
    filter that is already in the list)."""
    for message, category in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, append=True)
