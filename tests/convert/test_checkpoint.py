"""HF dir -> megatron dist-checkpoint -> (resharded) -> HF dir, through the real entry points.

* ``test_hf_to_mcore_at_pp2_then_export_at_tp2``: on one 2-rank world, ``hf_to_mcore`` builds
  two pipeline stages (each reads only its layers; the tied embedding's last-stage copy is
  loaded but saved once), then ``mcore_to_hf`` reloads the checkpoint at TP=2 (vocabulary
  re-padded from 1152 to 1280 rows) and gathers it. The HF directory loads in transformers and
  gives the original logits; every tensor is bit-identical to the source.
* ``test_cli_roundtrip_through_tp2_pp2_checkpoint`` (slow): the CLI converts HF -> megatron; four
  ranks load that checkpoint at TP=2/PP=2 (resharding, vocabulary re-padding 1152 -> 1280),
  compute logits through the two pipeline stages, save a TP=2/PP=2 checkpoint and export it
  distributed; the CLI exports the TP=2/PP=2 checkpoint again in one process. Both HF
  directories load in transformers and reproduce the megatron logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_autothink.checkpoint_io import manifest
from megatron_autothink.weights.hf_io import HFCheckpoint
from megatron_autothink.weights.mapping import canonical_hf_name
from tests.convert.hf_utils import TinySpec, VLInputs, hf_logits, save_hf_dir, vl_inputs
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _convert_worker(hf_dir: str, mcore: str, out: str) -> None:
    """hf-to-mcore built as two pipeline stages, then mcore-to-hf at TP=2, on one 2-rank world."""
    import torch.distributed as dist

    from megatron_autothink.convert.hf_to_mcore import hf_to_mcore
    from megatron_autothink.convert.mcore_to_hf import mcore_to_hf

    dist.init_process_group("gloo")  # both conversions reuse it (as under torchrun)
    hf_to_mcore(hf_dir, mcore, pp=2, progress=False)
    mcore_to_hf(mcore, out, tp=2, max_shard_size="300KB", progress=False)


def _load_hf(path: Path) -> object:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _assert_same_tensors(exported: Path, source: Path) -> None:
    src = {canonical_hf_name(k): v for k, v in load_file(source / "model.safetensors").items()}
    out = HFCheckpoint(exported)
    assert {canonical_hf_name(k) for k in out} == set(src)
    assert all(
        k.startswith(("model.layers.", "model.embed", "model.norm", "visual.", "lm_head"))
        for k in out
    )
    for name in out:
        assert torch.equal(out[name], src[canonical_hf_name(name)]), name


def _assert_thinking_template(exported: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "2+2?"}]}]
    prompt = {
        mode: str(
            tok.apply_chat_template(
                msgs,  # type: ignore[arg-type]
                add_generation_prompt=True,
                tokenize=False,
                thinking_mode=mode,
            )
        )
        for mode in ("auto", "long", "short")
    }
    assert prompt["auto"].endswith("<|im_start|>assistant\n")
    assert prompt["long"] == prompt["auto"] + "<think>\n"
    assert prompt["short"] == prompt["auto"] + "<think>\n\n</think>\n\n"
    assert "<|vision_start|><|image_pad|><|vision_end|>2+2?" in prompt["auto"]
    assert (exported / "preprocessor_config.json").is_file()
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())


def test_hf_to_mcore_at_pp2_then_export_at_tp2(tmp_path: Path) -> None:
    spec = TinySpec(heads=4, kv_heads=2, tie=True, seed=5)
    src = tmp_path / "hf"
    hf = save_hf_dir(spec, src)
    x = vl_inputs(hf, seed=5)
    ref = hf_logits(hf, x)
    mcore, out = tmp_path / "mcore", tmp_path / "out"
    run_distributed(_convert_worker, 2, str(src), str(mcore), str(out))
    meta = json.loads((mcore / "autothink_model.json").read_text())
    assert meta["model"]["mrope_section"] == list(spec.mrope_section)
    assert (mcore / "tokenizer" / "tokenizer.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    _assert_same_tensors(out, src)
    got = hf_logits(_load_hf(out), x)
    diff = (got - ref).abs().max().item()
    print(f"exported HF vs source HF: max |logits diff| = {diff:.2e}")
    assert diff == 0.0  # same weights, same code
    _assert_thinking_template(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["rope_parameters"]["mrope_section"] == list(spec.mrope_section)
    assert cfg["tie_word_embeddings"] is True and cfg["video_token_id"] == 8


def _tp2pp2_worker(mcore: str, ckpt2: str, hf_dist: str, x: VLInputs) -> dict:
    """Load the TP=1 checkpoint at TP=2/PP=2, run both stages, save, export distributed."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_autothink.config import ModelConfig
    from megatron_autothink.convert.mcore_to_hf import mcore_to_hf
    from megatron_autothink.convert.runtime import conversion_context
    from megatron_autothink.convert.source import META_NAME, read_meta
    from megatron_autothink.train.setup import build_model_chunks
    from megatron_autothink.weights.live import unwrap

    meta = read_meta(Path(mcore))
    assert meta is not None
    model_cfg = ModelConfig.model_validate(meta["model"])
    with conversion_context(model_cfg, tp=2, pp=2) as (cfg, ctx):
        (chunk,) = build_model_chunks(
            cfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        model = unwrap(chunk)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), mcore))
        model.eval()
        s, b, h = x.input_ids.shape[1], x.input_ids.shape[0], model_cfg.hidden_size
        out: dict = {"tp": ctx.tp_rank, "pp": ctx.pp_rank}
        with torch.no_grad():
            if ctx.is_first_stage:
                hidden = model(
                    x.input_ids,
                    x.position_ids,
                    None,
                    pixel_values=x.pixel_values,
                    image_grid_thw=x.image_grid_thw,
                ).contiguous()
            else:
                hidden = torch.empty(s, b, h)
            # stage 0 -> stage 1: the activation megatron's p2p would send
            dist.broadcast(hidden, src=dist.get_global_rank(ctx.pg.pp, 0), group=ctx.pg.pp)
            if ctx.is_last_stage:
                model.set_input_tensor(hidden)
                logits = model(x.input_ids, x.position_ids, None)
                out["logits"] = gather_from_tensor_model_parallel_region(logits)[
                    ..., : model_cfg.vocab_size
                ]
                out["local_vocab_rows"] = model.language_model.output_layer.weight.shape[0]
        Path(ckpt2).mkdir(exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt2)
        if ctx.rank == 0:  # the side-car and tokenizer travel with the checkpoint
            meta = json.loads((Path(mcore) / META_NAME).read_text())
            # The manifest must list this checkpoint's files, not those of the one it came from.
            meta["manifest"] = manifest(Path(ckpt2), exclude=(META_NAME, "tokenizer"))
            (Path(ckpt2) / META_NAME).write_text(json.dumps(meta))
            shutil.copytree(Path(mcore) / "tokenizer", Path(ckpt2) / "tokenizer")
        dist.barrier()
        mcore_to_hf(ckpt2, hf_dist, tp=2, pp=2, progress=False)
    return out


