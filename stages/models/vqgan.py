"""VQGAN (taming-transformers autoencoder) in Flax linen, released-checkpoint compatible.

This is the image tokenizer of DALL·E Mini: `decode_code` turns the 256 image
tokens DalleBart samples into a 256x256 picture, `encode` turns pictures into
tokens (training data). Parameter names match the tree of
`dalle-mini/vqgan_imagenet_f16_16384` (vqgan-jax `VQModel`), so loading a
checkpoint is reading the msgpack tree and nothing else:

    encoder/{conv_in, down_{i}/{block_{j}, attn_{j}, downsample/conv}, mid/{block_1, attn_1, block_2}, norm_out, conv_out}
    decoder/{conv_in, mid/..., up_{i}/{block_{j}, attn_{j}, upsample/conv}, norm_out, conv_out}
    quantize/embedding/embedding     the codebook [n_embed, embed_dim]
    quant_conv, post_quant_conv      1x1 convs between z_channels and embed_dim

`down_{i}` / `up_{i}` are indexed by resolution level (0 = full resolution);
the decoder applies `up_{n-1}` first. Everything is NHWC. `dtype` is the
compute dtype, `param_dtype` the dtype of freshly initialised parameters;
GroupNorm statistics, the attention softmax and the codebook distances are
always computed in float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.checkpoint import (
    cast_params,
    check_tree,
    read_config,
    read_params,
    resolve_model_dir,
    write_checkpoint,
)

log = logging.getLogger(__name__)

Dtype = Any

# The taming-transformers GroupNorm: 32 groups hard-coded, eps 1e-6.
NORM_GROUPS = 32
NORM_EPS = 1e-6

# Weight of the commitment term in the VQ-VAE loss (van den Oord et al.; taming uses 0.25 too).
COMMITMENT_BETA = 0.25


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VQGANConfig:
    """Sizes and flags of a VQGAN; key names are those of vqgan-jax's `VQGANConfig`.

    Defaults are vqgan-jax's defaults (so a config.json missing a key reads as
    the original would read it). The released dalle-mini model differs only in
    `n_embed=16384`.
    """

    ch: int = 128
    out_ch: int = 3
    in_channels: int = 3
    num_res_blocks: int = 2
    resolution: int = 256
    z_channels: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    attn_resolutions: tuple[int, ...] = (16,)
    n_embed: int = 1024
    embed_dim: int = 256
    dropout: float = 0.0
    double_z: bool = False
    resamp_with_conv: bool = True
    give_pre_end: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config is hashable (it is a module attribute).
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        self._validate()

    # Derived sizes: the config is the single source of every size in this file.
    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (16 for the released f16 model)."""
        return 2 ** (self.num_resolutions - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid for an image of side `resolution` (16 for the released model)."""
        return self.resolution // self.downsample_factor

    def _validate(self) -> None:
        def refuse(flag: str, value: Any, why: str) -> None:
            raise ValueError(f"VQGAN config: {flag}={value!r} is not supported: {why}")

        for name in ("ch", "out_ch", "in_channels", "num_res_blocks", "resolution", "z_channels", "n_embed", "embed_dim"):
            value = getattr(self, name)
            # num_res_blocks may be 0, as in the original: the encoder's levels are then only
            # their downsampling convs (the decoder still has one block per level).
            least = 0 if name == "num_res_blocks" else 1
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                refuse(name, value, "must be a positive integer" if least else "must be a non-negative integer")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            refuse("ch_mult", list(self.ch_mult), "must be a non-empty list of positive integers")
        # Every GroupNorm sees ch * m channels for m in (1,) + ch_mult (the first block's
        # norm1 sees conv_in's `ch` channels); 32 groups must divide each of them.
        for m in (1,) + self.ch_mult:
            if (self.ch * m) % NORM_GROUPS:
                refuse(
                    "ch" if m == 1 else "ch_mult",
                    self.ch if m == 1 else list(self.ch_mult),
                    f"GroupNorm uses {NORM_GROUPS} groups, so ch * m must be a multiple of {NORM_GROUPS} for "
                    f"every m in [1] + ch_mult (ch={self.ch}, m={m} gives {self.ch * m} channels)",
                )
        if self.double_z:
            refuse("double_z", True, "only the VQ encoder (double_z=false, z_channels outputs) is implemented")
        if self.give_pre_end:
            refuse("give_pre_end", True, "the decoder always ends with norm_out, swish and conv_out (give_pre_end=false)")
        if not 0.0 <= float(self.dropout) < 1.0:
            refuse("dropout", self.dropout, "must be in [0, 1)")
        if self.dropout:
            # The original runs its decoder deterministically, so dropout changes no served output;
            # forward_train does not apply it either.
            log.warning("VQGAN config: dropout=%s is ignored (inference is deterministic, training runs without it)",
                        self.dropout)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQGANConfig":
        """Read a config.json dict; unknown keys (architectures, transformers_version, ...) are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        for flag in ("double_z", "resamp_with_conv", "give_pre_end"):
            if flag in kwargs and not isinstance(kwargs[flag], (bool, np.bool_)):
                raise ValueError(f"VQGAN config: {flag}={kwargs[flag]!r} must be true or false")
        config = cls(**kwargs)
        # vqgan-jax writes num_resolutions but recomputes it from ch_mult; a disagreement means a broken file.
        if "num_resolutions" in d and int(d["num_resolutions"]) != config.num_resolutions:
            raise ValueError(
                f"VQGAN config: num_resolutions={d['num_resolutions']} does not match len(ch_mult)="
                f"{config.num_resolutions} (ch_mult={list(config.ch_mult)})"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config.json that vqgan-jax's `VQModel.from_pretrained` reads (the released file's keys)."""
        d: dict[str, Any] = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        d["dropout"] = float(self.dropout)
        d["num_resolutions"] = self.num_resolutions
        d["architectures"] = ["VQModel"]
        # transformers' config loader reads this as metadata only; it names the config format we write.
        d["transformers_version"] = "4.25.1"
        return d


# --------------------------------------------------------------------------- layers


_NHWC = ("NHWC", "HWIO", "NHWC")
#: Input channels from which the weight gradient is taken as one matmul (see `_conv_matmul_wgrad`).
MATMUL_WGRAD_MIN_CHANNELS = 64


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_wgrad(x, kernel, strides, padding, precision):
    """A plain NHWC/HWIO convolution whose kernel gradient is an im2col matmul.

    The forward pass (all that serving runs) is `lax.conv_general_dilated` itself. Only the
    backward pass differs: XLA:CPU's own kernel gradient of a 64-channel 3x3 conv runs about
    3x slower than the same contraction written as [k*k*C_in, N] @ [N, C_out], and that
    gradient dominates a VQGAN training step on the CPU. Same numbers up to float rounding.
    """
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _conv_matmul_wgrad_fwd(x, kernel, strides, padding, precision):
    return _conv_matmul_wgrad(x, kernel, strides, padding, precision), (x, kernel)


def _conv_matmul_wgrad_bwd(strides, padding, precision, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    conv_of_x = lambda x_: jax.lax.conv_general_dilated(  # noqa: E731
        x_, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision)
    (dx,) = jax.vjp(conv_of_x, x)[1](g)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    sh, sw = strides
    cols = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    dk = jnp.dot(cols.reshape(-1, kh * kw * cin).T, g.reshape(-1, cout), precision=precision)
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """What nn.Conv calls: the matmul-gradient conv for wide plain convs, XLA's own for the rest."""
    plain = (feature_group_count == 1 and not kwargs and all(d == 1 for d in (lhs_dilation or (1,)))
             and all(d == 1 for d in (rhs_dilation or (1,))) and not isinstance(padding, str))
    if plain and rhs.shape[2] >= MATMUL_WGRAD_MIN_CHANNELS:
        pads = tuple(tuple(int(v) for v in p) for p in padding)
        return _conv_matmul_wgrad(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1, padding: Any = None):
    # 3x3 convs pad 1 on each side ("same" for stride 1); 1x1 convs need none.
    if padding is None:
        padding = ((1, 1), (1, 1)) if kernel == 3 else ((0, 0), (0, 0))
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=_conv_general_dilated,
    )


