#!/usr/bin/env python3
"""Peak host memory while loading a DalleBart checkpoint of the released size.

Writes a random checkpoint in the released format (scanned layout, float16
like dalle-mega's mega-1-fp16, ~5 GB at Mega size) without ever holding it
whole, then loads it with DalleBart.from_pretrained in a fresh process and
prints that process's peak RSS next to the file size and the loaded bytes.

    .venv/bin/python bench/load_memory.py --size mega --dtype bfloat16
    .venv/bin/python bench/load_memory.py --size mini --dtype float32 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler import SIZES  # noqa: E402

from palette.stages.checkpoint import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from palette.stages.models.dallebart import DalleBartConfig, init_params, layer_groups  # noqa: E402

LOADER = """
import json, sys, time
import jax, jax.numpy as jnp
from palette.stages.models.dallebart import DalleBart

def status(field):  # kB, from /proc: VmHWM is the peak RSS, VmRSS the current one
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

# ru_maxrss would include the parent's pages at fork; reset the high-water mark instead.
open("/proc/self/clear_refs", "w").write("5")
base = status("VmHWM")
t = time.perf_counter()
model = DalleBart.from_pretrained(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
seconds = time.perf_counter() - t
loaded = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
print(json.dumps({"peak_rss_kb": status("VmHWM"), "import_rss_kb": base, "loaded_bytes": loaded,
                  "seconds": seconds}))
"""


def scanned_shapes(config: DalleBartConfig) -> dict:
    """The released (scanned) parameter layout, as a tree of shapes."""
    shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), jax.eval_shape(lambda: init_params(config)))
    for side, scanned, single, count in layer_groups(config):
        layer = shapes["model"][side]["layers"][f"{single}_0"]
        shapes["model"][side]["layers"] = {
            scanned: jax.tree_util.tree_map(lambda s: (count, *s), layer, is_leaf=lambda x: isinstance(x, tuple))}
    return shapes


def write_random_checkpoint(folder: Path, config: DalleBartConfig, dtype: str, seed: int = 0) -> int:
    """Stream a msgpack file in flax's format (ext type 1 ndarrays), one leaf in memory at a time."""
    rng = np.random.default_rng(seed)
    packer = msgpack.Packer(use_bin_type=True)
    folder.mkdir(parents=True, exist_ok=True)

    def write(f, node):
        if isinstance(node, dict):
            f.write(packer.pack_map_header(len(node)))
            for key, value in node.items():
                f.write(packer.pack(key))
                write(f, value)
            return
        arr = (rng.standard_normal(node, dtype=np.float32) * 0.02).astype(dtype)
        payload = msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
        del arr
        f.write(packer.pack(msgpack.ExtType(1, payload)))

    with open(folder / WEIGHTS_FILE, "wb") as f:
        write(f, scanned_shapes(config))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    return (folder / WEIGHTS_FILE).stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="mega", choices=sorted(SIZES))
    ap.add_argument("--file-dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype to load into (float32, bfloat16, float16)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards (and reuse one in --dir)")
    args = ap.parse_args()

    cfg = SIZES[args.size]
    v = cfg["image_vocab_size"]
    config = DalleBartConfig(**cfg, decoder_start_token_id=v, bos_token_id=v + 1, eos_token_id=v + 1,
                             pad_token_id=v + 1, use_scan=True)
    folder = Path(args.dir or tempfile.mkdtemp(prefix=f"palette-{args.size}-"))
    try:
        t = time.perf_counter()
        if (folder / WEIGHTS_FILE).exists() and args.keep:
            size = (folder / WEIGHTS_FILE).stat().st_size
        else:
            size = write_random_checkpoint(folder, config, args.file_dtype)
        print(f"# have {size / 2**30:.2f} GiB ({args.file_dtype}) in {time.perf_counter() - t:.0f} s to {folder}",
              flush=True)
        out = subprocess.run([sys.executable, "-c", LOADER, str(folder), args.dtype], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak = r["peak_rss_kb"] * 1024
        base = r["import_rss_kb"] * 1024
        print("| checkpoint | file | loaded as | loaded bytes | peak RSS during load (after imports) "
              "| (peak - imports) / file | load s |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {args.size} random, scanned | {size / 2**30:.2f} GiB {args.file_dtype} | {args.dtype} "
              f"| {r['loaded_bytes'] / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB ({base / 2**30:.2f}) "
              f"| {(peak - base) / size:.2f} | {r['seconds']:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
