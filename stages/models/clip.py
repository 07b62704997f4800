"""CLIP: a ViT image tower and a causal text transformer, scored by cosine similarity.

Written as pure functions of a parameter tree whose names are exactly those of
`transformers.FlaxCLIPModel`, so the released `flax_model.msgpack` (e.g.
openai/clip-vit-base-patch32) loads without any renaming:

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers/{i}/{layer_norm1,self_attn/{q,k,v,out}_proj,layer_norm2,mlp/{fc1,fc2}}
    text_model/final_layer_norm
    vision_model/embeddings/{class_embedding,patch_embedding/kernel,position_embedding/embedding}
    vision_model/pre_layrnorm          (sic: the released spelling)
    vision_model/encoder/layers/{i}/...
    vision_model/post_layernorm
    text_projection/kernel, visual_projection/kernel   (no biases)
    logit_scale                        (0-d, log of the similarity scale)

`CLIPConfig` is the single source of sizes. The functions compute in the dtype
of the parameters; layer-norm statistics, the attention softmax, the embeddings'
normalisation and the similarity are taken in float32. Dropout is not
implemented: released CLIP configs set attention_dropout 0.

Shapes: B batch, L text length, D hidden size, H heads, P projection_dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.checkpoint import Pretrained, UnsupportedConfigError, known_fields

Params = dict[str, Any]

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


def _pair(value: Any, what: str) -> tuple[int, int]:
    """An int or an [h, w] pair as (h, w); transformers allows both for image_size / patch_size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise UnsupportedConfigError(f"CLIP vision_config.{what} must be an int or [height, width], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _check_common(cfg: Any, where: str) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"CLIP {where}.hidden_act {cfg.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedConfigError(
            f"CLIP {where}.hidden_size ({cfg.hidden_size}) must be a multiple of "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(cfg, name) < 1:
            raise UnsupportedConfigError(f"CLIP {where}.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_hidden_layers < 0:
        raise UnsupportedConfigError(f"CLIP {where}.num_hidden_layers must be >= 0, got {cfg.num_hidden_layers}")


@dataclasses.dataclass(frozen=True)
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
            raise UnsupportedConfigError(
                f"CLIP text_config needs vocab_size >= 1 and max_position_embeddings >= 1, got "
                f"{self.vocab_size} and {self.max_position_embeddings}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CLIPTextConfig":
        return cls(**known_fields(cls, data or {}))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": "clip_text_model"}


@dataclasses.dataclass(frozen=True)
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
            raise UnsupportedConfigError(
                f"CLIP vision_config: image_size {self.image_size} must be at least patch_size {self.patch_size} (>= 1)"
            )
        if self.num_channels < 1:
            raise UnsupportedConfigError(f"CLIP vision_config.num_channels must be >= 1, got {self.num_channels}")

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
        return cls(**known_fields(cls, data or {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("image_size", "patch_size"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return {**out, "model_type": "clip_vision_model"}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Top-level CLIPConfig: the two towers plus the shared projection size."""

    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.projection_dim < 1:
            raise UnsupportedConfigError(f"CLIP projection_dim must be >= 1, got {self.projection_dim}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPConfig":
        model_type = data.get("model_type", "clip")
        if model_type != "clip":
            raise UnsupportedConfigError(f"expected a CLIP config (model_type 'clip'), got model_type {model_type!r}")
        towers = {}
        for name in ("text_config", "vision_config"):
            merged = dict(data.get(name) or {})
            # Older configs (transformers < 4.27 era) may carry `text_config_dict`; transformers lets it win.
            merged.update(data.get(f"{name}_dict") or {})
            towers[name] = merged
        top = {k: v for k, v in known_fields(cls, data).items() if k not in ("text_config", "vision_config")}
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


# ----------------------------------------------------------------------------- building blocks


def layer_norm(x: jax.Array, p: Mapping[str, jax.Array], eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32 (flax's, with its two-pass variance)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1)
    var = jnp.square(xf - mean[..., None]).mean(-1)
    y = x - mean[..., None]
    mul = jax.lax.rsqrt(var[..., None] + eps) * p["scale"]
    return (y * mul + p["bias"]).astype(x.dtype)


def dense(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    y = jax.lax.dot_general(x, p["kernel"], (((x.ndim - 1,), (0,)), ((), ())))
    return y + p["bias"] if "bias" in p else y


def attention(x: jax.Array, p: Params, config: Any, bias: jax.Array | None) -> jax.Array:
    """Multi-head self-attention; `bias` is added to the logits (0 where allowed, very negative where masked)."""
    heads = (config.num_attention_heads, config.head_dim)
    q = dense(x, p["q_proj"]).reshape(x.shape[:-1] + heads)
    k = dense(x, p["k_proj"]).reshape(x.shape[:-1] + heads)
    v = dense(x, p["v_proj"]).reshape(x.shape[:-1] + heads)
    q = q * jnp.asarray(config.head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    return dense(out, p["out_proj"])


def mlp(x: jax.Array, p: Params, config: Any) -> jax.Array:
    return dense(ACTIVATIONS[config.hidden_act](dense(x, p["fc1"])), p["fc2"])


def encoder(h: jax.Array, p: Params, config: Any, bias: jax.Array | None) -> jax.Array:
    """Pre-LN transformer blocks `layers/{i}`: h + attn(ln1(h)), then h + mlp(ln2(h))."""
    eps = config.layer_norm_eps
    for i in range(config.num_hidden_layers):
        layer = p["layers"][str(i)]
        h = h + attention(layer_norm(h, layer["layer_norm1"], eps), layer["self_attn"], config, bias)
        h = h + mlp(layer_norm(h, layer["layer_norm2"], eps), layer["mlp"], config)
    return h


# ----------------------------------------------------------------------------- the two towers


def text_features(p: Params, input_ids: jax.Array, attention_mask: jax.Array, config: CLIPTextConfig) -> jax.Array:
    """Causal text transformer: ids and mask [B, L] -> the final-normed state at each row's EOS [B, D]."""
    length = input_ids.shape[-1]
    if length > config.max_position_embeddings:
        raise ValueError(
            f"CLIP text input has {length} tokens; the model takes at most "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    emb = p["embeddings"]
    h = (jnp.take(emb["token_embedding"]["embedding"], input_ids, axis=0)
         + jnp.take(emb["position_embedding"]["embedding"], jnp.arange(length), axis=0)[None])
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    h = layer_norm(encoder(h, p["encoder"], config, bias), p["final_layer_norm"], config.layer_norm_eps)
    # EOS is the largest id in CLIP's vocabulary, so argmax finds each row's first EOS
    # (the pooling FlaxCLIPModel uses; padding that repeats EOS comes after it).
    eos = jnp.argmax(input_ids, axis=-1)
    return jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]


def image_features(p: Params, pixel_values: jax.Array, config: CLIPVisionConfig) -> jax.Array:
    """ViT: NCHW pixels [B, C, H, W] -> post_layernorm of the class-token state [B, D]."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"CLIP pixel_values must be NCHW [batch, {config.num_channels}, H, W], got shape {pixel_values.shape}"
        )
    emb = p["embeddings"]
    kernel = emb["patch_embedding"]["kernel"]
    x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(kernel.dtype)  # NCHW (the HF layout) -> NHWC for conv
    patches = jax.lax.conv_general_dilated(x, kernel, config.patch_hw, "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, config.hidden_size)  # row-major over the patch grid
    cls = jnp.broadcast_to(emb["class_embedding"].astype(patches.dtype), (batch, 1, config.hidden_size))
    h = jnp.concatenate([cls, patches], axis=1)
    if h.shape[1] != config.num_positions:
        raise ValueError(
            f"CLIP vision input of {x.shape[1]}x{x.shape[2]} pixels gives {h.shape[1] - 1} "
            f"patches; the model expects {config.image_size} pixels ({config.num_positions - 1} patches)"
        )
    h = h + jnp.take(emb["position_embedding"]["embedding"], jnp.arange(config.num_positions), axis=0)[None]
    h = layer_norm(h, p["pre_layrnorm"], config.layer_norm_eps)
    h = encoder(h, p["encoder"], config, None)
    return layer_norm(h[:, 0], p["post_layernorm"], config.layer_norm_eps)


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def encode_text(params: Params, input_ids: jax.Array, attention_mask: jax.Array, config: CLIPConfig) -> jax.Array:
    """[B, L] int ids and mask -> [B, P] unit-norm text embeddings (float32)."""
    pooled = text_features(params["text_model"], input_ids, attention_mask, config.text_config)
    return _l2_normalize(dense(pooled, params["text_projection"]))


def encode_image(params: Params, pixel_values: jax.Array, config: CLIPConfig) -> jax.Array:
    """NCHW float pixels (already normalised) -> [B, P] unit-norm image embeddings (float32)."""
    pooled = image_features(params["vision_model"], pixel_values, config.vision_config)
    return _l2_normalize(dense(pooled, params["visual_projection"]))


def forward(params: Params, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array,
            config: CLIPConfig) -> dict[str, jax.Array]:
    """What FlaxCLIPModel returns: logits_per_text [B_txt, B_img] = exp(logit_scale) * cosine similarity,
    logits_per_image (its transpose), text_embeds and image_embeds."""
    text_embeds = encode_text(params, input_ids, attention_mask, config)
    image_embeds = encode_image(params, pixel_values, config)
    logits_per_text = jnp.exp(params["logit_scale"].astype(jnp.float32)) * (text_embeds @ image_embeds.T)
    return {"logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text,
            "text_embeds": text_embeds, "image_embeds": image_embeds}


# ----------------------------------------------------------------------------- parameters


def param_shapes(config: CLIPConfig) -> Params:
    """The parameter tree `config` implies, as float32 ShapeDtypeStructs."""

    def array(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def dense_p(n_in: int, n_out: int) -> Params:
        return {"kernel": array(n_in, n_out), "bias": array(n_out)}

    def norm_p(n: int) -> Params:
        return {"scale": array(n), "bias": array(n)}

    def encoder_p(c: Any) -> Params:
        d = c.hidden_size
        layer = {"layer_norm1": norm_p(d), "layer_norm2": norm_p(d),
                 "self_attn": {name: dense_p(d, d) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
                 "mlp": {"fc1": dense_p(d, c.intermediate_size), "fc2": dense_p(c.intermediate_size, d)}}
        return {"layers": {str(i): layer for i in range(c.num_hidden_layers)}}

    t, v = config.text_config, config.vision_config
    (ph, pw), d = v.patch_hw, v.hidden_size
    return {
        "text_model": {"embeddings": {"token_embedding": {"embedding": array(t.vocab_size, t.hidden_size)},
                                      "position_embedding": {"embedding": array(t.max_position_embeddings,
                                                                                t.hidden_size)}},
                       "encoder": encoder_p(t), "final_layer_norm": norm_p(t.hidden_size)},
        "vision_model": {"embeddings": {"class_embedding": array(d),
                                        "patch_embedding": {"kernel": array(ph, pw, v.num_channels, d)},
                                        "position_embedding": {"embedding": array(v.num_positions, d)}},
                         "pre_layrnorm": norm_p(d), "encoder": encoder_p(v), "post_layernorm": norm_p(d)},
        "text_projection": {"kernel": array(t.hidden_size, config.projection_dim)},
        "visual_projection": {"kernel": array(d, config.projection_dim)},
        "logit_scale": array(),
    }


def init_params(config: CLIPConfig, seed: int = 0) -> Params:
    """Fresh float32 weights drawn on the host with numpy, leaf by leaf in the tree's (sorted) order:
    normal(initializer_range * initializer_factor) for kernels and embeddings, ones / zeros for norm
    scales / biases, zero Dense biases, logit_scale = logit_scale_init_value."""
    rng = np.random.default_rng(seed)
    towers = {"text_model": config.text_config, "text_projection": config.text_config,
              "vision_model": config.vision_config, "visual_projection": config.vision_config}

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        names = tuple(k.key for k in path)
        if names == ("logit_scale",):
            return np.full(leaf.shape, config.logit_scale_init_value, np.float32)
        name, in_norm = names[-1], "norm" in names[-2] or names[-2].endswith("layrnorm")
        if name == "scale" and in_norm:
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        tower = towers[names[0]]
        std = tower.initializer_range * tower.initializer_factor
        return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


# ----------------------------------------------------------------------------- the model object

# Jitted at the boundary, once per config and input shape (a static argument).
_encode_text = jax.jit(encode_text, static_argnames="config")
_encode_image = jax.jit(encode_image, static_argnames="config")
_forward = jax.jit(forward, static_argnames="config")


class CLIP(Pretrained):
    """A loaded CLIP: config + params (the released tree, in the compute dtype).

    Each method is a jitted pure function of (params, inputs); `params` defaults to `self.params`,
    so a placed (e.g. replicated) copy can be passed with batches sharded on the leading axis.
    """

    config_class = CLIPConfig
    param_shapes = staticmethod(param_shapes)
    init_params = staticmethod(init_params)

    def encode_text(self, input_ids: Any, attention_mask: Any, params: Params | None = None) -> jax.Array:
        """[B, L] int ids and mask -> [B, projection_dim] unit-norm text embeddings (float32)."""
        return _encode_text(self._params(params), jnp.asarray(input_ids, jnp.int32),
                            jnp.asarray(attention_mask, jnp.int32), self.config)

    def encode_image(self, pixel_values: Any, params: Params | None = None) -> jax.Array:
        """NCHW float pixels (already normalised) -> [B, projection_dim] unit-norm image embeddings (float32)."""
        return _encode_image(self._params(params), jnp.asarray(pixel_values, jnp.float32), self.config)

    def __call__(self, input_ids: Any, attention_mask: Any, pixel_values: Any,
                 params: Params | None = None) -> dict[str, jax.Array]:
        return _forward(self._params(params), jnp.asarray(input_ids, jnp.int32),
                        jnp.asarray(attention_mask, jnp.int32), jnp.asarray(pixel_values, jnp.float32), self.config)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the factor between cosine similarity and logits."""
        return float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))

    def _params(self, params: Params | None) -> Params:
        return self.params if params is None else params