def _norm(name: str, dtype: Dtype, param_dtype: Dtype):
    # Contiguous channel groups, stats over (H, W, group channels), per-channel scale/bias: flax's
    # GroupNorm is exactly taming's. Two-pass variance: E[x^2]-E[x]^2 loses digits for large means.
    return nn.GroupNorm(
        num_groups=NORM_GROUPS, epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    """conv(swish(norm(x))) twice, plus x (through a 1x1 `nin_shortcut` when the width changes)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        h = _conv(self.out_channels, 3, "conv1", dt, pdt)(swish(_norm("norm1", dt, pdt)(x)))
        h = _conv(self.out_channels, 3, "conv2", dt, pdt)(swish(_norm("norm2", dt, pdt)(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", dt, pdt)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (row-major), residual."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        b, height, width, c = x.shape
        h = _norm("norm", dt, pdt)(x)
        q = _conv(c, 1, "q", dt, pdt)(h).reshape(b, height * width, c)
        k = _conv(c, 1, "k", dt, pdt)(h).reshape(b, height * width, c)
        v = _conv(c, 1, "v", dt, pdt)(h).reshape(b, height * width, c)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
        return x + _conv(c, 1, "proj_out", dt, pdt)(out)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (each pixel becomes a 2x2 block), then a 3x3 conv when `with_conv`."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype)(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv padded only bottom/right (taming's asymmetric pad), or 2x2 average pool."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return _conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype, stride=2, padding=((0, 1), (0, 1)))(x)
        return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class MidBlock(nn.Module):
    """block_1, attn_1, block_2 at the lowest resolution (same in encoder and decoder)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        x = ResnetBlock(self.channels, dt, pdt, name="block_1")(x)
        x = AttnBlock(dt, pdt, name="attn_1")(x)
        return ResnetBlock(self.channels, dt, pdt, name="block_2")(x)


class Level(nn.Module):
    """One resolution level: `num_blocks` x [block_j (+ attn_j)], then `downsample` or `upsample` if asked."""

    out_channels: int
    num_blocks: int
    use_attn: bool
    resample: str | None  # "downsample", "upsample" or None (the last level of each side)
    resamp_with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, dt, pdt, name=f"block_{j}")(x)
            if self.use_attn:
                x = AttnBlock(dt, pdt, name=f"attn_{j}")(x)
        if self.resample == "downsample":
            x = Downsample(self.resamp_with_conv, dt, pdt, name="downsample")(x)
        elif self.resample == "upsample":
            x = Upsample(self.resamp_with_conv, dt, pdt, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> z [B, H/f, W/f, z_channels], f = 2**(num_resolutions-1)."""

    config: VQGANConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = _conv(cfg.ch, 3, "conv_in", dt, pdt)(x.astype(dt))
        # Attention placement follows the config's nominal resolution, as in the original
        # (not the input's actual size), so the same levels attend for any image size.
        curr_res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            last = i == cfg.num_resolutions - 1
            h = Level(
                cfg.ch * mult,
                cfg.num_res_blocks,
                use_attn=curr_res in cfg.attn_resolutions,
                resample=None if last else "downsample",
                resamp_with_conv=cfg.resamp_with_conv,
                dtype=dt,
                param_dtype=pdt,
                name=f"down_{i}",
            )(h)
            if not last:
                curr_res //= 2
        h = MidBlock(cfg.ch * cfg.ch_mult[-1], dt, pdt, name="mid")(h)
        h = swish(_norm("norm_out", dt, pdt)(h))
        return _conv(cfg.z_channels, 3, "conv_out", dt, pdt)(h)


class Decoder(nn.Module):
    """z [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch] (raw, roughly [0, 1] for the released model)."""

    config: VQGANConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, "conv_in", dt, pdt)(z.astype(dt))
        h = MidBlock(cfg.ch * cfg.ch_mult[-1], dt, pdt, name="mid")(h)
        curr_res = cfg.resolution // cfg.downsample_factor
        for i in reversed(range(cfg.num_resolutions)):
            h = Level(
                cfg.ch * cfg.ch_mult[i],
                cfg.num_res_blocks + 1,  # the decoder has one more block per level than the encoder
                use_attn=curr_res in cfg.attn_resolutions,
                resample=None if i == 0 else "upsample",
                resamp_with_conv=cfg.resamp_with_conv,
                dtype=dt,
                param_dtype=pdt,
                name=f"up_{i}",
            )(h)
            if i != 0:
                curr_res *= 2
        h = swish(_norm("norm_out", dt, pdt)(h))
        return _conv(cfg.out_ch, 3, "conv_out", dt, pdt)(h)


class VectorQuantizer(nn.Module):
    """The codebook `embedding/embedding` [n_embed, embed_dim] and nearest-code search."""

    n_embed: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        # taming initialises the codebook U(-1/n, 1/n).
        bound = 1.0 / self.n_embed
        self.embedding = nn.Embed(
            self.n_embed,
            self.embed_dim,
            embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            param_dtype=self.param_dtype,
        )

    def codebook(self) -> jax.Array:
        return self.embedding.embedding

    def lookup(self, codes: jax.Array) -> jax.Array:
        """codes int [...] -> vectors [..., embed_dim] in the compute dtype."""
        return jnp.take(self.codebook(), codes, axis=0).astype(self.dtype)

    def nearest(self, z: jax.Array) -> jax.Array:
        """Index of the nearest code for each vector of z [..., embed_dim] -> int32 [...].

        |z|^2 + |e|^2 - 2 z.e in float32 at full matmul precision whatever the compute dtype:
        the index must not depend on bf16 rounding or TF32 matmuls. argmin takes the first
        index on ties, like the original.
        """
        zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
        e = self.codebook().astype(jnp.float32)
        d = (
            jnp.sum(zf**2, axis=-1, keepdims=True)
            + jnp.sum(e**2, axis=-1)[None, :]
            - 2.0 * jnp.dot(zf, e.T, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        indices = self.nearest(z)
        return self.lookup(indices), indices


class VQModel(nn.Module):
    """Encoder + codebook + decoder; top-level parameter names as in the released checkpoint."""

    config: VQGANConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        self.encoder = Encoder(cfg, dt, pdt)
        self.decoder = Decoder(cfg, dt, pdt)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, dt, pdt)
        self.quant_conv = _conv(cfg.embed_dim, 1, None, dt, pdt)
        self.post_quant_conv = _conv(cfg.z_channels, 1, None, dt, pdt)

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, in_channels] in [0, 1] -> latents [B, h, w, embed_dim] (before quantisation)."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (quantized [B,h,w,embed_dim], indices int32 [B, h*w] row-major, latents [B,h,w,embed_dim])."""
        latents = self.encode_latents(images)
        quantized, indices = self.quantize(latents)
        return quantized, indices.reshape(indices.shape[0], -1), latents

    def decode(self, quantized: jax.Array) -> jax.Array:
        """Codebook vectors [B, h, w, embed_dim] -> raw image [B, h*f, w*f, out_ch]."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_code(self, codes: jax.Array) -> jax.Array:
        """codes int [B, N], N = side**2, row-major over the square latent grid -> raw image."""
        b, n = codes.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"decode_code needs a square latent grid: got {n} codes per image, not a perfect square")
        z = self.quantize.lookup(codes.astype(jnp.int32)).reshape(b, side, side, self.config.embed_dim)
        return self.decode(z)

    def forward_train(self, images: jax.Array, beta: float = COMMITMENT_BETA) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruction with the straight-through estimator, and the VQ losses.

        codebook_loss = |sg(z) - e|^2 moves the codes towards the encoder outputs,
        commitment_loss = |z - sg(e)|^2 keeps the encoder near its codes;
        vq_loss = codebook_loss + beta * commitment_loss. The decoder sees
        z + sg(e - z): the value of e, the gradient of z.
        """
        z = self.encode_latents(images)
        zq, indices = self.quantize(z)
        z32, zq32 = z.astype(jnp.float32), zq.astype(jnp.float32)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z32) - zq32) ** 2)
        commitment_loss = jnp.mean((z32 - jax.lax.stop_gradient(zq32)) ** 2)
        z_st = z + jax.lax.stop_gradient(zq - z)
        reconstruction = self.decode(z_st).astype(jnp.float32)
        aux = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "vq_loss": codebook_loss + beta * commitment_loss,
            "indices": indices.reshape(indices.shape[0], -1),
            "latents": z,
        }
        return reconstruction, aux

    def __call__(self, images: jax.Array) -> jax.Array:
        """encode -> quantize -> decode; used to create every parameter at init."""
        quantized, _, _ = self.encode(images)
        return self.decode(quantized)


