"""Qwen2.5-VL-architecture VLM on megatron-core.

* Language model: megatron ``GPTModel`` (GQA, RMSNorm, SwiGLU, QKV bias, multimodal RoPE with
  ``mrope_section``, optional tied embeddings), layers from a ``ModuleSpec`` (local or TE).
* Vision tower: :class:`~megatron_autothink.models.vision.Qwen25VisionModel` on the first
  pipeline stage only.
* Image features replace the ``<|image_pad|>`` token embeddings (one merged 2x2 patch per token),
  before the decoder, so tensor/pipeline/context parallel splits see ordinary hidden states.
* Given a ``loss_mask``, the LM head and cross entropy run only at the positions the loss reads
  (:class:`MaskedHeadGPTModel`): image, prompt and padding tokens never get logits.

Parallelism lives in megatron-core: this file builds modules and passes the
``ProcessGroupCollection`` it is given; it never reads global parallel state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_autothink.config import ModelConfig, ParallelConfig
from megatron_autothink.models import rope
from megatron_autothink.models.specs import (
    language_block_spec,
    resolve_backend,
    uses_spec_activation,
    vision_layer_spec,
)
from megatron_autothink.models.varlen import SegmentBuckets
from megatron_autothink.models.vision import Qwen25VisionModel


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up so every TP rank holds an equal, aligned slice.

    >>> padded_vocab_size(1000, 128, 2)
    1024
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def language_config(
    m: ModelConfig, p: ParallelConfig, dtype: torch.dtype, *, use_cpu_init: bool
) -> TransformerConfig:
    resolve_backend(m)  # a ConfigError for a model.fp8 / transformer_impl this machine cannot run
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        mrope_section=list(m.mrope_section),
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions are CUDA kernels; the TE path enables its own. megatron's SwiGLU "fusion" is
        # TorchScript: 3x faster element-wise on CPU once compiled, but compiling took 6 s on
        # the first tiny step and recompiles as vision-token counts change, so it stays off.
        bias_activation_fusion=False,
        use_te_activation_func=uses_spec_activation(m.transformer_impl),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Full-tensor init on CPU then split: TP=N starts from the same weights as TP=1.
        use_cpu_initialization=use_cpu_init,
        fp8=None if m.fp8 == "none" else m.fp8,  # resolve_backend checked: TE on an FP8 GPU
        recompute_granularity=None if m.recompute == "none" else m.recompute,
        recompute_method="uniform" if m.recompute == "full" else None,
        recompute_num_layers=1 if m.recompute == "full" else None,
        variable_seq_lengths=False,
    )


def vision_config(
    m: ModelConfig, p: ParallelConfig, dtype: torch.dtype, *, use_cpu_init: bool
) -> TransformerConfig:
    v = m.vision
    return TransformerConfig(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads,
        kv_channels=v.hidden_size // v.num_heads,
        normalization="RMSNorm",
        layernorm_epsilon=v.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        bias_activation_fusion=False,
        use_te_activation_func=True,  # the vision tower always uses the local spec (SwiGLU)
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=use_cpu_init,
    )


class MaskedHeadGPTModel(GPTModel):
    """megatron ``GPTModel`` whose LM head and loss run only where ``loss_mask`` is set.

    SFT reads the loss at assistant tokens only and RL at response tokens only; image, prompt
    and padding positions are often most of a VLM batch. Megatron (like transformers) computes
    ``[S, B, V]`` logits and cross entropy everywhere and lets the mask discard them; here the
    hidden states at masked positions are picked first (one ``index_select``), so the head GEMM,
    the vocab-parallel cross entropy and their backward shrink with the loss share, and so does
    the logits memory (``S x B x V`` floats: GiBs at Qwen's 152k vocabulary).

    Returns the same ``[B, S]`` per-token loss as ``GPTModel``, exactly 0 where the mask is 0
    (consumers multiply by the mask anyway). Cost: one host sync per micro-batch on the last
    pipeline stage (the number of loss tokens sizes the picked rows); unmeasured on GPU.

    Falls back to megatron's full path without a mask or labels, when every position is kept,
    when the mask's ``[B, S]`` does not match the hidden states (e.g. a context-parallel shard),
    with multi-token prediction, and under sequence parallelism (there each TP rank holds a
    different slice of the sequence, and the head all-gathers it before the GEMM).
    """

    def _postprocess(self, hidden_states: Tensor, **kw: object) -> Tensor:  # type: ignore[override]
        labels, loss_mask = kw.get("labels"), kw.get("loss_mask")
        s, b, h = hidden_states.shape  # [S, B, H]
        if (
            not self.post_process
            or not isinstance(labels, Tensor)
            or not isinstance(loss_mask, Tensor)
            or loss_mask.shape != (b, s)
            or self.mtp_process
            or self.config.mtp_num_layers is not None
            or self.output_layer.sequence_parallel
        ):
            return super()._postprocess(hidden_states, **kw)  # type: ignore[arg-type]
        keep = loss_mask.t().reshape(-1) != 0  # [S*B], s-major like hidden_states
        idx = keep.nonzero().squeeze(1)  # [N]
        if idx.numel() == keep.numel():
            return super()._postprocess(hidden_states, **kw)  # type: ignore[arg-type]
        picked = hidden_states.reshape(s * b, h).index_select(0, idx).unsqueeze(1)  # [N, 1, H]
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(
            picked, weight=weight, runtime_gather_output=kw.get("runtime_gather_output")
        )  # [N, 1, V/tp]
        picked_labels = labels.t().reshape(-1).index_select(0, idx).unsqueeze(0)  # [1, N]
        loss = self.compute_language_model_loss(picked_labels, logits).reshape(-1)  # [N]
        full = loss.new_zeros(s * b).index_copy(0, idx, loss)  # [S*B], 0 off the mask
        return full.view(s, b).t().contiguous()  # [B, S]


class Qwen25VLModel(MegatronModule):
    """One pipeline chunk of the VLM. Forward returns per-token loss ``[B, S]`` when ``labels`` are
    given (last stage; only at ``loss_mask`` positions when a mask is given, 0 elsewhere),
    vocab-parallel logits ``[B, S, V/tp]`` otherwise (last stage), or hidden states ``[S, B, H]``
    on earlier stages."""

    def __init__(
        self,
        m: ModelConfig,
        p: ParallelConfig,
        *,
        vocab_size: int,
        image_token_id: int,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        use_cpu_init = not torch.cuda.is_available()
        rope.install()  # megatron's attention applies RoPE in one autograd node (models/rope.py)
        lm_cfg = language_config(m, p, dtype, use_cpu_init=use_cpu_init)
        super().__init__(config=lm_cfg)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.tp_group = pg_collection.tp  # read by MegatronModule.sharded_state_dict
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size
        self.language_model = MaskedHeadGPTModel(
            config=lm_cfg,
            transformer_layer_spec=language_block_spec(
                m.transformer_impl,
                get_num_layers_to_build(lm_cfg, vp_stage=vp_stage, pp_rank=pg_collection.pp.rank()),
            ),
            vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tp),
            max_sequence_length=m.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=int(m.rope_theta),
            parallel_output=True,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.share_embeddings_and_output_weights = m.tie_word_embeddings
        self.vision: Qwen25VisionModel | None = None
        if pre_process:
            self.vision = Qwen25VisionModel(
                vision_config(m, p, dtype, use_cpu_init=use_cpu_init),
                vision_layer_spec(),
                m.vision,
                out_hidden=m.hidden_size,
                pg_collection=pg_collection,
            )

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def embed(
        self, tokens: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None
    ) -> Tensor:
        """Token embeddings ``[S, B, H]`` with image features at ``<|image_pad|>`` positions."""
        emb = self.language_model.embedding(input_ids=tokens, position_ids=None)  # [S, B, H]
        is_image = tokens == self.image_token_id  # [B, S]
        n_slots = int(is_image.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_slots:
                raise ValueError(f"batch has {n_slots} <|image_pad|> tokens but no pixel_values")
            return emb
        assert self.vision is not None and image_grid_thw is not None
        feats = self.vision(pixel_values, image_grid_thw)  # [N_img_tokens, H]
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"image features ({feats.shape[0]} tokens from grid {image_grid_thw.tolist()}) do "
                f"not match the {n_slots} <|image_pad|> tokens in the batch"
            )
        mask = is_image.t()[..., None].expand_as(emb)  # [S, B, H]
        # Token order of feats is batch-major (row 0's images first); emb is [S, B, H], so scatter
        # through a [B, S, H] view to keep that order.
        emb_bsh = emb.transpose(0, 1)
        emb_bsh = emb_bsh.masked_scatter(mask.transpose(0, 1), feats.to(emb.dtype))
        return emb_bsh.transpose(0, 1).contiguous()

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None,
        labels: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        loss_mask: Tensor | None = None,
        packed_seq_params: SegmentBuckets | None = None,
    ) -> Tensor:
        """Per-token loss ``[B, S]`` (with ``labels``) or logits. Packed rows attend within their
        samples through ``attention_mask`` (``[B, 1, S, S]``, True = masked) or, without a
        mask, ``packed_seq_params`` (:func:`~megatron_autothink.models.varlen.packed_row_segments`;
        the training paths use it: no ``S x S`` work or mask per layer)."""
        decoder_input = (
            self.embed(tokens, pixel_values, image_grid_thw) if self.pre_process else None
        )
        return self.language_model(
            input_ids=tokens,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask,
            packed_seq_params=packed_seq_params,
        )
