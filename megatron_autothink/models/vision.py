"""Qwen2.5-VL vision tower from megatron-core pieces.

Patch embedding (a linear map of each flattened 3x2x14x14 patch, equal to HF's stride=kernel
Conv3d), ViT blocks that are megatron ``TransformerLayer`` s built from a ``ModuleSpec`` (so
tensor parallelism comes from megatron's column/row-parallel linears), 2-D rotary embeddings,
window attention on most blocks and full per-image attention on ``fullatt_block_indexes``, and the
2x2 patch merger (RMSNorm -> Linear -> GELU -> Linear) that maps four neighbouring patches to one
language-model token.

Why the blocks are called one by one instead of through a ``TransformerBlock``: window and full
attention blocks attend within different segments (windows vs. whole images), and a
``TransformerBlock`` passes one mask or ``PackedSeqParams`` to all layers. The segments go to
attention as :class:`~megatron_autothink.models.varlen.SegmentBuckets`, not as a block-diagonal
mask over all patches of the micro-batch (see that module for why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import Tensor, nn

from megatron_autothink.config import VisionConfig
from megatron_autothink.models.norm import RMSNorm
from megatron_autothink.models.varlen import segment_buckets


def vision_rotary_positions(grid_thw: Tensor, merge: int) -> Tensor:
    """(h, w) patch coordinates in the order the patches arrive: merge-block-major.

    The image processor emits patches grouped by ``merge x merge`` blocks (so the merger can
    view four consecutive patches as one token); positions must follow the same order.

    Returns ``[N, 2]`` long.

    >>> vision_rotary_positions(torch.tensor([[1, 2, 4]]), 2)[:, 1].tolist()
    [0, 1, 0, 1, 2, 3, 2, 3]
    """
    out = []
    for t, h, w in grid_thw.tolist():
        hh = (
            torch.arange(h)
            .view(h // merge, merge, 1, 1)
            .expand(h // merge, merge, w // merge, merge)
        )
        ww = (
            torch.arange(w)
            .view(1, 1, w // merge, merge)
            .expand(h // merge, merge, w // merge, merge)
        )
        # block-major: (h_block, w_block, h_in, w_in)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_partition(grid_thw: Tensor, merge: int, window_merged: int) -> tuple[Tensor, Tensor]:
    """Group merged tokens into square windows of ``window_merged`` merged tokens per side.

    Returns:
        order: ``[M]`` permutation of merged-token indices that makes each window contiguous.
        cu_lengths: ``[W+1]`` cumulative window lengths in *patches* (merged tokens * merge**2),
            empty windows removed.

    >>> order, cu = window_partition(torch.tensor([[1, 4, 6]]), 2, 2)
    >>> order.tolist(), cu.tolist()
    ([0, 1, 3, 4, 2, 5], [0, 16, 24])
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        nh, nw = -(-gh // window_merged), -(-gw // window_merged)
        for ti in range(t):
            for wi in range(nh):
                for wj in range(nw):
                    block = idx[
                        ti,
                        wi * window_merged : (wi + 1) * window_merged,
                        wj * window_merged : (wj + 1) * window_merged,
                    ].reshape(-1)
                    if block.numel():
                        orders.append(block + offset)
                        lengths.append(block.numel() * merge * merge)
        offset += t * gh * gw
    order = torch.cat(orders)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return order, cu


def image_cu_lengths(grid_thw: Tensor) -> Tensor:
    """Cumulative patch counts per image frame (full-attention blocks attend within a frame)."""
    per = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per.cumsum(0), (1, 0))


class PatchMerger(MegatronModule):
    """RMSNorm, then merge ``merge**2`` patches: Linear -> GELU -> Linear to the LM width.

    The two linears are column- then row-parallel, so the merger is tensor parallel without any
    gather in between.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        out_hidden: int,
        tp_group: torch.distributed.ProcessGroup | None,
    ) -> None:
        super().__init__(config=config)
        self.tp_group = tp_group  # read by MegatronModule.sharded_state_dict
        self.unit = vision.spatial_merge_size**2
        width = vision.hidden_size * self.unit
        self.ln_q = RMSNorm(hidden_size=vision.hidden_size, eps=1e-6)
        self.fc1 = ColumnParallelLinear(
            width,
            width,
            config=config,
            init_method=config.init_method,
            bias=True,
            gather_output=False,
            tp_group=tp_group,
        )
        self.fc2 = RowParallelLinear(
            width,
            out_hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_q(x).view(-1, self.ln_q.normalized_shape[0] * self.unit)
        x, _ = self.fc1(x)
        x = F.gelu(x)
        x, _ = self.fc2(x)
        return x


class Qwen25VisionModel(MegatronModule):
    """Pixels ``[N_patches, C*T*P*P]`` + ``grid_thw [M, 3]`` -> ``[N_patches / merge**2, H_lm]``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        vision: VisionConfig,
        out_hidden: int,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        self.vision = vision
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        # Equal to HF's Conv3d(kernel=stride=(T, P, P), bias=False) on pre-cut patches.
        self.patch_embed = nn.Linear(patch_dim, vision.hidden_size, bias=False)
        head_dim = vision.hidden_size // vision.num_heads
        inv = 1.0 / (
            10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
        )
        self.register_buffer("inv_freq", inv, persistent=False)
        self.layers = nn.ModuleList(
            [
                build_module(
                    layer_spec, config=config, layer_number=i + 1, pg_collection=pg_collection
                )
                for i in range(vision.depth)
            ]
        )
        self.merger = PatchMerger(config, vision, out_hidden, pg_collection.tp)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """TP-aware checkpoint entries. A plain ``ModuleList`` would be saved as replicated
        tensors, losing the column/row sharding of each layer's linears."""
        out: dict = {}
        for name, child in self.named_children():
            if name == "layers":
                for i, layer in enumerate(child):
                    out.update(
                        layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata)
                    )
            else:
                out.update(
                    sharded_state_dict_default(
                        child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        return out

    def rotary(self, grid_thw: Tensor) -> Tensor:
        """Megatron-layout rotary angles ``[N, 1, 1, head_dim]``: (h, w) halves, repeated."""
        pos = vision_rotary_positions(grid_thw, self.vision.spatial_merge_size).to(
            self.inv_freq.device
        )
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim/2]: h | w
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        v = self.vision
        unit = v.spatial_merge_size**2
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        n = x.shape[0]
        window_merged = v.window_size // v.spatial_merge_size // v.patch_size
        grid = grid_thw.cpu()  # read on the host by the grouping below (one device sync)
        order, cu_win = window_partition(grid, v.spatial_merge_size, window_merged)
        order = order.to(x.device)
        # Reorder whole merge units so each window is contiguous; rotary angles follow.
        x = x.view(n // unit, unit, -1)[order].reshape(n, -1)
        rope = self.rotary(grid).to(x.device)
        rope = rope.view(n // unit, unit, -1)[order].reshape(n, 1, 1, -1)
        # Windows and whole images as length-grouped segments, built once for all layers.
        windows = segment_buckets(cu_win, x.device)
        images = segment_buckets(image_cu_lengths(grid), x.device)
        h = x[:, None, :]  # [s, b=1, hidden]
        for i, layer in enumerate(self.layers):
            segments = images if i in v.fullatt_block_indexes else windows
            h, _ = layer(h, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=segments)
        merged = self.merger(h[:, 0, :])
        return merged[torch.argsort(order)]
