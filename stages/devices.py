"""Device state shared by every stage: one Mesh over all local devices, params placed once.

The mesh has two axes: `data` (batch rows are split over it) and `model`
(weights are split over it only when a replica would not fit one device).
Every stage receives the same DeviceState, so a model set is placed on the
accelerators once at start-up and all stages' jitted functions see committed,
consistently sharded arrays. No pmap: jit + NamedSharding (GSPMD) does the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"


@dataclasses.dataclass
class DeviceState:
    mesh: Mesh

    @classmethod
    def create(cls, devices: list[jax.Device] | None = None, model_parallel: int = 1) -> "DeviceState":
        """A mesh over `devices` (default: all local devices) as data × model."""
        devices = list(devices if devices is not None else jax.local_devices())
        if len(devices) % model_parallel:
            raise ValueError(f"model_parallel={model_parallel} does not divide the {len(devices)} devices")
        grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
        return cls(mesh=Mesh(grid, (DATA, MODEL)))

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def model_parallel(self) -> int:
        return self.mesh.shape[MODEL]

    def round_batch(self, rows: int) -> int:
        """Smallest batch >= rows that splits evenly over the data axis."""
        return math.ceil(rows / self.data_parallel) * self.data_parallel

    # -- shardings -------------------------------------------------------------------------

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, ndim: int = 1) -> NamedSharding:
        """Leading axis split over `data`, the rest whole."""
        return NamedSharding(self.mesh, P(DATA, *([None] * (ndim - 1))))

    def param_sharding(self, leaf: Any) -> NamedSharding:
        """Replicated, or for 2-D+ weights split on the last axis over `model` when that axis divides."""
        shape = np.shape(leaf)
        if self.model_parallel > 1 and len(shape) >= 2 and shape[-1] % self.model_parallel == 0:
            return NamedSharding(self.mesh, P(*([None] * (len(shape) - 1)), MODEL))
        return self.replicated()

    # -- placement -------------------------------------------------------------------------

    def place_params(self, params: Any) -> Any:
        """Put a parameter tree on the mesh once (replicated or model-sharded)."""
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, self.param_sharding(x)), params)

    def place_batch(self, tree: Any) -> Any:
        """Put host arrays whose leading axis is the batch on the mesh, split over `data`."""
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, self.batch_sharding(np.ndim(x))), tree)

    def describe(self) -> dict[str, Any]:
        return {
            "devices": [f"{d.platform}:{d.id}" for d in self.devices],
            "mesh": {name: int(size) for name, size in self.mesh.shape.items()},
        }


def pad_rows(x: np.ndarray, rows: int, fill: float | None = 0) -> np.ndarray:
    """`x` grown along axis 0 to `rows` rows, so that a jitted function sees one shape whatever the
    batch: the new rows hold `fill`, or copy the first row when `fill` is None. Callers drop the
    padded rows' results; every computation here is per row, so they change no real row's values."""
    x = np.asarray(x)
    missing = rows - len(x)
    if missing <= 0:
        return x
    extra = np.repeat(x[:1], missing, axis=0) if fill is None else np.full((missing, *x.shape[1:]), fill, x.dtype)
    return np.concatenate([x, extra])
