"""HF -> our megatron model gives transformers' logits; megatron -> HF gives back the same bits.

Tiny random fp32 Qwen2.5-VL models (tied and untied embeddings; GQA 4/2, 4/1, 4/4; hidden sizes
80/96/112; a vision tower with one window-attention and one full-attention block; two images
whose merged grids span several windows) are loaded into our model at TP=1 and TP=2 (gloo ranks)
with :func:`load_hf_weights`, run on the same text+image batch as transformers (positions from
transformers' ``get_rope_index``), and exported again with :func:`iter_hf_weights`.

This is also the check of our vision tower and mRoPE against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_autothink.config import ModelConfig
from megatron_autothink.weights.hf_config import model_config_from_hf, read_hf_config
from megatron_autothink.weights.mapping import canonical_hf_name
from tests.convert.hf_utils import TinySpec, VLInputs, hf_logits, save_hf_model, vl_inputs
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist

LOGITS_ATOL = 1e-4
TP1_SPECS = [
    TinySpec(heads=4, kv_heads=2, head_dim=24, tie=True, mrope_section=(2, 4, 6)),
    TinySpec(heads=4, kv_heads=1, head_dim=20, tie=False, mrope_section=(2, 3, 5), seed=1),
    TinySpec(heads=4, kv_heads=4, head_dim=28, tie=False, mrope_section=(4, 4, 6), seed=2),
]
PP_SPEC = TinySpec(heads=4, kv_heads=2, layers=4, tie=True, seed=7)  # 4 layers: PP=2 x VPP=2
TP2_SPECS = [  # kv_heads must be divisible by TP
    TinySpec(heads=4, kv_heads=2, head_dim=24, tie=False, mrope_section=(2, 4, 6), seed=3),
    TinySpec(heads=4, kv_heads=4, head_dim=28, tie=True, mrope_section=(4, 4, 6), seed=4),
]


@dataclass(frozen=True)
class Phase:
    """One parallel layout and the HF models to run through it."""

    tp: int
    pp: int
    vpp: int | None
    cases: list[tuple[str, ModelConfig, VLInputs]]
    forward: bool  # compare logits (single pipeline stage only)


def _parity_worker(phases: list[Phase]) -> list:
    """On each rank, per phase: load every HF dir into this layout, run it, export it.

    One spawn serves all layouts (spawning ranks costs more than the tiny models): megatron's
    groups are rebuilt between phases on the same gloo world.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_autothink.convert.runtime import conversion_context
    from megatron_autothink.train.setup import build_model_chunks
    from megatron_autothink.weights.gather import iter_hf_weights
    from megatron_autothink.weights.hf_io import HFCheckpoint
    from megatron_autothink.weights.live import unwrap
    from megatron_autothink.weights.load import load_hf_weights

    dist.init_process_group("gloo")  # kept across phases; conversion_context reuses it
    out = []
    for ph in phases:
        results = []
        with conversion_context(ph.cases[0][1], tp=ph.tp, pp=ph.pp, vpp=ph.vpp) as (run, ctx):
            for hf_dir, model_cfg, x in ph.cases:
                cfg = run.model_copy(update={"model": model_cfg})
                chunks = build_model_chunks(
                    cfg,
                    ctx,
                    vocab_size=model_cfg.vocab_size,
                    image_token_id=model_cfg.image_token_id,
                )
                res: dict = {
                    "loaded": load_hf_weights(chunks, HFCheckpoint(hf_dir), model_cfg, ctx)
                }
                models = [unwrap(c) for c in chunks]
                res["chunk_layers"] = [
                    [layer.layer_number for layer in m.language_model.decoder.layers]
                    for m in models
                ]
                last = models[-1].language_model
                if last.post_process and model_cfg.tie_word_embeddings and ph.pp > 1:
                    res["tied_copy"] = last.output_layer.weight.detach().clone()
                if ph.forward:
                    model = models[0].eval()
                    with torch.no_grad():
                        logits = model(
                            x.input_ids,
                            x.position_ids,
                            None,  # causal
                            pixel_values=x.pixel_values,
                            image_grid_thw=x.image_grid_thw,
                        )
                    res["logits"] = gather_from_tensor_model_parallel_region(logits)[
                        ..., : model_cfg.vocab_size
                    ]
                    res["local_vocab_rows"] = (
                        model.language_model.embedding.word_embeddings.weight.shape[0]
                    )
                res["exported"] = {n: t.clone() for n, t in iter_hf_weights(chunks, model_cfg, ctx)}
                results.append(res)
        out.append(results)  # conversion_context tore down megatron's groups, not the world
    return out


