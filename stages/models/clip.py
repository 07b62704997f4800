"""CLIP (ViT image tower + causal text transformer) in Flax linen.

The module tree reproduces `transformers.FlaxCLIPModel` name for name, so the
released `flax_model.msgpack` (e.g. openai/clip-vit-base-patch32) loads without
any renaming:

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers/{i}/{layer_norm1,self_attn/{q,k,v,out}_proj,layer_norm2,mlp/{fc1,fc2}}
    text_model/final_layer_norm
    vision_model/embeddings/{class_embedding,patch_embedding/kernel,position_embedding/embedding}
    vision_model/pre_layrnorm          (sic: the released spelling)
    vision_model/encoder/layers/{i}/...
    vision_model/post_layernorm
    text_projection/kernel, visual_projection/kernel   (no biases)
    logit_scale                        (0-d, log of the similarity scale)

`CLIPConfig` is the single source of sizes. `CLIP` wraps config + params and
exposes jitted pure functions of the parameter tree, so a caller may place the
params replicated on a `jax.sharding.Mesh` and pass batches sharded on the
leading axis; jit follows the input shardings.

Dropout is not implemented: released CLIP configs set attention_dropout 0, and
the forward pass (inference and `contrastive_loss`) is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.checkpoint import (
    CheckpointError,
    cast_params,
    check_tree,
    read_config,
    read_params,
    resolve_model_dir,
    write_checkpoint,
)

# transformers' Flax ACT2FN entries that CLIP checkpoints use or could use.
# "gelu" is the exact erf form there; the tanh forms have their own names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _pick(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of dataclass `cls` (config.json carries many unrelated keys)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _pair(value: Any, what: str) -> tuple[int, int]:
    """An int or an [h, w] pair as (h, w); transformers allows both for image_size / patch_size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"CLIP vision_config.{what} must be an int or [height, width], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _check_common(cfg: Any, where: str) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"CLIP {where}.hidden_act {cfg.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"CLIP {where}.hidden_size ({cfg.hidden_size}) must be a multiple of "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"CLIP {where}.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_hidden_layers < 0:
        raise ValueError(f"CLIP {where}.num_hidden_layers must be >= 0, got {cfg.num_hidden_layers}")


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields (defaults as transformers 5 when a key is absent)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    # Kept for a faithful config.json; the model pools at argmax(input_ids), as FlaxCLIPModel does.
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    # Unused by CLIPModel (the top-level projection_dim is the one that counts); kept for round trips.
    projection_dim: int = 512

    def __post_init__(self) -> None:
        _check_common(self, "text_config")
        if self.max_position_embeddings < 1 or self.vocab_size < 1:
            raise ValueError(
                f"CLIP text_config needs vocab_size >= 1 and max_position_embeddings >= 1, got "
                f"{self.vocab_size} and {self.max_position_embeddings}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CLIPTextConfig":
        return cls(**_pick(cls, data or {}))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": "clip_text_model"}


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields (defaults as transformers 5 when a key is absent)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    projection_dim: int = 512  # unused, see CLIPTextConfig.projection_dim

    def __post_init__(self) -> None:
        _check_common(self, "vision_config")
        # json gives lists; keep the frozen dataclass hashable.
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        if min(ph, pw) < 1 or h < ph or w < pw:
            raise ValueError(
                f"CLIP vision_config: image_size {self.image_size} must be at least patch_size {self.patch_size} (>= 1)"
            )
        if self.num_channels < 1:
            raise ValueError(f"CLIP vision_config.num_channels must be >= 1, got {self.num_channels}")

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size, "image_size")

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size, "patch_size")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row; a VALID strided conv drops a remainder, as in transformers."""
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_positions(self) -> int:
        gh, gw = self.grid
        return gh * gw + 1  # + the class token

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CLIPVisionConfig":
        return cls(**_pick(cls, data or {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("image_size", "patch_size"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return {**out, "model_type": "clip_vision_model"}


@dataclass(frozen=True)
class CLIPConfig:
    """Top-level CLIPConfig: the two towers plus the shared projection size."""

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.projection_dim < 1:
            raise ValueError(f"CLIP projection_dim must be >= 1, got {self.projection_dim}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPConfig":
        model_type = data.get("model_type", "clip")
        if model_type != "clip":
            raise ValueError(f"expected a CLIP config (model_type 'clip'), got model_type {model_type!r}")
        towers = {}
        for name in ("text_config", "vision_config"):
            merged = dict(data.get(name) or {})
            # Older configs (transformers < 4.27 era) may carry `text_config_dict`; transformers lets it win.
            merged.update(data.get(f"{name}_dict") or {})
            towers[name] = merged
        top = {k: v for k, v in _pick(cls, data).items() if k not in ("text_config", "vision_config")}
        return cls(
            text_config=CLIPTextConfig.from_dict(towers["text_config"]),
            vision_config=CLIPVisionConfig.from_dict(towers["vision_config"]),
            **top,
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers' CLIPModel / FlaxCLIPModel accept."""
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": self.initializer_factor,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }


# ---------------------------------------------------------------- modules


def _dense_init(cfg: Any) -> nn.initializers.Initializer:
    return nn.initializers.normal(cfg.initializer_range * cfg.initializer_factor)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; `bias` is added to the logits (0 where allowed, very negative where masked)."""

    config: Any  # CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        dense = functools.partial(nn.Dense, cfg.hidden_size, dtype=self.dtype, kernel_init=_dense_init(cfg))
        heads = (cfg.num_attention_heads, cfg.head_dim)
        q = dense(name="q_proj")(x).reshape(x.shape[:-1] + heads)
        k = dense(name="k_proj")(x).reshape(x.shape[:-1] + heads)
        v = dense(name="v_proj")(x).reshape(x.shape[:-1] + heads)
        q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        # softmax in float32 even for bf16 compute: masked logits use a large negative bias.
        logits = logits.astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, kernel_init=_dense_init(cfg), name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, kernel_init=_dense_init(cfg), name="fc2")(x)


def _layer_norm(cfg: Any, dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance: a little more accurate than E[x^2]-E[x]^2, and the reference has it to spare.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: h + attn(ln1(h)), then h + mlp(ln2(h))."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = h + CLIPAttention(cfg, self.dtype, name="self_attn")(_layer_norm(cfg, self.dtype, "layer_norm1")(h), bias)
        h = h + CLIPMLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, self.dtype, "layer_norm2")(h))
        return h


class CLIPLayerCollection(nn.Module):
    """Holds the blocks under the names "0", "1", ... as in the released tree (encoder/layers/{i})."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array | None) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            h = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(h, bias)
        return h


class CLIPEncoder(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array | None) -> jax.Array:
        return CLIPLayerCollection(self.config, self.dtype, name="layers")(h, bias)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range * cfg.initializer_factor)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=init, name="token_embedding")
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, embedding_init=init, name="position_embedding"
        )
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
    """Causal text transformer; returns the final-normed hidden state at each row's EOS."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP text input has {length} tokens; the model takes at most "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        h = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        h = CLIPEncoder(cfg, self.dtype, name="encoder")(h, bias)
        h = _layer_norm(cfg, self.dtype, "final_layer_norm")(h)
        # EOS is the largest id in CLIP's vocabulary, so argmax finds each row's first EOS
        # (the pooling FlaxCLIPModel uses; padding that repeats EOS comes after it).
        eos = jnp.argmax(input_ids, axis=-1)
        return jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range * cfg.initializer_factor)
        class_embedding = self.param("class_embedding", init, (cfg.hidden_size,))
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=cfg.patch_hw,
            strides=cfg.patch_hw,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=init,
            name="patch_embedding",
        )(pixels_nhwc)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)  # row-major over the patch grid
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, cfg.hidden_size))
        h = jnp.concatenate([cls, patches], axis=1)
        if h.shape[1] != cfg.num_positions:
            raise ValueError(
                f"CLIP vision input of {pixels_nhwc.shape[1]}x{pixels_nhwc.shape[2]} pixels gives {h.shape[1] - 1} "
                f"patches; the model expects {cfg.image_size} pixels ({cfg.num_positions - 1} patches)"
            )
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                             name="position_embedding")
        return h + positions(jnp.arange(cfg.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """ViT with a class token; returns post_layernorm of the class-token state."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(
                f"CLIP pixel_values must be NCHW [batch, {cfg.num_channels}, H, W], got shape {pixel_values.shape}"
            )
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW (the HF layout) -> NHWC for conv
        h = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(x)
        h = _layer_norm(cfg, self.dtype, "pre_layrnorm")(h)
        h = CLIPEncoder(cfg, self.dtype, name="encoder")(h, None)
        return _layer_norm(cfg, self.dtype, "post_layernorm")(h[:, 0])


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModule(nn.Module):
    """Both towers, their projections and the learned logit scale."""

    config: CLIPConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text_config, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, self.dtype)
        self.text_projection = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_dense_init(cfg.text_config)
        )
        self.visual_projection = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_dense_init(cfg.vision_config)
        )
        self.logit_scale = self.param(
            "logit_scale", lambda _, shape: jnp.full(shape, cfg.logit_scale_init_value, jnp.float32), ()
        )

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return _l2_normalize(self.text_projection(self.text_model(input_ids, attention_mask)))

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        return _l2_normalize(self.visual_projection(self.vision_model(pixel_values)))

    def similarity(self, text_embeds: jax.Array, image_embeds: jax.Array) -> jax.Array:
        """logits_per_text [B_txt, B_img] = exp(logit_scale) * cosine similarity."""
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        return scale * (text_embeds @ image_embeds.T)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array) -> dict[str, jax.Array]:
        text_embeds = self.encode_text(input_ids, attention_mask)
        image_embeds = self.encode_image(pixel_values)
        logits_per_text = self.similarity(text_embeds, image_embeds)
        return {
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
            "text_embeds": text_embeds,
            "image_embeds": image_embeds,
        }


