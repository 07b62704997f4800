"""DalleBart: the text-to-image-token seq2seq transformer of DALL·E Mini / Mega.

Written as pure functions of a parameter tree whose names are exactly those of
the released `flax_model.msgpack` (see `tests/reference/README.md` §3), so
loading is reading the tree. Layers are kept *per layer* at run time
(`FlaxBartEncoderLayer_{i}` names): released checkpoints are stored scanned
(every leaf stacked over a leading layer axis) and we unstack them once at load,
because slicing stacked weights inside the decode loop is what made the original
crawl on XLA:CPU.

Shapes: B batch, Lt text length, Li image length, D d_model, H heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from palette.stages.checkpoint import Pretrained, UnsupportedConfigError, cast_leaf, known_fields, place_leaves

LN_EPS = 1e-5
ENC_SCANNED = "FlaxBartEncoderLayers"
DEC_SCANNED = "FlaxBartDecoderLayers"

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    encoder_vocab_size: int = 50264
    image_vocab_size: int = 16384
    image_length: int = 256
    max_text_length: int = 64
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 2730
    decoder_ffn_dim: int = 2730
    activation_function: str = "gelu"
    ln_type: str = "layernorm"
    ln_positions: str = "normformer"
    use_glu: bool = True
    use_bias: bool = False
    use_final_ln_encoder: bool = True
    use_final_ln_decoder: bool = True
    force_ln_scale: bool = False
    use_absolute_position_embeddings: bool = True
    scale_embedding: bool = False
    tie_word_embeddings: bool = False
    use_scan: bool = True
    normalize_text: bool = True
    decoder_start_token_id: int = 16384
    bos_token_id: int = 16385
    eos_token_id: int = 16385
    pad_token_id: int = 16385
    init_std: float = 0.02
    # Flags we refuse unless they hold these values (they change the math).
    use_head_scale: bool = False
    use_cosine_attention: bool = False
    use_swin_position_embeddings: bool = False
    use_deepnet_scaling: bool = False
    use_alibi: bool = False
    sinkhorn_iters: int = 1
    # Everything else from config.json, kept so that save_pretrained round-trips it.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DalleBartConfig":
        """Read a config.json dict; keys that are not fields are kept in `extra`."""
        known = {k: v for k, v in known_fields(cls, raw).items() if k != "extra"}
        return cls(**known, extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out.setdefault("model_type", "dallebart")
        out.setdefault("is_encoder_decoder", True)
        out["max_length"] = self.image_length + 1
        out.setdefault("min_length", self.image_length + 1)
        return out

    def validate(self) -> None:
        refused = {
            "use_head_scale": (self.use_head_scale, False),
            "use_cosine_attention": (self.use_cosine_attention, False),
            "use_swin_position_embeddings": (self.use_swin_position_embeddings, False),
            "use_deepnet_scaling": (self.use_deepnet_scaling, False),
            "use_alibi": (self.use_alibi, False),
            "sinkhorn_iters": (self.sinkhorn_iters, 1),
            "ln_type": (self.ln_type, "layernorm"),
            "activation_function": (self.activation_function, "gelu"),
        }
        for flag, (value, supported) in refused.items():
            if value != supported:
                raise UnsupportedConfigError(
                    f"DalleBart config sets {flag}={value!r}; Palette implements only {flag}={supported!r}"
                )
        if self.ln_positions not in ("normformer", "preln"):
            raise UnsupportedConfigError(
                f"DalleBart config sets ln_positions={self.ln_positions!r}; Palette implements 'normformer' and 'preln'"
            )
        for heads, name in ((self.encoder_attention_heads, "encoder"), (self.decoder_attention_heads, "decoder")):
            if self.d_model % heads:
                raise UnsupportedConfigError(f"d_model={self.d_model} is not divisible by {name}_attention_heads={heads}")

    @property
    def logits_size(self) -> int:
        """lm_head outputs: image codes plus one extra id (the decoder start / BOS slot)."""
        return self.image_vocab_size + 1


# ----------------------------------------------------------------------------- building blocks


def layer_norm(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """LayerNorm over the last axis in float32; `scale` is absent for norms created with use_scale=False."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + LN_EPS)
    if "scale" in p:
        y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def dense(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def heads_first(x: jax.Array, heads: int) -> jax.Array:
    """[B, L, H*d] -> [B, H, L, d]: the layout keys and values are kept in (and cached in),
    so attention is a plain batched matmul with no per-step transpose of the cache."""
    return split_heads(x, heads).transpose(0, 2, 1, 3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """q [B,Q,H,d], k/v [B,H,K,d], allowed broadcastable to [B,H,Q,K] -> [B,Q,H*d]."""
    scores = jnp.einsum("bqhd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", weights, v)
    return out.reshape(*out.shape[:2], -1)


def feed_forward(x: jax.Array, p: Mapping[str, Any], config: DalleBartConfig) -> jax.Array:
    """GLU (use_glu) or classic FFN, each with a pre-norm and, for normformer, a norm before the last Dense."""
    if config.use_glu:
        p = p["GLU_0"]
        h = layer_norm(x, p["LayerNorm_0"])
        h = gelu(dense(h, p["Dense_0"])) * dense(h, p["Dense_1"])
        if config.ln_positions == "normformer":
            h = layer_norm(h, p["LayerNorm_1"])
        return dense(h, p["Dense_2"])
    p = p["FFN_0"]
    h = gelu(dense(layer_norm(x, p["LayerNorm_0"]), p["Dense_0"]))
    if config.ln_positions == "normformer":
        h = layer_norm(h, p["LayerNorm_1"])
    return dense(h, p["Dense_1"])


def attention_block(x, kv, allowed, p, heads):
    q = split_heads(dense(x, p["q_proj"]), heads)
    k = heads_first(dense(kv, p["k_proj"]), heads)
    v = heads_first(dense(kv, p["v_proj"]), heads)
    return dense(attend(q, k, v, allowed), p["out_proj"])


def embed(ids: jax.Array, positions: jax.Array, p: Mapping[str, Any], config: DalleBartConfig) -> jax.Array:
    h = jnp.take(p["embed_tokens"]["embedding"], ids, axis=0)
    if config.scale_embedding:
        h = h * math.sqrt(config.d_model)
    if config.use_absolute_position_embeddings:
        h = h + jnp.take(p["embed_positions"]["embedding"], positions, axis=0)
    return layer_norm(h, p["layernorm_embedding"])


# ----------------------------------------------------------------------------- encoder


def encoder_layer(h, allowed, p, config: DalleBartConfig):
    heads = config.encoder_attention_heads
    if config.ln_positions == "normformer":
        x = layer_norm(h, p["LayerNorm_0"])
        h = h + layer_norm(attention_block(x, x, allowed, p["FlaxBartAttention_0"], heads), p["LayerNorm_1"])
    else:
        x = layer_norm(h, p["LayerNorm_0"])
        h = h + attention_block(x, x, allowed, p["FlaxBartAttention_0"], heads)
    return h + feed_forward(h, p, config)


def encode(params: Params, input_ids: jax.Array, attention_mask: jax.Array, config: DalleBartConfig) -> jax.Array:
    """input_ids/attention_mask [B, Lt] -> encoder_last_hidden_state [B, Lt, D]."""
    p = params["model"]["encoder"]
    positions = jnp.arange(input_ids.shape[1])[None, :]
    h = embed(input_ids, positions, p, config)
    allowed = attention_mask[:, None, None, :].astype(bool)
    for i in range(config.encoder_layers):
        h = encoder_layer(h, allowed, p["layers"][f"FlaxBartEncoderLayer_{i}"], config)
    if config.use_final_ln_encoder:
        h = layer_norm(h, p["final_ln"])
    return h


# ----------------------------------------------------------------------------- decoder


def decoder_layers(params: Params, config: DalleBartConfig) -> list[Params]:
    p = params["model"]["decoder"]["layers"]
    return [p[f"FlaxBartDecoderLayer_{i}"] for i in range(config.decoder_layers)]


def cross_attention_kv(params: Params, enc: jax.Array, config: DalleBartConfig) -> list[tuple[jax.Array, jax.Array]]:
    """Per decoder layer, the cross-attention keys and values [B, H, Lt, d]: computed once per prompt."""
    heads = config.decoder_attention_heads
    out = []
    for p in decoder_layers(params, config):
        attn = p["FlaxBartAttention_1"]
        out.append((heads_first(dense(enc, attn["k_proj"]), heads), heads_first(dense(enc, attn["v_proj"]), heads)))
    return out


def decoder_layer(h, self_kv, self_allowed, cross_kv, cross_allowed, p, config: DalleBartConfig):
    """One decoder layer given this layer's self-attention keys/values (cached or full) and cross keys/values."""
    heads = config.decoder_attention_heads
    normformer = config.ln_positions == "normformer"
    sa, ca = p["FlaxBartAttention_0"], p["FlaxBartAttention_1"]

    x = layer_norm(h, p["LayerNorm_0"])
    q = split_heads(dense(x, sa["q_proj"]), heads)
    k_new = heads_first(dense(x, sa["k_proj"]), heads)
    v_new = heads_first(dense(x, sa["v_proj"]), heads)
    k, v, new_cache = self_kv(k_new, v_new)
    a = dense(attend(q, k, v, self_allowed), sa["out_proj"])
    h = h + (layer_norm(a, p["LayerNorm_1"]) if normformer else a)

    x = layer_norm(h, p["LayerNorm_2"] if normformer else p["LayerNorm_1"])
    q = split_heads(dense(x, ca["q_proj"]), heads)
    a = dense(attend(q, cross_kv[0], cross_kv[1], cross_allowed), ca["out_proj"])
    h = h + (layer_norm(a, p["LayerNorm_3"]) if normformer else a)
    return h + feed_forward(h, p, config), new_cache


def final_norm(params: Params, h: jax.Array, config: DalleBartConfig) -> jax.Array:
    """The decoder's last hidden states as lm_head reads them (after the final layer norm, if any)."""
    if config.use_final_ln_decoder:
        h = layer_norm(h, params["model"]["decoder"]["final_ln"])
    return h


def lm_logits(params: Params, h: jax.Array, config: DalleBartConfig) -> jax.Array:
    h = final_norm(params, h, config)
    if config.tie_word_embeddings:
        kernel = params["model"]["decoder"]["embed_tokens"]["embedding"].T
    else:
        kernel = params["lm_head"]["kernel"]
    return (h @ kernel).astype(jnp.float32)


def decoder_states(
    params: Params,
    decoder_input_ids: jax.Array,
    enc: jax.Array,
    attention_mask: jax.Array,
    config: DalleBartConfig,
) -> jax.Array:
    """Teacher-forced decoder layers over the whole sequence: [B, Ld] -> hidden states [B, Ld, D]
    (before the final layer norm)."""
    length = decoder_input_ids.shape[1]
    h = embed(decoder_input_ids, jnp.arange(length)[None, :], params["model"]["decoder"], config)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    cross_allowed = attention_mask[:, None, None, :].astype(bool)
    no_cache = lambda k, v: (k, v, None)  # noqa: E731 - full sequence: keys are this pass's keys
    for p, kv in zip(decoder_layers(params, config), cross_attention_kv(params, enc, config)):
        h, _ = decoder_layer(h, no_cache, causal, kv, cross_allowed, p, config)
    return h


def decode(
    params: Params,
    decoder_input_ids: jax.Array,
    enc: jax.Array,
    attention_mask: jax.Array,
    config: DalleBartConfig,
) -> jax.Array:
    """Teacher-forced decoder over the whole sequence: [B, Ld] -> logits [B, Ld, image_vocab_size + 1]."""
    return lm_logits(params, decoder_states(params, decoder_input_ids, enc, attention_mask, config), config)


def forward(params: Params, input_ids, attention_mask, decoder_input_ids, config: DalleBartConfig):
    """(logits, encoder_last_hidden_state): what `DalleBart(...)` returns in the original."""
    enc = encode(params, input_ids, attention_mask, config)
    return decode(params, decoder_input_ids, enc, attention_mask, config), enc


# ----------------------------------------------------------------------------- parameters


def _norm(features: int, with_scale: bool, dtype) -> Params:
    p = {"bias": jnp.zeros((features,), dtype)}
    if with_scale:
        p["scale"] = jnp.ones((features,), dtype)
    return p


def init_params(config: DalleBartConfig, seed: int = 0) -> Params:
    """Fresh float32 parameters in the unscanned run-time layout (normal(init_std) kernels, unit norms,
    zero biases), drawn with jax.random."""
    dtype = jnp.float32
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 4096))
    d, std, force = config.d_model, config.init_std, config.force_ln_scale

    def kernel(n_in, n_out):
        return {"kernel": (jax.random.normal(next(key), (n_in, n_out)) * std).astype(dtype)}

    def proj(n_in, n_out):
        p = kernel(n_in, n_out)
        if config.use_bias:
            p["bias"] = jnp.zeros((n_out,), dtype)
        return p

    def attention():
        return {name: proj(d, d) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}

    def ffn(ffn_dim):
        normformer = config.ln_positions == "normformer"
        if config.use_glu:
            p = {"LayerNorm_0": _norm(d, force, dtype), "Dense_0": proj(d, ffn_dim), "Dense_1": proj(d, ffn_dim),
                 "Dense_2": proj(ffn_dim, d)}
            if normformer:
                p["LayerNorm_1"] = _norm(ffn_dim, force, dtype)
            return {"GLU_0": p}
        p = {"LayerNorm_0": _norm(d, force, dtype), "Dense_0": proj(d, ffn_dim), "Dense_1": proj(ffn_dim, d)}
        if normformer:
            p["LayerNorm_1"] = _norm(ffn_dim, force, dtype)
        return {"FFN_0": p}

    def enc_layer():
        p = {"LayerNorm_0": _norm(d, force, dtype), "FlaxBartAttention_0": attention(), **ffn(config.encoder_ffn_dim)}
        if config.ln_positions == "normformer":
            p["LayerNorm_1"] = _norm(d, True, dtype)
        return p

    def dec_layer():
        p = {"LayerNorm_0": _norm(d, force, dtype), "FlaxBartAttention_0": attention(),
             "FlaxBartAttention_1": attention(), **ffn(config.decoder_ffn_dim)}
        if config.ln_positions == "normformer":
            p.update(LayerNorm_1=_norm(d, True, dtype), LayerNorm_2=_norm(d, force, dtype),
                     LayerNorm_3=_norm(d, True, dtype))
        else:
            p["LayerNorm_1"] = _norm(d, force, dtype)
        return p

    def embedding(n):
        return {"embedding": (jax.random.normal(next(key), (n, d)) * std).astype(dtype)}

    def stack(vocab, positions, layers, make_layer, prefix, final):
        p = {"embed_tokens": embedding(vocab), "layernorm_embedding": _norm(d, True, dtype),
             "layers": {f"{prefix}_{i}": make_layer() for i in range(layers)}}
        if config.use_absolute_position_embeddings:
            p["embed_positions"] = embedding(positions)
        if final:
            p["final_ln"] = _norm(d, force, dtype)
        return p

    params = {"model": {
        "encoder": stack(config.encoder_vocab_size, config.max_text_length, config.encoder_layers, enc_layer,
                         "FlaxBartEncoderLayer", config.use_final_ln_encoder),
        "decoder": stack(config.logits_size, config.image_length, config.decoder_layers, dec_layer,
                         "FlaxBartDecoderLayer", config.use_final_ln_decoder),
    }}
    if not config.tie_word_embeddings:
        params["lm_head"] = kernel(d, config.logits_size)
    return params


