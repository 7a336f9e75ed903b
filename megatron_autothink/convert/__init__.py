"""Checkpoint conversion commands between HF Qwen2.5-VL and our megatron checkpoints (issue 7).

* :mod:`.hf_to_mcore` / :mod:`.mcore_to_hf` — the offline conversions; :mod:`.cli` their
  commands; :mod:`.source` — what a checkpoint directory holds (side-car, tokenizer, stage);
  :mod:`.runtime` — the process groups a conversion builds its model in.

The name map, loading and gathering of live weights they share with training and the rollout
weight sync are one layer down, in :mod:`megatron_autothink.weights`.

Nothing is imported here, so ``python -m megatron_autothink.convert.cli --help`` stays fast
(megatron-core takes seconds to import); import the submodules directly.
"""