# ---------------------------------------------------------------- wrapper


def _dummy_inputs(config: CLIPConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    vc = config.vision_config
    h, w = vc.image_hw
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.ones_like(ids), jnp.zeros((1, vc.num_channels, h, w), jnp.float32)


class CLIP:
    """A CLIP checkpoint: `config`, `params` (plain nested dict) and the linen `module`.

    The encode / call / loss functions are jitted pure functions of the
    parameter tree. Each method uses `self.params` unless `params=` is given,
    so sharded or updated trees can be passed without rebuilding the wrapper.
    """

    def __init__(
        self, config: CLIPConfig, params: Mapping[str, Any], dtype: Any = jnp.float32, *, source: str = "CLIP"
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.module = CLIPModule(config, dtype=dtype)
        # `source` names where the params came from, for the error message.
        check_tree(self.param_shapes(config), params, source)
        self.params = jax.tree.map(jnp.asarray, dict(params))
        module = self.module
        self._encode_text = jax.jit(
            lambda p, ids, mask: module.apply({"params": p}, ids, mask, method=CLIPModule.encode_text)
        )
        self._encode_image = jax.jit(
            lambda p, pixels: module.apply({"params": p}, pixels, method=CLIPModule.encode_image)
        )
        self._forward = jax.jit(lambda p, ids, mask, pixels: module.apply({"params": p}, ids, mask, pixels))
        self._loss = jax.jit(self._contrastive_loss)

    # -- construction

    @staticmethod
    def param_shapes(config: CLIPConfig) -> dict[str, Any]:
        """The parameter tree `config` implies, as ShapeDtypeStructs (no memory allocated)."""
        module = CLIPModule(config)
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *_dummy_inputs(config))
        return variables["params"]

    @classmethod
    def from_pretrained(
        cls, ref: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
    ) -> "CLIP":
        """Load a folder (or hub id) holding config.json + flax_model.msgpack in the FlaxCLIPModel layout.

        `dtype` is the compute dtype; `param_dtype` the dtype the weights are kept in.
        """
        folder = resolve_model_dir(ref)
        try:
            config = CLIPConfig.from_dict(read_config(folder))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{folder}: unsupported CLIP config: {err}") from err
        params = cast_params(read_params(folder), _np_dtype(param_dtype))
        return cls(config, params, dtype=dtype, source=f"CLIP checkpoint {folder}")

    @classmethod
    def init_random(cls, config: CLIPConfig, seed: int = 0, dtype: Any = jnp.float32) -> "CLIP":
        """Fresh weights: normal(initializer_range * initializer_factor) for kernels and embeddings,
        ones / zeros for norm scales / biases, zero Dense biases, logit_scale = logit_scale_init_value.

        The same distributions as `module.init`, drawn with numpy from the eval_shape tree: compiling
        `module.init` costs seconds even for a tiny model, and this runs in milliseconds.
        """
        rng = np.random.default_rng(seed)
        towers = {"text_model": config.text_config, "text_projection": config.text_config,
                  "vision_model": config.vision_config, "visual_projection": config.vision_config}

        def draw(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
            if path == ("logit_scale",):
                return np.full(leaf.shape, config.logit_scale_init_value, np.float32)
            name, in_norm = path[-1], "norm" in path[-2] or path[-2].endswith("layrnorm")
            if name == "scale" and in_norm:
                return np.ones(leaf.shape, np.float32)
            if name == "bias":
                return np.zeros(leaf.shape, np.float32)
            tower = towers[path[0]]
            std = tower.initializer_range * tower.initializer_factor
            return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: draw(tuple(k.key for k in path), leaf), cls.param_shapes(config)
        )
        return cls(config, params, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + flax_model.msgpack in the released layout (FlaxCLIPModel can read it)."""
        write_checkpoint(folder, self.config.to_dict(), jax.device_get(self.params))

    # -- inference (pure in params; jit compiles once per input shape)

    def encode_text(self, input_ids: Any, attention_mask: Any, params: Any = None) -> jax.Array:
        """[B, L] int ids and mask -> [B, projection_dim] unit-norm text embeddings (float32)."""
        return self._encode_text(self._p(params), jnp.asarray(input_ids, jnp.int32),
                                 jnp.asarray(attention_mask, jnp.int32))

    def encode_image(self, pixel_values: Any, params: Any = None) -> jax.Array:
        """NCHW float pixels (already normalised) -> [B, projection_dim] unit-norm image embeddings (float32)."""
        return self._encode_image(self._p(params), jnp.asarray(pixel_values, jnp.float32))

    def __call__(self, input_ids: Any, attention_mask: Any, pixel_values: Any, params: Any = None) -> dict[str, jax.Array]:
        return self._forward(
            self._p(params),
            jnp.asarray(input_ids, jnp.int32),
            jnp.asarray(attention_mask, jnp.int32),
            jnp.asarray(pixel_values, jnp.float32),
        )

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor between cosine similarity and logits."""
        return float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))

    # -- training

    def _contrastive_loss(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                          pixel_values: jax.Array) -> jax.Array:
        out = self.module.apply({"params": params}, input_ids, attention_mask, pixel_values)
        return clip_loss(out["logits_per_text"])

    def contrastive_loss(self, params: Any, input_ids: Any, attention_mask: Any, pixel_values: Any) -> jax.Array:
        """Symmetric cross-entropy of matching pairs (row i of the texts goes with image i), as CLIP trains.

        Pure and differentiable in `params`: `jax.value_and_grad(clip.contrastive_loss)(params, ...)`.
        """
        if np.shape(input_ids)[0] != np.shape(pixel_values)[0]:
            raise ValueError(
                f"contrastive_loss pairs text i with image i: got {np.shape(input_ids)[0]} texts and "
                f"{np.shape(pixel_values)[0]} images"
            )
        return self._loss(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                          jnp.asarray(pixel_values, jnp.float32))

    def _p(self, params: Any) -> Any:
        return self.params if params is None else params


def clip_loss(logits_per_text: jax.Array) -> jax.Array:
    """Mean of the text->image and image->text cross-entropies with the diagonal as targets.

    Logits may be [B, B + K]: the last K columns are then images no text describes (negatives).
    Each text's cross-entropy runs over all B + K images; the image->text term over the B
    described images only, since the K others have no right text.
    """
    logits = logits_per_text.astype(jnp.float32)
    n = logits.shape[0]
    labels = jnp.arange(n)

    def cross_entropy(x: jax.Array) -> jax.Array:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), labels[:, None], axis=-1))

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits[:, :n].T))


def _np_dtype(dtype: Any) -> Any:
    """jnp / numpy dtype -> what cast_params accepts (bfloat16 by name)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return "bfloat16"
    return np.dtype(dtype)
