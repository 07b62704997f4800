"""Reading and writing released-format checkpoints.

A model folder holds `config.json` and `flax_model.msgpack` exactly as
`save_pretrained` writes them (plus tokenizer files for text models). The
msgpack file is `flax.serialization.to_bytes(params)`: nested string-keyed maps
whose leaves are numpy arrays. We decode it with flax's own msgpack reader, so
every layout the released checkpoints use (ext-type ndarrays, chunked arrays)
is handled by the library that wrote it.

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
    """A floating array cast to `dtype` (a numpy dtype or 'bfloat16'); integer arrays unchanged."""
    import jax.numpy as jnp

    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16:
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
