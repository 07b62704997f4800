"""The VQGAN trainer: a decoder that paints the pool's patch codes, and an encoder that reads them back.

Codes are given (`patch_codes`: mask x object colour x background colour), not clustered, and
the codebook is the product of three learned parts (`product_codebook`). Also here: the
convolution whose kernel gradient is one matmul (`matmul_wgrad_conv`, what the VQGAN's
functions take as `conv_op` in training) and batched encoding and decoding of whole pools.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from palette.stages.devices import pad_rows
from palette.stages.models import vqgan
from palette.stages.models.vqgan import VQGAN, VQGANConfig

from . import model_set, patch_codes
from .loop import LoopConfig, batch_rng, mark_done, run_loop
from .pool import Pool, near_object_pixels

#: Codebook part widths (mask, object colour, background colour): embed_dim is their sum.
PART_DIMS = (16, 4, 4)
#: Pixels on or within OBJECT_RADIUS of an object weigh 1 + OBJECT_WEIGHT in the reconstruction loss.
OBJECT_WEIGHT = 4.0
OBJECT_RADIUS = 2
#: Weight of the encoder's per-part code cross-entropy, and of the commitment term.
CODE_WEIGHT = 0.1
COMMITMENT_WEIGHT = 0.25
#: Input channels from which a convolution's kernel gradient is taken as one matmul.
MATMUL_WGRAD_MIN_CHANNELS = 64


# ----------------------------------------------------------------------------- the training convolution

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_wgrad(x, kernel, strides, padding):
    """A plain NHWC/HWIO convolution whose kernel gradient is an im2col matmul.

    The forward pass is `lax.conv_general_dilated` itself. Only the backward pass differs:
    XLA:CPU's own kernel gradient of a 64-channel 3x3 conv runs about 3x slower than the same
    contraction written as [k*k*C_in, N] @ [N, C_out], and that gradient dominates a VQGAN
    training step on the CPU. Same numbers up to float rounding.
    """
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _conv_matmul_wgrad_fwd(x, kernel, strides, padding):
    return _conv_matmul_wgrad(x, kernel, strides, padding), (x, kernel)


def _conv_matmul_wgrad_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    (dx,) = jax.vjp(lambda x_: jax.lax.conv_general_dilated(x_, kernel, strides, padding, dimension_numbers=_NHWC),
                    x)[1](g)
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    sh, sw = strides
    cols = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    dk = jnp.dot(cols.reshape(-1, kh * kw * cin).T, g.reshape(-1, cout))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_matmul_wgrad.defvjp(_conv_matmul_wgrad_fwd, _conv_matmul_wgrad_bwd)


def matmul_wgrad_conv(x, kernel, strides, padding, dimension_numbers):
    """The VQGAN's `conv_op` in training (NHWC): convolutions of `MATMUL_WGRAD_MIN_CHANNELS` or more input
    channels take their kernel gradient as one matmul (`_conv_matmul_wgrad`), the rest are XLA's own."""
    if kernel.shape[2] >= MATMUL_WGRAD_MIN_CHANNELS:
        return _conv_matmul_wgrad(x, kernel, tuple(strides), tuple(tuple(int(v) for v in p) for p in padding))
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dimension_numbers)


# ----------------------------------------------------------------------------- the trainer


def product_codebook(parts: dict, vocabulary: patch_codes.PatchVocabulary) -> jax.Array:
    """[vocabulary.size, sum(PART_DIMS)]: each code's vector, its mask, colour and background parts side by side.

    The squared distance to such a vector is the sum of the distances of its parts, so the
    nearest code of a latent is the nearest mask part, colour part and background part
    taken together: the released quantizer's plain nearest-code search picks factors one by one.
    """
    mask, colour, background = (jnp.asarray(x) for x in vocabulary.all_factors())
    return jnp.concatenate([jnp.take(parts["mask"], mask, axis=0), jnp.take(parts["colour"], colour, axis=0),
                            jnp.take(parts["background"], background, axis=0)], axis=-1)


