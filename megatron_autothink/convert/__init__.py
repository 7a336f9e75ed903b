"""Checkpoint conversion between HF Qwen2.5-VL and our megatron model (issue 7).

* :mod:`.mapping` — the one table of names and layouts; pure functions on full tensors
  (``hf_to_megatron_full``, ``megatron_full_to_hf``).
* :mod:`.load` — ``load_hf_weights``: HF weights into live TP/PP-sharded model chunks.
* :mod:`.gather` — ``iter_hf_weights``: HF-named full tensors out of live chunks (export and the
  rollout weight sync).
* :mod:`.hf_to_mcore` / :mod:`.mcore_to_hf` — offline conversions; :mod:`.cli` their commands.

Nothing is imported here, so ``python -m megatron_autothink.convert.cli --help`` stays fast
(megatron-core takes seconds to import); import the submodules directly.
"""
