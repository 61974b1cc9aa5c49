"""GeneralizedAttention (Zhu et al. 2019, "An Empirical Study of Spatial Attention
Mechanisms"), as mmcv implements it; GRoIE's post-module (spec §2.4).

Multi-head attention over a feature map whose energy is a sum of up to four terms, chosen
by the bits of ``attention_type`` (index 0..3):

- bit 0, E1: query content x key content,
- bit 1, E2: query content x relative position,
- bit 2, E3: a learned vector x key content (key saliency),
- bit 3, E4: a learned vector x relative position.

With '0000' the energy is zero: every query averages all values (global context).

Keys and values are the map sub-sampled by ``kv_stride`` (even rows/columns for 2),
queries the map sub-sampled by ``q_stride``. The relative position of a query and a key is
a separable sinusoidal embedding of their row and column offsets, projected by
``appr_geom_fc_y`` / ``appr_geom_fc_x`` and divided by sqrt(2). The energy is not scaled by
1/sqrt(d). The block returns ``x + gamma * proj_conv(attention(x))`` with ``gamma``
starting at 0, so it starts as the identity.

``mmcv_transposed_query`` reproduces mmcv's '0100'-branch quirk (bit 1 set, bit 3 not):
its row term uses the query at the transposed position, ``q(x, y) . Ry[y, ky]`` instead of
``q(y, x) . Ry[y, ky]``, and runs only on square maps. GRoIE's official configs and
checkpoints were trained with it, so the GRoIE configs turn it on; the default computes
the intended formula. Parameter names are mmcv's, so its checkpoints load key for key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GeneralizedAttentionConfig:
    """Settings of :class:`GeneralizedAttention`; defaults are mmcv's."""

    num_heads: int = 9
    spatial_range: int = -1
    position_embedding_dim: int = -1
    position_magnitude: float = 1.0
    kv_stride: int = 2
    q_stride: int = 1
    attention_type: str = "1111"
    mmcv_transposed_query: bool = False

    def __post_init__(self) -> None:
        if len(self.attention_type) != 4 or set(self.attention_type) - {"0", "1"}:
            raise ValueError(
                "attention_type must be 4 characters of 0/1 (e.g. '0100'), "
                f"got {self.attention_type!r}"
            )
        if self.num_heads <= 0:
            raise ValueError(f"attention num_heads must be positive, got {self.num_heads}")
        if self.kv_stride <= 0 or self.q_stride <= 0:
            raise ValueError(
                f"attention kv_stride and q_stride must be positive, got {self.kv_stride}, "
                f"{self.q_stride}"
            )
        if self.position_embedding_dim > 0 and self.position_embedding_dim % 4 != 0:
            raise ValueError(
                "attention position_embedding_dim must be a multiple of 4 (sin and cos of "
                f"x and y offsets), got {self.position_embedding_dim}"
            )

    def build(self, in_channels: int) -> GeneralizedAttention:
        return GeneralizedAttention(
            in_channels,
            num_heads=self.num_heads,
            spatial_range=self.spatial_range,
            position_embedding_dim=self.position_embedding_dim,
            position_magnitude=self.position_magnitude,
            kv_stride=self.kv_stride,
            q_stride=self.q_stride,
            attention_type=self.attention_type,
            mmcv_transposed_query=self.mmcv_transposed_query,
        )


def _kaiming_uniform_fan_in(weight: Tensor) -> None:
    """mmcv's ``kaiming_init(mode='fan_in', nonlinearity='leaky_relu', a=1, 'uniform')``:
    U(-b, b) with b = sqrt(3 / fan_in)."""
    nn.init.kaiming_uniform_(weight, a=1, mode="fan_in", nonlinearity="leaky_relu")


