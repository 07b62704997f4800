"""VQGAN behaviour: what the pipeline and the training code rely on, on tiny random models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palette.stages.checkpoint import CheckpointError
from palette.stages.models.vqgan import VQGAN, VQGANConfig, param_shapes

# GroupNorm needs multiples of 32 channels, so ch=32 is the smallest width.
TWO_LEVELS = VQGANConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=8, attn_resolutions=(4,), z_channels=8, embed_dim=4, n_embed=16
)
THREE_LEVELS = VQGANConfig(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(4,), z_channels=8, embed_dim=4, n_embed=16
)

# The keys of the released dalle-mini/vqgan_imagenet_f16_16384 config.json.
RELEASED_KEYS = {
    "architectures", "attn_resolutions", "ch", "ch_mult", "double_z", "dropout", "embed_dim", "give_pre_end",
    "in_channels", "n_embed", "num_res_blocks", "num_resolutions", "out_ch", "resamp_with_conv", "resolution",
    "transformers_version", "z_channels",
}


@pytest.fixture(scope="module")
def small():
    return VQGAN.init_random(TWO_LEVELS, seed=0)


def random_codes(config: VQGANConfig, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.n_embed, size=(batch, config.latent_size**2), dtype=np.int32)


def smooth_images(config: VQGANConfig, batch: int) -> np.ndarray:
    side = config.resolution
    y, x = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    img = np.stack([x, y, 0.5 * (x + y)], axis=-1)
    return np.stack([img if b % 2 == 0 else 1 - img for b in range(batch)]).astype(np.float32)


@pytest.mark.parametrize("config", [TWO_LEVELS, THREE_LEVELS], ids=["2-levels", "3-levels"])
def test_decode_images_are_uint8_pictures_of_the_configured_size(config):
    vq = VQGAN.init_random(config, seed=1)
    codes = random_codes(config, batch=2)
    images = np.asarray(vq.decode_images(codes))
    assert images.dtype == np.uint8
    assert images.shape == (2, config.resolution, config.resolution, 3)
    raw = np.asarray(vq.decode_code(codes))
    assert raw.dtype == np.float32 and raw.shape == images.shape
    np.testing.assert_array_equal(images, np.round(np.clip(raw, 0, 1) * 255).astype(np.uint8))


def test_save_then_load_gives_identical_outputs(small, tmp_path):
    small.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert set(config) == RELEASED_KEYS
    assert config["num_resolutions"] == 2 and config["ch_mult"] == [1, 2]
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config == small.config
    codes = random_codes(TWO_LEVELS, batch=3, seed=2)
    np.testing.assert_array_equal(np.asarray(loaded.decode_code(codes)), np.asarray(small.decode_code(codes)))


def test_unsupported_flags_are_refused_by_name(small, tmp_path):
    base = TWO_LEVELS.to_dict()
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig.from_dict({**base, "double_z": True})
    with pytest.raises(ValueError, match="give_pre_end"):
        VQGANConfig.from_dict({**base, "give_pre_end": True})
    with pytest.raises(ValueError, match="ch=48"):
        VQGANConfig.from_dict({**base, "ch": 48})
    with pytest.raises(ValueError, match="num_resolutions"):
        VQGANConfig.from_dict({**base, "num_resolutions": 3})
    # Unknown keys (written by transformers) are ignored.
    assert VQGANConfig.from_dict({**base, "_name_or_path": "x", "torch_dtype": "float32"}) == TWO_LEVELS

    # And at load time, before any weight is read into a model.
    small.save_pretrained(tmp_path / "vq")
    path = tmp_path / "vq" / "config.json"
    path.write_text(json.dumps({**base, "double_z": True}))
    with pytest.raises(ValueError, match="double_z"):
        VQGAN.from_pretrained(tmp_path / "vq")


def test_checkpoint_not_matching_its_config_is_refused(small, tmp_path):
    small.save_pretrained(tmp_path / "vq")
    path = tmp_path / "vq" / "config.json"
    path.write_text(json.dumps({**TWO_LEVELS.to_dict(), "n_embed": 32}))
    with pytest.raises(CheckpointError, match="quantize/embedding/embedding"):
        VQGAN.from_pretrained(tmp_path / "vq")


def test_decode_code_needs_a_square_grid(small):
    with pytest.raises(ValueError, match="perfect square"):
        small.decode_code(np.zeros((1, 5), np.int32))


def test_encode_then_decode_round_trip_shapes(small):
    cfg = TWO_LEVELS
    images = smooth_images(cfg, batch=2)
    quantized, indices, latents = small.encode(images)
    grid = cfg.latent_size
    assert quantized.shape == latents.shape == (2, grid, grid, cfg.embed_dim)
    assert quantized.dtype == latents.dtype == jnp.float32
    assert indices.shape == (2, grid * grid) and indices.dtype == jnp.int32
    indices = np.asarray(indices)
    assert indices.min() >= 0 and indices.max() < cfg.n_embed
    codebook = np.asarray(small.params["quantize"]["embedding"]["embedding"])
    np.testing.assert_array_equal(np.asarray(quantized), codebook[indices].reshape(quantized.shape))
    # Each index is the nearest code to its latent vector.
    flat = np.asarray(latents).reshape(-1, cfg.embed_dim).astype(np.float64)
    dist = ((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(indices.reshape(-1), dist.argmin(-1))
    assert np.asarray(small.decode_images(indices)).shape == images.shape


def test_bfloat16_model_runs_and_stays_close(small, tmp_path):
    small.save_pretrained(tmp_path / "vq")
    vq16 = VQGAN.from_pretrained(tmp_path / "vq", dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(vq16.params)[0].dtype == jnp.bfloat16
    codes = random_codes(TWO_LEVELS, batch=2)
    out16 = np.asarray(vq16.decode_code(codes))
    assert out16.dtype == np.float32
    out32 = np.asarray(small.decode_code(codes))
    assert np.abs(out16 - out32).max() < 0.1 * (np.abs(out32).max() + 1)


def test_resampling_without_conv_has_no_resample_weights():
    # taming's resamp_with_conv=false: nearest upsampling / 2x2 average pooling, no conv parameters.
    config = VQGANConfig(**{**TWO_LEVELS.__dict__, "resamp_with_conv": False})
    names = "/".join(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(param_shapes(config)))
    assert "downsample" not in names and "upsample" not in names
    with_conv = "/".join(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(param_shapes(TWO_LEVELS)))
    assert "'downsample'" in with_conv and "'upsample'" in with_conv