def _make_cases(specs: list[TinySpec], root: Path) -> tuple[list, list]:
    cases: list[tuple[str, ModelConfig, VLInputs]] = []
    refs: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    for spec in specs:
        d = root / f"tp{len(cases)}-{spec.label}"
        hf = save_hf_model(spec, d)
        x = vl_inputs(hf, seed=spec.seed)
        model_cfg = model_config_from_hf(read_hf_config(d))
        refs.append((hf_logits(hf, x), load_file(d / "model.safetensors")))
        cases.append((str(d), model_cfg.model_copy(update={"transformer_impl": "local"}), x))
    return cases, refs


def _check(ranks: list[list[dict]], refs: list, specs: list[TinySpec], label: str) -> None:
    for rank, results in enumerate(ranks):
        for spec, res, (ref_logits, ref_tensors) in zip(specs, results, refs, strict=True):
            if "logits" in res:
                diff = (res["logits"] - ref_logits).abs().max().item()
                print(f"{label} rank {rank} {spec.label}: max |logits - HF| = {diff:.2e}")
                assert diff <= LOGITS_ATOL, (spec.label, diff)
            exported = res["exported"]
            assert set(exported) == {canonical_hf_name(n) for n in ref_tensors}
            for name, t in ref_tensors.items():
                assert torch.equal(exported[canonical_hf_name(name)], t), (spec.label, name)


def test_logits_match_transformers_and_export_is_bit_exact(tmp_path: Path) -> None:
    tp1_cases, tp1_refs = _make_cases(TP1_SPECS, tmp_path / "tp1")
    tp2_cases, tp2_refs = _make_cases(TP2_SPECS, tmp_path / "tp2")
    pp_cases, pp_refs = _make_cases([PP_SPEC], tmp_path / "pp")
    ranks = run_distributed(
        _parity_worker,
        2,
        [
            Phase(tp=1, pp=1, vpp=None, cases=tp1_cases, forward=True),  # 2 DP replicas
            Phase(tp=2, pp=1, vpp=None, cases=tp2_cases, forward=True),
            Phase(tp=1, pp=2, vpp=2, cases=pp_cases, forward=False),
        ],
    )
    _check([r[0] for r in ranks], tp1_refs, TP1_SPECS, "TP=1")
    _check([r[1] for r in ranks], tp2_refs, TP2_SPECS, "TP=2")
    _check([r[2] for r in ranks], pp_refs, [PP_SPEC], "PP=2/VPP=2")
    # VOCAB=1100 pads to 1152 rows at TP=1 and to 1280 (640 per rank) at TP=2.
    assert all(res["local_vocab_rows"] == 1152 for r in ranks for res in r[0])
    assert all(res["local_vocab_rows"] == 640 for r in ranks for res in r[1])
    # Interleaved layout: rank 0 holds global layers 1 and 3 (1-based), rank 1 layers 2 and 4.
    assert [r[2][0]["chunk_layers"] for r in ranks] == [[[1], [3]], [[2], [4]]]
    # The last stage's copy of the tied embedding was loaded (and was not exported twice).
    embed = pp_refs[0][1]["model.embed_tokens.weight"]
    tied = ranks[1][2][0]["tied_copy"]
    assert torch.equal(tied[: embed.shape[0]], embed) and not tied[embed.shape[0] :].any()