class GeneralizedAttention(nn.Module):
    """``(N, C, H, W) -> (N, C, H, W)`` spatial attention; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        num_heads: int = 9,
        spatial_range: int = -1,
        position_embedding_dim: int = -1,
        position_magnitude: float = 1.0,
        kv_stride: int = 2,
        q_stride: int = 1,
        attention_type: str = "1111",
        mmcv_transposed_query: bool = False,
    ) -> None:
        super().__init__()
        # Validation lives in the config; building one checks the arguments.
        GeneralizedAttentionConfig(
            num_heads,
            spatial_range,
            position_embedding_dim,
            position_magnitude,
            kv_stride,
            q_stride,
            attention_type,
            mmcv_transposed_query,
        )
        if in_channels < num_heads:
            raise ValueError(
                f"attention needs in_channels >= num_heads, got {in_channels} < {num_heads}"
            )
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.spatial_range = spatial_range
        self.position_embedding_dim = (
            position_embedding_dim if position_embedding_dim > 0 else in_channels
        )
        uses_position = attention_type[1] == "1" or attention_type[3] == "1"
        if uses_position and self.position_embedding_dim % 4 != 0:
            raise ValueError(
                "attention position embedding size (in_channels when position_embedding_dim "
                f"is -1) must be a multiple of 4, got {self.position_embedding_dim}"
            )
        self.position_magnitude = position_magnitude
        self.kv_stride = kv_stride
        self.q_stride = q_stride
        self.attention_type = attention_type
        self.mmcv_transposed_query = mmcv_transposed_query
        self.terms = tuple(bit == "1" for bit in attention_type)
        appr_appr, appr_geom, bias_appr, bias_geom = self.terms

        self.qk_embed_dim = in_channels // num_heads
        self.v_dim = in_channels // num_heads
        qk_channels = self.qk_embed_dim * num_heads
        if appr_appr or appr_geom:
            self.query_conv = nn.Conv2d(in_channels, qk_channels, 1, bias=False)
        if appr_appr or bias_appr:
            self.key_conv = nn.Conv2d(in_channels, qk_channels, 1, bias=False)
        self.value_conv = nn.Conv2d(in_channels, self.v_dim * num_heads, 1, bias=False)
        if appr_geom or bias_geom:
            half = self.position_embedding_dim // 2
            self.appr_geom_fc_x = nn.Linear(half, qk_channels, bias=False)
            self.appr_geom_fc_y = nn.Linear(half, qk_channels, bias=False)
        bound = 1.0 / math.sqrt(self.qk_embed_dim * 2)
        if bias_appr:
            self.appr_bias = nn.Parameter(torch.empty(qk_channels).uniform_(-bound, bound))
        if bias_geom:
            self.geom_bias = nn.Parameter(torch.empty(qk_channels).uniform_(-bound, bound))
        self.proj_conv = nn.Conv2d(self.v_dim * num_heads, in_channels, 1, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))

        for name in ("query_conv", "key_conv", "value_conv", "appr_geom_fc_x", "appr_geom_fc_y"):
            if hasattr(self, name):
                _kaiming_uniform_fan_in(getattr(self, name).weight)
        _kaiming_uniform_fan_in(self.proj_conv.weight)
        nn.init.zeros_(self.proj_conv.bias)

    # ------------------------------------------------------------------------------ parts

    def position_embedding(
        self, h: int, w: int, h_kv: int, w_kv: int, like: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Sinusoidal embeddings of the column offsets ``(w, w_kv, P/2)`` and the row offsets
        ``(h, h_kv, P/2)`` between query and key positions, in ``like``'s dtype."""
        opts = {"device": like.device, "dtype": like.dtype}
        dim = self.position_embedding_dim

        def offsets(n_q: int, n_kv: int) -> Tensor:
            q = torch.arange(n_q, **opts) * self.q_stride
            kv = torch.arange(n_kv, **opts) * self.kv_stride
            return ((q[:, None] - kv[None, :]) * self.position_magnitude)[..., None]

        wave = torch.tensor(1000.0, **opts) ** (torch.arange(dim // 4, **opts) * (4.0 / dim))

        def embed(delta: Tensor) -> Tensor:
            return torch.cat(((delta / wave).sin(), (delta / wave).cos()), dim=-1)

        return embed(offsets(w, w_kv)), embed(offsets(h, h_kv))

    def local_window(self, h: int, w: int, h_kv: int, w_kv: int, device: torch.device):
        """Which key rows ``(h, h_kv)`` and key columns ``(w, w_kv)`` lie inside each query's
        ``spatial_range`` window (mmcv's window, in key-grid units, for any map size)."""
        r, s = self.spatial_range, self.kv_stride

        def allowed(n_q: int, n_kv: int) -> Tensor:
            q = torch.arange(n_q, device=device)[:, None]
            k = torch.arange(n_kv, device=device)[None, :]
            low = torch.div(q - r, s, rounding_mode="floor").clamp(min=0)
            high = torch.div(q + r + 1, s, rounding_mode="floor") + 1
            return (k >= low) & (k < high)

        return allowed(h, h_kv), allowed(w, w_kv)

    def _query(self, x_q: Tensor) -> Tensor | None:
        """``(N, heads, h, w, d)`` query vectors, or None when no term uses them."""
        if not (self.terms[0] or self.terms[1]):
            return None
        n, _, h, w = x_q.shape
        q = self.query_conv(x_q).view(n, self.num_heads, self.qk_embed_dim, h, w)
        return q.permute(0, 1, 3, 4, 2)

    def _content_energy(self, query: Tensor | None, x_kv: Tensor) -> Tensor | None:
        """E1 + E3, broadcastable to ``(N, heads, h, w, h_kv, w_kv)``; None without them."""
        appr_appr, _, bias_appr, _ = self.terms
        if not (appr_appr or bias_appr):
            return None
        n, _, h_kv, w_kv = x_kv.shape
        heads, d = self.num_heads, self.qk_embed_dim
        key = self.key_conv(x_kv).view(n, heads, d, h_kv, w_kv)
        if appr_appr:  # E1 (+ E3): (query + appr_bias) . key
            assert query is not None
            content = query + self.appr_bias.view(1, heads, 1, 1, d) if bias_appr else query
            return torch.einsum("nmyxd,nmdij->nmyxij", content, key)
        # E3 alone: appr_bias . key, the same for every query
        saliency = torch.einsum("md,nmdij->nmij", self.appr_bias.view(heads, d), key)
        return saliency[:, :, None, None]

    def _position_energy(
        self, query: Tensor | None, h: int, w: int, h_kv: int, w_kv: int, like: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """E2 + E4 as a column term ``(.., h, w, w_kv)`` plus a row term ``(.., h, w, h_kv)``
        (size-1 dims broadcast); None without them. The energy is their outer sum."""
        _, appr_geom, _, bias_geom = self.terms
        if not (appr_geom or bias_geom):
            return None
        heads, d = self.num_heads, self.qk_embed_dim
        emb_x, emb_y = self.position_embedding(h, w, h_kv, w_kv, like)
        # (heads, w, w_kv, d) and (heads, h, h_kv, d)
        geom_x = (self.appr_geom_fc_x(emb_x) / math.sqrt(2)).view(w, w_kv, heads, d)
        geom_y = (self.appr_geom_fc_y(emb_y) / math.sqrt(2)).view(h, h_kv, heads, d)
        geom_x, geom_y = geom_x.permute(2, 0, 1, 3), geom_y.permute(2, 0, 1, 3)
        if not appr_geom:  # E4 alone: geom_bias . R
            bias = self.geom_bias.view(heads, d)
            col = torch.einsum("md,mxjd->mxj", bias, geom_x)[None, :, None]
            row = torch.einsum("md,myid->myi", bias, geom_y)[None, :, :, None]
            return col, row
        # E2 (+ E4): (query + geom_bias) . R
        assert query is not None
        geo_query = query + self.geom_bias.view(1, heads, 1, 1, d) if bias_geom else query
        row_query = geo_query
        if self.mmcv_transposed_query and not bias_geom:
            if h != w:
                raise ValueError(
                    "mmcv_transposed_query reproduces a computation that exists only for "
                    f"square maps, got {h}x{w}"
                )
            row_query = query.transpose(2, 3)
        col = torch.einsum("nmyxd,mxjd->nmyxj", geo_query, geom_x)
        row = torch.einsum("nmyxd,myid->nmyxi", row_query, geom_y)
        return col, row

    def energy(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """Attention logits ``(N, heads, h, w, h_kv, w_kv)`` before the softmax (``-inf``
        outside the ``spatial_range`` window)."""
        n, _, h, w = x_q.shape
        h_kv, w_kv = x_kv.shape[-2:]
        energy = x_q.new_zeros((n, self.num_heads, h, w, h_kv, w_kv))
        query = self._query(x_q)
        content = self._content_energy(query, x_kv)
        if content is not None:
            energy = energy + content
        position = self._position_energy(query, h, w, h_kv, w_kv, x_q)
        if position is not None:
            col, row = position
            energy = energy + col[..., None, :] + row[..., :, None]
        if self.spatial_range >= 0:
            rows_ok, cols_ok = self.local_window(h, w, h_kv, w_kv, energy.device)
            outside = ~(rows_ok[:, None, :, None] & cols_ok[None, :, None, :])
            energy = energy.masked_fill(outside, float("-inf"))
        return energy

    def _separable_attention(self, x_q: Tensor, h_kv: int, w_kv: int) -> Tensor:
        """Attention weights ``(N|1, heads, h, w, h_kv, w_kv)`` when the energy has no
        content-key term (bits 0 and 2 off, as in GRoIE's '0100'). The energy is then a row
        term plus a column term, so its softmax is the outer product of their softmaxes:
        exact, and without materialising and normalising the full energy."""
        h, w = x_q.shape[-2:]
        position = self._position_energy(self._query(x_q), h, w, h_kv, w_kv, x_q)
        if position is None:  # '0000': every key weighs the same
            col = x_q.new_zeros((1, self.num_heads, 1, 1, w_kv))
            row = x_q.new_zeros((1, self.num_heads, 1, 1, h_kv))
        else:
            col, row = position
        if self.spatial_range >= 0:
            rows_ok, cols_ok = self.local_window(h, w, h_kv, w_kv, x_q.device)
            col = col.masked_fill(~cols_ok[None, None, None], float("-inf"))
            row = row.masked_fill(~rows_ok[None, None, :, None], float("-inf"))
        return F.softmax(row, dim=-1)[..., :, None] * F.softmax(col, dim=-1)[..., None, :]

    # ---------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"GeneralizedAttention expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x_q = x[:, :, :: self.q_stride, :: self.q_stride]
        x_kv = x[:, :, :: self.kv_stride, :: self.kv_stride]
        n, _, h, w = x_q.shape
        h_kv, w_kv = x_kv.shape[-2:]
        heads = self.num_heads

        if self.terms[0] or self.terms[2]:
            logits = self.energy(x_q, x_kv).reshape(n, heads, h * w, h_kv * w_kv)
            attention = F.softmax(logits, dim=-1)
        else:
            attention = self._separable_attention(x_q, h_kv, w_kv)
            batch = attention.shape[0]  # 1 when no term depends on the input
            attention = attention.expand(batch, heads, h, w, h_kv, w_kv)
            attention = attention.reshape(batch, heads, h * w, h_kv * w_kv)
        value = self.value_conv(x_kv).view(n, heads, self.v_dim, h_kv * w_kv)
        out = torch.matmul(attention, value.transpose(2, 3))  # (n, heads, h*w, v_dim)
        out = out.transpose(2, 3).reshape(n, heads * self.v_dim, h, w)
        out = self.proj_conv(out)
        if self.q_stride > 1:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.gamma * out + x

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
            f"attention_type={self.attention_type!r}, kv_stride={self.kv_stride}, "
            f"q_stride={self.q_stride}, spatial_range={self.spatial_range}, "
            f"mmcv_transposed_query={self.mmcv_transposed_query}"
        )
