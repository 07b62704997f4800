"""VQGAN: the taming-transformers autoencoder that is DALL·E Mini's image tokenizer.

`decode_code` turns the image tokens DalleBart samples into a picture, `encode`
turns pictures into tokens. Written as pure functions of a parameter tree whose
names are exactly those of `dalle-mini/vqgan_imagenet_f16_16384` (vqgan-jax
`VQModel`), so loading is reading the tree:

    encoder/{conv_in, down_{i}/{block_{j}, attn_{j}, downsample/conv}, mid/{block_1, attn_1, block_2}, norm_out, conv_out}
    decoder/{conv_in, mid/..., up_{i}/{block_{j}, attn_{j}, upsample/conv}, norm_out, conv_out}
    quantize/embedding/embedding     the codebook [n_embed, embed_dim]
    quant_conv, post_quant_conv      1x1 convs between z_channels and embed_dim

`down_{i}` / `up_{i}` are indexed by resolution level (0 = full resolution);
the decoder applies `up_{n-1}` first. Everything is NHWC. The functions compute
in the dtype of the parameters; GroupNorm statistics, the attention softmax and
the codebook distances are taken in float32.

Every convolution goes through `conv_op` (`jax.lax.conv_general_dilated`'s
signature), an argument of the functions that training differentiates: the
trainer passes one whose kernel gradient is faster on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.checkpoint import Pretrained, UnsupportedConfigError, known_fields

log = logging.getLogger(__name__)

Params = dict[str, Any]
ConvOp = Callable[..., jax.Array]

# The taming-transformers GroupNorm: 32 groups hard-coded, eps 1e-6.
NORM_GROUPS = 32
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
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
        # Lists from JSON become tuples so the config is hashable (a static argument of jit).
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        self.validate()

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

    def validate(self) -> None:
        def refuse(flag: str, value: Any, why: str) -> None:
            raise UnsupportedConfigError(f"VQGAN config: {flag}={value!r} is not supported: {why}")

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
            # The original runs its decoder deterministically, so dropout changes no served output.
            log.warning("VQGAN config: dropout=%s is ignored (inference is deterministic, training runs without it)",
                        self.dropout)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "VQGANConfig":
        """Read a config.json dict; unknown keys (architectures, transformers_version, ...) are ignored."""
        kwargs = known_fields(cls, raw)
        for flag in ("double_z", "resamp_with_conv", "give_pre_end"):
            if flag in kwargs and not isinstance(kwargs[flag], (bool, np.bool_)):
                raise UnsupportedConfigError(f"VQGAN config: {flag}={kwargs[flag]!r} must be true or false")
        config = cls(**kwargs)
        # vqgan-jax writes num_resolutions but recomputes it from ch_mult; a disagreement means a broken file.
        if "num_resolutions" in raw and int(raw["num_resolutions"]) != config.num_resolutions:
            raise UnsupportedConfigError(
                f"VQGAN config: num_resolutions={raw['num_resolutions']} does not match len(ch_mult)="
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


# ----------------------------------------------------------------------------- building blocks


def conv(x: jax.Array, p: Mapping[str, jax.Array], conv_op: ConvOp, stride: int = 1,
         padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> jax.Array:
    """NHWC convolution with `kernel` [k, k, in, out] and `bias`; a 3x3 kernel pads 1 on each side, a 1x1 none."""
    kernel = p["kernel"]
    if padding is None:
        pad = (kernel.shape[0] - 1) // 2
        padding = ((pad, pad), (pad, pad))
    y = conv_op(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].reshape(1, 1, 1, -1)


def group_norm(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """GroupNorm over contiguous channel groups (statistics over H, W and the group, in float32),
    per-channel scale and bias: taming's, and flax's with its two-pass variance."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, NORM_GROUPS, c // NORM_GROUPS).astype(jnp.float32)
    mean = g.mean((1, 2, 4))
    var = jnp.square(g - mean[:, None, None, :, None]).mean((1, 2, 4))
    mean = jnp.repeat(mean, c // NORM_GROUPS, axis=-1)[:, None, None, :]
    var = jnp.repeat(var, c // NORM_GROUPS, axis=-1)[:, None, None, :]
    y = x - mean
    mul = jax.lax.rsqrt(var + NORM_EPS) * p["scale"].reshape(1, 1, 1, c)
    y = y * mul + p["bias"].reshape(1, 1, 1, c)
    return y.astype(x.dtype)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def resnet_block(x: jax.Array, p: Params, conv_op: ConvOp) -> jax.Array:
    """conv(swish(norm(x))) twice, plus x (through a 1x1 `nin_shortcut` when the width changes)."""
    h = conv(swish(group_norm(x, p["norm1"])), p["conv1"], conv_op)
    h = conv(swish(group_norm(h, p["norm2"])), p["conv2"], conv_op)
    if "nin_shortcut" in p:
        x = conv(x, p["nin_shortcut"], conv_op)
    return x + h


def attention_block(x: jax.Array, p: Params, conv_op: ConvOp) -> jax.Array:
    """Single-head self-attention over all H*W positions (row-major), residual."""
    b, height, width, c = x.shape
    h = group_norm(x, p["norm"])
    q = conv(h, p["q"], conv_op).reshape(b, height * width, c)
    k = conv(h, p["k"], conv_op).reshape(b, height * width, c)
    v = conv(h, p["v"], conv_op).reshape(b, height * width, c)
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
    return x + conv(out, p["proj_out"], conv_op)


def downsample(x: jax.Array, p: Params | None, conv_op: ConvOp) -> jax.Array:
    """Halve H and W: 3x3 stride-2 conv padded only bottom/right (taming's asymmetric pad), or, without
    one (resamp_with_conv=false), a 2x2 average pool."""
    if p is not None:
        return conv(x, p["conv"], conv_op, stride=2, padding=((0, 1), (0, 1)))
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


def upsample(x: jax.Array, p: Params | None, conv_op: ConvOp) -> jax.Array:
    """Nearest-neighbour x2 (each pixel becomes a 2x2 block), then a 3x3 conv when there is one."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x if p is None else conv(x, p["conv"], conv_op)


def level(x: jax.Array, p: Params, num_blocks: int, resample: Callable | None, conv_op: ConvOp) -> jax.Array:
    """One resolution level: `num_blocks` x [block_j (+ attn_j)], then `resample` (downsample or upsample), if any."""
    for j in range(num_blocks):
        x = resnet_block(x, p[f"block_{j}"], conv_op)
        if f"attn_{j}" in p:
            x = attention_block(x, p[f"attn_{j}"], conv_op)
    if resample is not None:  # its params are named after it; absent when resamp_with_conv is false
        x = resample(x, p.get(resample.__name__), conv_op)
    return x


def mid_block(x: jax.Array, p: Params, conv_op: ConvOp) -> jax.Array:
    """block_1, attn_1, block_2 at the lowest resolution (the same in encoder and decoder)."""
    x = resnet_block(x, p["block_1"], conv_op)
    x = attention_block(x, p["attn_1"], conv_op)
    return resnet_block(x, p["block_2"], conv_op)


# ----------------------------------------------------------------------------- encoder, codebook, decoder


def encoder(p: Params, x: jax.Array, config: VQGANConfig, conv_op: ConvOp) -> jax.Array:
    """Image [B, H, W, in_channels] -> z [B, H/f, W/f, z_channels], f = downsample_factor."""
    h = conv(x, p["conv_in"], conv_op)
    last = config.num_resolutions - 1
    for i in range(config.num_resolutions):
        # A level without blocks or downsampling (num_res_blocks=0, the last level) has no parameters.
        h = level(h, p.get(f"down_{i}", {}), config.num_res_blocks, None if i == last else downsample, conv_op)
    h = mid_block(h, p["mid"], conv_op)
    return conv(swish(group_norm(h, p["norm_out"])), p["conv_out"], conv_op)


def decoder(p: Params, z: jax.Array, config: VQGANConfig, conv_op: ConvOp) -> jax.Array:
    """z [B, h, w, z_channels] -> image [B, h*f, w*f, out_ch] (raw, roughly [0, 1] for the released model)."""
    h = conv(z, p["conv_in"], conv_op)
    h = mid_block(h, p["mid"], conv_op)
    for i in reversed(range(config.num_resolutions)):
        # The decoder has one block per level more than the encoder.
        h = level(h, p[f"up_{i}"], config.num_res_blocks + 1, None if i == 0 else upsample, conv_op)
    return conv(swish(group_norm(h, p["norm_out"])), p["conv_out"], conv_op)


def encode_latents(params: Params, images: jax.Array, config: VQGANConfig,
                   conv_op: ConvOp = jax.lax.conv_general_dilated) -> jax.Array:
    """images [B, H, W, in_channels] in [0, 1] -> latents [B, h, w, embed_dim] (before quantisation)."""
    x = images.astype(params["encoder"]["conv_in"]["kernel"].dtype)
    return conv(encoder(params["encoder"], x, config, conv_op), params["quant_conv"], conv_op)


def nearest_codes(codebook: jax.Array, z: jax.Array) -> jax.Array:
    """Index of the nearest code for each vector of z [..., embed_dim] -> int32 [...].

    |z|^2 + |e|^2 - 2 z.e in float32 at full matmul precision whatever the compute dtype:
    the index must not depend on bf16 rounding or TF32 matmuls. argmin takes the first
    index on ties, like the original.
    """
    zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
    e = codebook.astype(jnp.float32)
    d = (jnp.sum(zf**2, axis=-1, keepdims=True) + jnp.sum(e**2, axis=-1)[None, :]
         - 2.0 * jnp.dot(zf, e.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


def decode(params: Params, quantized: jax.Array, config: VQGANConfig,
           conv_op: ConvOp = jax.lax.conv_general_dilated) -> jax.Array:
    """Codebook vectors [B, h, w, embed_dim] -> raw image [B, h*f, w*f, out_ch]."""
    return decoder(params["decoder"], conv(quantized, params["post_quant_conv"], conv_op), config, conv_op)


def encode(params: Params, images: jax.Array, config: VQGANConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [0, 1] -> (quantized [B, h, w, embed_dim] float32, indices int32
    [B, h*w] row-major, latents [B, h, w, embed_dim] float32)."""
    codebook = params["quantize"]["embedding"]["embedding"]
    latents = encode_latents(params, images, config)
    indices = nearest_codes(codebook, latents)
    quantized = jnp.take(codebook, indices, axis=0)
    return (quantized.astype(jnp.float32), indices.reshape(indices.shape[0], -1), latents.astype(jnp.float32))


def decode_code(params: Params, codes: jax.Array, config: VQGANConfig) -> jax.Array:
    """codes int [B, N], N = side**2, row-major over the square latent grid -> float32 raw image [B, H, W, out_ch]."""
    b, n = codes.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"decode_code needs a square latent grid: got {n} codes per image, not a perfect square")
    codebook = params["quantize"]["embedding"]["embedding"]
    z = jnp.take(codebook, codes.astype(jnp.int32), axis=0).reshape(b, side, side, config.embed_dim)
    return decode(params, z, config).astype(jnp.float32)


def decode_images(params: Params, codes: jax.Array, config: VQGANConfig) -> jax.Array:
    """codes int [B, N] -> uint8 [B, H, W, out_ch]: the output clipped to [0, 1], times 255, rounded
    (on the device: a quarter of the bytes to fetch, and the pixels the pipeline serves)."""
    out = decode_code(params, codes, config)
    return jnp.round(jnp.clip(out, 0.0, 1.0) * 255.0).astype(jnp.uint8)


# ----------------------------------------------------------------------------- parameters


def param_shapes(config: VQGANConfig) -> Params:
    """The parameter tree `config` implies, as float32 ShapeDtypeStructs."""

    def conv_p(n_in: int, n_out: int, k: int = 3) -> Params:
        return {"kernel": jax.ShapeDtypeStruct((k, k, n_in, n_out), jnp.float32),
                "bias": jax.ShapeDtypeStruct((n_out,), jnp.float32)}

    def norm_p(n: int) -> Params:
        return {"scale": jax.ShapeDtypeStruct((n,), jnp.float32), "bias": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def block_p(n_in: int, n_out: int) -> Params:
        p = {"norm1": norm_p(n_in), "conv1": conv_p(n_in, n_out), "norm2": norm_p(n_out), "conv2": conv_p(n_out, n_out)}
        if n_in != n_out:
            p["nin_shortcut"] = conv_p(n_in, n_out, 1)
        return p

    def attn_p(n: int) -> Params:
        return {"norm": norm_p(n), **{name: conv_p(n, n, 1) for name in ("q", "k", "v", "proj_out")}}

    def level_p(n_in: int, n_out: int, blocks: int, attend: bool, resample: str | None) -> tuple[Params, int]:
        """A level's params and its output width (its input width when it has no blocks)."""
        p: Params = {}
        for j in range(blocks):
            p[f"block_{j}"] = block_p(n_in if j == 0 else n_out, n_out)
            if attend:
                p[f"attn_{j}"] = attn_p(n_out)
        width = n_out if blocks else n_in
        if resample and config.resamp_with_conv:
            p[resample] = {"conv": conv_p(width, width)}
        return p, width

    def mid_p(n_in: int, n: int) -> Params:
        return {"block_1": block_p(n_in, n), "attn_1": attn_p(n), "block_2": block_p(n, n)}

    ch, mult, last = config.ch, config.ch_mult, config.num_resolutions - 1
    top = ch * mult[-1]
    enc: Params = {"conv_in": conv_p(config.in_channels, ch)}
    res, width = config.resolution, ch
    for i, m in enumerate(mult):  # attention placement follows the nominal resolution, as in the original
        down, width = level_p(width, ch * m, config.num_res_blocks, res in config.attn_resolutions,
                              None if i == last else "downsample")
        if down:  # a level without blocks or downsampling has no parameters
            enc[f"down_{i}"] = down
        res = res if i == last else res // 2
    enc.update(mid=mid_p(width, top), norm_out=norm_p(top), conv_out=conv_p(top, config.z_channels))
    dec: Params = {"conv_in": conv_p(config.z_channels, top), "mid": mid_p(top, top)}
    width = top
    for i in reversed(range(config.num_resolutions)):
        dec[f"up_{i}"], width = level_p(width, ch * mult[i], config.num_res_blocks + 1,
                                        res in config.attn_resolutions, None if i == 0 else "upsample")
        res = res if i == 0 else res * 2
    dec.update(norm_out=norm_p(ch * mult[0]), conv_out=conv_p(ch * mult[0], config.out_ch))
    return {"encoder": enc, "decoder": dec,
            "quantize": {"embedding": {"embedding": jax.ShapeDtypeStruct((config.n_embed, config.embed_dim),
                                                                         jnp.float32)}},
            "quant_conv": conv_p(config.z_channels, config.embed_dim, 1),
            "post_quant_conv": conv_p(config.embed_dim, config.z_channels, 1)}


def init_params(config: VQGANConfig, seed: int = 0) -> Params:
    """Fresh float32 weights drawn on the host with numpy, leaf by leaf in the tree's (sorted) order:
    conv kernels N(0, 1/fan_in) (lecun normal), biases 0, norm scales 1, the codebook U(-1/n, 1/n)."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = path[-1].key, tuple(leaf.shape)
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[:-1])), size=shape)
        elif name == "embedding":
            value = rng.uniform(-1.0 / config.n_embed, 1.0 / config.n_embed, size=shape)
        else:
            value = np.ones(shape) if name == "scale" else np.zeros(shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


# ----------------------------------------------------------------------------- the model object

# Jitted at the boundary, once per config and input shape (a static argument): every model of one
# configuration shares the compiled function.
_decode_code = jax.jit(decode_code, static_argnames="config")
_decode_images = jax.jit(decode_images, static_argnames="config")
_encode = jax.jit(encode, static_argnames="config")


class VQGAN(Pretrained):
    """A loaded VQGAN: config + params (the released tree, in the compute dtype).

    Each method is a jitted pure function of (params, inputs); `params` defaults to `self.params`.
    Pass a placed copy (e.g. replicated on a mesh) with batches sharded on the leading axis and
    XLA partitions the work accordingly.
    """

    config_class = VQGANConfig
    param_shapes = staticmethod(param_shapes)
    init_params = staticmethod(init_params)

    def decode_code(self, codes: Any, params: Params | None = None) -> jax.Array:
        """codes int [B, N] (N = side**2, row-major) -> float32 [B, H, W, out_ch], raw decoder output (not clipped)."""
        return _decode_code(self.params if params is None else params, jnp.asarray(codes), self.config)

    def decode_images(self, codes: Any, params: Params | None = None) -> jax.Array:
        """codes int [B, N] -> uint8 [B, H, W, out_ch]: output clipped to [0, 1], times 255, rounded."""
        return _decode_images(self.params if params is None else params, jnp.asarray(codes), self.config)

    def encode(self, images: Any, params: Params | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """images float [B, H, W, in_channels] in [0, 1] -> (quantized [B,h,w,embed_dim] float32,
        indices int32 [B, h*w], latents [B,h,w,embed_dim] float32)."""
        return _encode(self.params if params is None else params, jnp.asarray(images), self.config)