# --------------------------------------------------------------------------- wrapper


# Jitted bodies: pure functions of (params, inputs), with the flax module as a static
# argument. Modules with the same config and dtype compare equal, so every VQGAN
# instance of one configuration shares one compiled function per input shape.


@partial(jax.jit, static_argnums=0)
def _decode_code(module: VQModel, params, codes):
    return module.apply({"params": params}, jnp.asarray(codes), method=VQModel.decode_code).astype(jnp.float32)


@partial(jax.jit, static_argnums=0)
def _decode_images(module: VQModel, params, codes):
    out = module.apply({"params": params}, jnp.asarray(codes), method=VQModel.decode_code).astype(jnp.float32)
    # uint8 on the device: a quarter of the bytes to fetch, and the pixels the pipeline serves.
    return jnp.round(jnp.clip(out, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@partial(jax.jit, static_argnums=0)
def _encode(module: VQModel, params, images):
    quantized, indices, latents = module.apply({"params": params}, jnp.asarray(images), method=VQModel.encode)
    return quantized.astype(jnp.float32), indices, latents.astype(jnp.float32)


def _canonical_dtype(dtype: Any) -> jnp.dtype:
    try:
        return jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"VQGAN dtype must be float32, bfloat16 or float16, got {dtype!r}") from err


def _host_init(shapes: Mapping[str, Any], rng: np.random.Generator, n_embed: int) -> dict[str, Any]:
    """Draw the module's initial distributions with numpy.

    Compiling the network's `init` costs seconds on a CPU (minutes for the released size);
    drawing on the host costs nothing. Same distributions as the module's initialisers:
    conv kernels N(0, 1/fan_in) (lecun normal), biases 0, norm scales 1, codebook U(-1/n, 1/n).
    """
    out: dict[str, Any] = {}
    for name, leaf in shapes.items():
        if isinstance(leaf, Mapping):
            out[name] = _host_init(leaf, rng, n_embed)
            continue
        shape = tuple(leaf.shape)
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[:-1])), size=shape)
        elif name == "embedding":
            value = rng.uniform(-1.0 / n_embed, 1.0 / n_embed, size=shape)
        elif name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:  # pragma: no cover - every VQGAN leaf is one of the above
            raise AssertionError(f"no initialiser for parameter {name!r}")
        out[name] = value.astype(np.float32)
    return out