def train_vqgan(
    out_dir: str | Path,
    run_dir: str | Path,
    pool: Pool,
    codes: np.ndarray,
    vocabulary: patch_codes.PatchVocabulary,
    loop: LoopConfig,
    config: VQGANConfig | None = None,
) -> VQGAN:
    """VQGAN on the pool's images, with each patch's code given (`patch_codes`) rather than clustered.

    The codebook is the product of three learned parts -- a vector per mask, per object colour
    and per background colour (`product_codebook`) -- and the decoder learns to paint each
    patch from its code's vector: weighted L1 + L2 reconstruction of the pool's images from their
    codes. Pixels on or within `OBJECT_RADIUS` of an object (object pixels are those unlike the
    image's corner pixel) weigh `1 + OBJECT_WEIGHT`: objects cover a few percent of an image, and
    the ring of background around an object weighs as much as the object itself, so that the
    decoder keeps object colour out of it and a small star keeps its notches. Since a code's
    parts are separate inputs, the decoder paints a mask in a colour it never saw it in -- a
    held-out pair.
    The encoder learns to land nearest its patches' codes: per part, cross-entropy over negative
    squared distances to the part's vectors (held fixed for it, so it cannot win by spreading
    them), weighted `CODE_WEIGHT`, plus the commitment term. Whole images only: the colour of a
    background patch is that of the nearest object, which a crop may not show.
    `config` defaults to the default set's (`model_set.vqgan_config`). Writes `<out_dir>/vqgan`
    in the released format, the codebook materialised over all codes.
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    config = config or model_set.vqgan_config(vocabulary.size, sum(PART_DIMS))
    if config.n_embed != vocabulary.size or config.embed_dim != sum(PART_DIMS):
        raise ValueError(f"VQGAN config needs n_embed={vocabulary.size} and embed_dim={sum(PART_DIMS)}")
    vq = VQGAN.init_random(config, loop.seed)
    n = len(pool)
    grid = config.latent_size
    codes = np.asarray(codes, np.int32).reshape(n, grid, grid)
    rng = np.random.default_rng((loop.seed, 5))
    dm, dc, db = PART_DIMS
    colours = patch_codes.colour_table() * 2.0 - 1.0  # colour parts start from the colours themselves
    net = {k: v for k, v in vq.params.items() if k != "quantize"}
    params = {"net": net, "parts": {
        "mask": jnp.asarray(rng.normal(0, 1.0, (vocabulary.num_masks, dm)), jnp.float32),
        "colour": jnp.asarray(np.pad(colours, ((0, 0), (0, dc - 3))), jnp.float32),
        "background": jnp.asarray(np.pad(colours, ((0, 0), (0, db - 3))), jnp.float32)}}

    def make_batch(step: int):
        idx = batch_rng(loop.seed, step, 1).integers(0, n, loop.batch_size)
        imgs = pool.images[idx]
        weights = 1.0 + OBJECT_WEIGHT * near_object_pixels(imgs, OBJECT_RADIUS)
        return jnp.asarray(imgs, jnp.float32) / 255.0, jnp.asarray(codes[idx]), jnp.asarray(weights, jnp.float32)

    def loss_fn(p, images, target, weights):
        table = product_codebook(p["parts"], vocabulary)
        full = {**p["net"], "quantize": {"embedding": {"embedding": table}}}
        z = vqgan.encode_latents(full, images, config, matmul_wgrad_conv).astype(jnp.float32)
        e = jnp.take(table, target, axis=0)
        rec = vqgan.decode(full, e, config, matmul_wgrad_conv).astype(jnp.float32)
        l1 = jnp.mean(weights * jnp.abs(rec - images))
        l2 = jnp.mean(weights * (rec - images) ** 2)
        code_ce, hits = 0.0, 1.0
        start = 0
        for name, factor, width in zip(("mask", "colour", "background"), vocabulary.factors(target), PART_DIMS):
            zk = z[..., start:start + width]
            start += width
            vecs = jax.lax.stop_gradient(p["parts"][name])
            logits = -jnp.sum((zk[..., None, :] - vecs) ** 2, axis=-1)
            code_ce = code_ce + optax.softmax_cross_entropy_with_integer_labels(logits, factor).mean()
            hits = hits * (jnp.argmax(logits, -1) == factor)
        commitment = jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        psnr = -10.0 * jnp.log10(jnp.mean((jnp.clip(rec, 0, 1) - images) ** 2) + 1e-10)
        loss = l1 + l2 + CODE_WEIGHT * code_ce + COMMITMENT_WEIGHT * commitment
        return loss, {"l1": l1, "l2": l2, "code_ce": code_ce, "code_accuracy": jnp.mean(hits), "psnr": psnr}

    state = run_loop("vqgan", run_dir, params, loss_fn, make_batch, loop)
    table = product_codebook(state.params["parts"], vocabulary)
    vq = VQGAN(config, {**state.params["net"], "quantize": {"embedding": {"embedding": table}}})
    vq.save_pretrained(out_dir / "vqgan")
    mark_done(run_dir, state)
    return vq


# ----------------------------------------------------------------------------- whole pools


def _map_padded(fn, arr: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches of arr, the last one zero-padded so fn compiles once."""
    out = []
    for i in range(0, len(arr), batch_size):
        chunk = arr[i:i + batch_size]
        out.append(np.asarray(fn(pad_rows(chunk, batch_size)))[:len(chunk)])
    return np.concatenate(out)


def encode_pool(vq: VQGAN, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int32 [N, latent_size**2] VQGAN codes of uint8 images."""
    codes = _map_padded(lambda c: vq.encode(jnp.asarray(c, jnp.float32) / 255.0)[1], images, batch_size)
    return codes.astype(np.int32)


def decode_codes(vq: VQGAN, codes: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] images of VQGAN codes."""
    return _map_padded(lambda c: vq.decode_images(jnp.asarray(c)), codes, batch_size)