def layer_groups(config: DalleBartConfig) -> tuple[tuple[str, str, str, int], ...]:
    """(side, scanned subtree name, per-layer name prefix, layer count) for encoder and decoder."""
    return (("encoder", ENC_SCANNED, "FlaxBartEncoderLayer", config.encoder_layers),
            ("decoder", DEC_SCANNED, "FlaxBartDecoderLayer", config.decoder_layers))


def unstack_layers(params: Params, config: DalleBartConfig) -> Params:
    """Scanned layout (`layers/FlaxBart*Layers/...` with a leading layer axis) -> per-layer entries."""
    params = {"model": dict(params["model"]), **{k: v for k, v in params.items() if k != "model"}}
    for side, scanned, single, count in layer_groups(config):
        part = dict(params["model"][side])
        layers = part.get("layers", {})
        if scanned in layers:
            stacked = layers[scanned]
            part["layers"] = {f"{single}_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(count)}
        params["model"][side] = part
    return params


def place_unstacked(params: Params, config: DalleBartConfig, dtype: Any) -> Params:
    """Host params (either layout) -> device params in the per-layer layout, one stacked leaf at a
    time: each is cast, split into its layers on the way to the device and dropped from the host
    tree, so the host never holds a second copy of the model (peak ≈ loaded size + one leaf)."""
    for side, scanned, single, count in layer_groups(config):
        layers = params["model"][side]["layers"]
        if scanned not in layers:
            continue
        stacked = layers.pop(scanned)
        per_layer: list[dict] = [{} for _ in range(count)]

        def split(node: dict, targets: list[dict]) -> None:
            for key in list(node):
                value = node.pop(key)
                if isinstance(value, Mapping):
                    subs = [t.setdefault(key, {}) for t in targets]
                    split(dict(value), subs)
                else:
                    cast = cast_leaf(value, dtype)
                    for i, target in enumerate(targets):
                        target[key] = jnp.array(cast[i])
                    # Transfers are asynchronous: wait, or every host copy stays queued at once.
                    jax.block_until_ready([t[key] for t in targets])
                    del value, cast

        split(stacked, per_layer)
        layers.update({f"{single}_{i}": tree for i, tree in enumerate(per_layer)})
    return place_leaves(params, dtype)


def stack_layers(params: Params, config: DalleBartConfig) -> Params:
    """Per-layer entries -> the scanned layout the released checkpoints use (for save_pretrained)."""
    params = {"model": dict(params["model"]), **{k: v for k, v in params.items() if k != "model"}}
    for side, scanned, single, count in layer_groups(config):
        part = dict(params["model"][side])
        layers = [part["layers"][f"{single}_{i}"] for i in range(count)]
        part["layers"] = {scanned: jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}
        params["model"][side] = part
    return params


def param_shapes(config: DalleBartConfig) -> Params:
    """The run-time (unscanned) parameter tree `config` implies, as ShapeDtypeStructs."""
    return jax.eval_shape(lambda: init_params(config, 0))


# ----------------------------------------------------------------------------- the model object

# Jitted at the boundary, once per config and input shape (a static argument).
_forward = jax.jit(forward, static_argnames="config")


class DalleBart(Pretrained):
    """A loaded DalleBart: config + run-time params (per-layer layout, in the compute dtype).

    Released checkpoints store the layers scanned (stacked); they are split into per-layer
    entries once, on the way to the device, and stacked again by `save_pretrained` when
    config.use_scan says so.
    """

    config_class = DalleBartConfig
    param_shapes = staticmethod(param_shapes)
    init_params = staticmethod(init_params)
    runtime_layout = staticmethod(unstack_layers)
    place = staticmethod(place_unstacked)

    @staticmethod
    def released_layout(params: Params, config: DalleBartConfig) -> Params:
        return stack_layers(params, config) if config.use_scan else params

    def __call__(self, input_ids, attention_mask, decoder_input_ids):
        """(logits [B, Ld, V+1] float32, encoder_last_hidden_state [B, Lt, D])."""
        return _forward(self.params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                        jnp.asarray(decoder_input_ids), self.config)
