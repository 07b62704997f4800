"""Reading and writing released-format checkpoints, and the one load path of the three networks.

A model folder holds `config.json` and `flax_model.msgpack` exactly as
`save_pretrained` writes them (plus tokenizer files for text models). The
msgpack file is `flax.serialization.to_bytes(params)`: nested string-keyed maps
whose leaves are numpy arrays. We decode it with flax's own msgpack reader, so
every layout the released checkpoints use (ext-type ndarrays, chunked arrays)
is handled by the library that wrote it.

`Pretrained` is what DalleBart, VQGAN and CLIP share: a config and a parameter
tree, `from_pretrained` (read the config, read the tree, check it against the
shapes the config implies, cast and place it), `init_random` and
`save_pretrained`. The dtype rule is the same for all three: floating
parameters are held in the compute dtype (cast once at load), so the forward
pass computes in the dtype of its parameters; norms, softmaxes and distances
are taken in float32 inside the model functions.

A model reference is either a local folder or a Hugging Face hub id. Hub ids
are resolved through `huggingface_hub`: the local cache first when offline,
otherwise a snapshot download; when neither works the error names the id and
the cache folder so the user knows what to fetch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "flax_model.msgpack"

class CheckpointError(RuntimeError):
    """A model folder or hub id could not be read; the message says why."""


class UnsupportedConfigError(CheckpointError, ValueError):
    """A config asks for a variant of an architecture that Palette does not compute, or is inconsistent."""


def known_fields(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a config.json dict that are fields of the config dataclass `cls`."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def resolve_model_dir(ref: str | os.PathLike) -> Path:
    """Return a local folder for `ref` (a folder path or a hub id like `dalle-mini/dalle-mini`)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    ref = str(ref)
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise CheckpointError(f"model folder {ref!r} does not exist (and it is not a hub id of the form owner/name)")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as err:  # pragma: no cover - huggingface_hub is a server dependency
        raise CheckpointError(f"{ref!r} is not a local folder and huggingface_hub is not installed") from err

    patterns = ["*.json", "*.msgpack", "*.txt", "*.model"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(huggingface_hub.snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
    except Exception as cache_err:  # noqa: BLE001 - any failure means "not in the cache"
        if offline:
            raise CheckpointError(
                f"hub model {ref!r} is not in the local cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; "
                f"download it on a connected machine (huggingface-cli download {ref}) or pass a local folder"
            ) from cache_err
    try:
        return Path(huggingface_hub.snapshot_download(ref, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"could not download hub model {ref!r} ({type(err).__name__}: {err}) and it is not in the local "
            f"cache {constants.HF_HUB_CACHE}; pass a local folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        ) from err


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_params(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Decode `flax_model.msgpack` into a nested dict of numpy arrays (dtype as stored).

    The file is streamed through msgpack's Unpacker rather than read whole, so the
    host holds the decoded arrays plus one array's worth of buffer, not the file
    and the arrays side by side (a 5 GB checkpoint would otherwise need 10 GB).
    """
    import msgpack
    from flax import serialization

    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    with open(path, "rb") as f:
        limit = max(path.stat().st_size, 1 << 20)
        unpacker = msgpack.Unpacker(f, ext_hook=serialization._msgpack_ext_unpack, raw=False,
                                    strict_map_key=False, max_buffer_size=limit, read_size=min(16 << 20, limit))
        try:
            params = unpacker.unpack()
        except (msgpack.UnpackException, ValueError) as err:
            raise CheckpointError(f"{path} is not a flax msgpack checkpoint: {err}") from err
    # Arrays over 2**30 bytes are written chunked; flax knows how to join them.
    params = serialization._unchunk_array_leaves_in_place(params)
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} does not hold a parameter tree")
    if set(params) == {"params"}:  # some writers wrap the tree
        params = params["params"]
    return params


def place_leaves(tree: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Cast each floating leaf to `dtype` and put it on the default device one at a time,
    dropping the host copy as it goes, so host and device never both hold the whole tree."""
    import jax
    import jax.numpy as jnp

    for key in list(tree):
        value = tree.pop(key)
        if isinstance(value, Mapping):
            tree[key] = place_leaves(dict(value), dtype)
        elif isinstance(value, jax.Array):  # already placed (e.g. split layers): never round-trip via the host
            tree[key] = value
        else:
            # Transfers are asynchronous: wait, so this leaf's host copy can go now.
            tree[key] = jnp.asarray(cast_leaf(value, dtype)).block_until_ready()
            del value
    return tree


def write_checkpoint(model_dir: str | os.PathLike, config: Mapping[str, Any], params: Mapping[str, Any]) -> Path:
    """Write `config.json` + `flax_model.msgpack` in the released layout (no `params` wrapper)."""
    from flax import serialization

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    host_params = _to_numpy(params)
    with open(out / WEIGHTS_FILE, "wb") as f:
        f.write(serialization.msgpack_serialize(host_params))
    with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def cast_leaf(x: Any, dtype: Any) -> np.ndarray:
    """A floating array cast to `dtype` (a numpy dtype or 'bfloat16'); integer arrays unchanged.

    A 0-d float (CLIP's logit_scale) is kept in float32: it is a scale, not a weight, and
    rounding it to bfloat16 would rescale every score by up to 1.6 %.
    """
    import jax.numpy as jnp

    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16:
        if arr.ndim == 0:
            return arr.astype(np.float32)
        return arr.astype(jnp.bfloat16 if dtype == "bfloat16" else dtype, copy=False)
    return arr


def cast_params(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves to `dtype` (a numpy dtype or 'bfloat16'); integer leaves are kept."""
    if isinstance(tree, Mapping):
        return {k: cast_params(v, dtype) for k, v in tree.items()}
    return cast_leaf(tree, dtype)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`; handy for error messages and tests."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def check_tree(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Raise a CheckpointError listing missing/unexpected/misshaped leaves (expected: shapes or arrays)."""
    exp = {k: tuple(np.shape(v)) for k, v in flatten(expected).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten(got).items()}
    missing = sorted(set(exp) - set(have))
    extra = sorted(set(have) - set(exp))
    shapes = sorted(f"{k}: expected {exp[k]}, found {have[k]}" for k in set(exp) & set(have) if exp[k] != have[k])
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' …' if len(extra) > 8 else ''}")
        if shapes:
            parts.append(f"wrong shapes {shapes[:8]}")
        raise CheckpointError(f"{what}: parameters do not match the config: " + "; ".join(parts))


class Pretrained:
    """A network's `config` and run-time `params` (a plain nested dict, the released names).

    A subclass names its `config_class` and gives `param_shapes(config)` (the tree the config
    implies) and `init_params(config, seed)`; one whose released layout differs from its run-time
    layout (DalleBart's scanned layers) overrides `runtime_layout`, `place` and `released_layout`.
    """

    config_class: type

    def __init__(self, config: Any, params: dict[str, Any], source: str | None = None):
        self.config = config
        self.params = params
        self.source = source

    @staticmethod
    def param_shapes(config: Any) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def init_params(config: Any, seed: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def dtype(self) -> Any:
        """The compute dtype: that of the floating parameters."""
        import jax

        leaves = [x for x in jax.tree_util.tree_leaves(self.params) if np.ndim(x) > 0]
        return leaves[0].dtype

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, dtype: Any = np.float32):
        """Load `config.json` + `flax_model.msgpack` from a folder or hub id; floating parameters cast to `dtype`."""
        folder = resolve_model_dir(ref)
        config = cls.config_class.from_dict(read_config(folder))
        params = read_params(folder)
        check_tree(cls.param_shapes(config), cls.runtime_layout(params, config),
                   f"{cls.__name__} checkpoint {folder}")
        return cls(config, cls.place(params, config, dtype), source=str(ref))

    @classmethod
    def init_random(cls, config: Any, seed: int = 0, dtype: Any = np.float32):
        """Fresh weights drawn from the network's initial distributions (tests, benchmarks, training)."""
        import jax

        params = jax.tree_util.tree_map(np.asarray, cls.init_params(config, seed))
        return cls(config, place_leaves(params, dtype), source=f"random(seed={seed})")

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `flax_model.msgpack` in the released layout."""
        import jax

        params = self.released_layout(jax.tree_util.tree_map(np.asarray, self.params), self.config)
        return write_checkpoint(folder, self.config.to_dict(), params)

    @staticmethod
    def runtime_layout(params: dict[str, Any], config: Any) -> dict[str, Any]:
        """The checkpoint's tree as `param_shapes` names it (views only; nothing is copied)."""
        return params

    @staticmethod
    def place(params: dict[str, Any], config: Any, dtype: Any) -> dict[str, Any]:
        """Host params in the checkpoint's layout -> device params in the run-time layout, in `dtype`."""
        return place_leaves(params, dtype)

    @staticmethod
    def released_layout(params: dict[str, Any], config: Any) -> dict[str, Any]:
        """Run-time params (on the host) -> the layout `save_pretrained` writes."""
        return params