def _cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-W", "ignore", "-m", "megatron_autothink.convert.cli", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_cli_roundtrip_through_tp2_pp2_checkpoint(tmp_path: Path) -> None:
    spec = TinySpec(heads=4, kv_heads=2, tie=False, seed=6)
    src = tmp_path / "hf"
    hf = save_hf_dir(spec, src)
    x = vl_inputs(hf, seed=6)
    ref = hf_logits(hf, x)
    _cli("hf-to-mcore", str(src), str(tmp_path / "mcore"), "--no-progress")
    ranks = run_distributed(
        _tp2pp2_worker,
        4,
        str(tmp_path / "mcore"),
        str(tmp_path / "ckpt_tp2pp2"),
        str(tmp_path / "hf_dist"),
        x,
    )
    last = [r for r in ranks if "logits" in r]
    assert len(last) == 2 and all(r["local_vocab_rows"] == 640 for r in last)
    mlogits = last[0]["logits"]
    assert torch.equal(last[1]["logits"], mlogits)
    print(f"megatron TP2/PP2 vs HF source: {(mlogits - ref).abs().max().item():.2e}")
    assert (mlogits - ref).abs().max().item() <= ATOL
    _cli("mcore-to-hf", str(tmp_path / "ckpt_tp2pp2"), str(tmp_path / "hf_cli"), "--no-progress")
    for out in (tmp_path / "hf_dist", tmp_path / "hf_cli"):
        _assert_same_tensors(out, src)
        got = hf_logits(_load_hf(out), x)
        diff = (got - mlogits).abs().max().item()
        print(f"{out.name} in transformers vs megatron TP2/PP2: max |logits diff| = {diff:.2e}")
        assert diff <= ATOL
        _assert_thinking_template(out)
