"""HF weights of a live megatron model, below everything that trains, samples or exports.

* :mod:`.mapping` — the one table of HF <-> megatron names and layouts; pure functions on full
  tensors (``hf_to_megatron_full``, ``megatron_full_to_hf``); ``ConversionError``.
* :mod:`.live` — unwrapping DDP/Float16 wrappers; a chunk's parameters by megatron name.
* :mod:`.load` — ``load_hf_weights``: HF weights into live TP/PP-sharded model chunks
  (``model.init_from``, ``autothink convert hf-to-mcore``).
* :mod:`.gather` — ``iter_hf_weights``: HF-named full tensors out of live chunks (the rollout
  weight sync, the RL engine's start directory, export).
* :mod:`.hf_io` — safetensors reading and sharded writing; :mod:`.hf_config` — HF
  ``config.json`` <-> our model config; :mod:`.assets` — everything but the weights of an HF
  directory (config, tokenizer, processor, chat template).

The offline conversion commands built on these live in :mod:`megatron_autothink.convert`.
Nothing is imported here: megatron-core takes seconds to import.
"""