class VQGAN:
    """A VQGAN ready to run: `config`, `params` (plain nested dict) and the flax `module`.

    Every method is a jitted pure function of (params, inputs), compiled once per input
    shape (and shared by all instances of one config and dtype). `params` defaults to
    `self.params`; pass a placed copy (e.g. `jax.device_put(vq.params, NamedSharding(mesh, P()))`)
    together with batches sharded on the leading axis and XLA partitions the work accordingly.
    """

    def __init__(self, config: VQGANConfig, params: Mapping[str, Any], dtype: Any = jnp.float32):
        self.config = config
        self.dtype = _canonical_dtype(dtype)
        self.module = VQModel(config, dtype=self.dtype, param_dtype=self.dtype)
        self.params = params

    # ---- construction

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, dtype: Any = jnp.float32) -> "VQGAN":
        """Load a folder (or hub id) holding config.json + flax_model.msgpack; params cast to `dtype`."""
        model_dir = resolve_model_dir(ref)
        config = VQGANConfig.from_dict(read_config(model_dir))
        params = read_params(model_dir)
        dtype = _canonical_dtype(dtype)
        check_tree(cls.param_shapes(config), params, f"VQGAN checkpoint {model_dir}")
        params = jax.device_put(cast_params(params, dtype))
        return cls(config, params, dtype)

    @classmethod
    def init_random(cls, config: VQGANConfig | Mapping[str, Any], seed: int = 0, dtype: Any = jnp.float32) -> "VQGAN":
        """Fresh weights (the module's initial distributions, drawn on the host); for tests, benchmarks, training."""
        if not isinstance(config, VQGANConfig):
            config = VQGANConfig.from_dict(config)
        dtype = _canonical_dtype(dtype)
        params = _host_init(cls.param_shapes(config), np.random.default_rng(seed), config.n_embed)
        return cls(config, jax.device_put(cast_params(params, dtype)), dtype)

    @staticmethod
    def param_shapes(config: VQGANConfig) -> dict[str, Any]:
        """The parameter tree `config` implies, as ShapeDtypeStructs (traced, nothing is computed)."""
        module = VQModel(config)
        # The smallest image that reaches a 1x1 latent grid: parameter shapes do not depend on it.
        side = config.downsample_factor
        dummy = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + flax_model.msgpack in the released layout (float32, no "params" wrapper)."""
        write_checkpoint(folder, self.config.to_dict(), cast_params(jax.device_get(self.params), np.float32))

    # ---- inference

    def decode_code(self, codes: Any, params: Mapping[str, Any] | None = None) -> jax.Array:
        """codes int [B, N] (N = side**2, row-major) -> float32 [B, H, W, out_ch], raw decoder output (not clipped)."""
        return _decode_code(self.module, self.params if params is None else params, codes)

    def decode_images(self, codes: Any, params: Mapping[str, Any] | None = None) -> jax.Array:
        """codes int [B, N] -> uint8 [B, H, W, out_ch]: output clipped to [0, 1], times 255, rounded."""
        return _decode_images(self.module, self.params if params is None else params, codes)

    def encode(self, images: Any, params: Mapping[str, Any] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images float [B, H, W, in_channels] in [0, 1] -> (quantized [B,h,w,embed_dim] float32,
        indices int32 [B, h*w], latents [B,h,w,embed_dim] float32)."""
        return _encode(self.module, self.params if params is None else params, images)

    # ---- training

    def forward_train(
        self, params: Mapping[str, Any], images: jax.Array, beta: float = COMMITMENT_BETA
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(reconstruction float32 [B,H,W,out_ch], aux) with aux = {codebook_loss, commitment_loss,
        vq_loss = codebook + beta * commitment, indices [B, h*w]}. Not jitted: differentiate and
        jit it as part of the caller's train step."""
        return self.module.apply({"params": params}, images, beta, method=VQModel.forward_train)
