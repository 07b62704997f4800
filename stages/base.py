"""The stage contract and the stage registry.

A stage is a small object with one job. It declares the named values it
*consumes* and *produces*, is built from its options (a table of the pipeline
config), initialised once with the shared device state, and then executes on
batches: a list of items, each a dict of named values, batching being the
normal case. It owns nothing global; the pipeline wires stages, the server
drives the pipeline and never reaches into a stage.

Stages are found by name through the `palette.stages` entry-point group, so a
package that ships, say, a watermark stage plugs in by declaring

    [project.entry-points."palette.stages"]
    watermark = "my_package.stages:Watermark"

and naming `type = "watermark"` in a pipeline config. A `module:Class` path
works too, without packaging.
"""

from __future__ import annotations

import dataclasses
import importlib
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .devices import DeviceState

ENTRY_POINT_GROUP = "palette.stages"

# The named values that flow through a pipeline.
PROMPT = "prompt"  # str, as the user typed it
SAMPLING = "sampling"  # SamplingParams for one image
PROMPT_TOKENS = "prompt_tokens"  # PromptTokens
IMAGE_TOKENS = "image_tokens"  # np.int32 [image_length]
IMAGE = "image"  # PIL.Image.Image, RGB
SCORE = "score"  # float, higher = better match to the prompt

PIPELINE_INPUTS = (PROMPT, SAMPLING)


class StageError(RuntimeError):
    """A stage could not be found, built or wired; the message says which and why."""


@dataclasses.dataclass
class StageContext:
    devices: DeviceState
    base_dir: Path  # relative paths in stage options resolve against the config file's folder
    dtype: str = "auto"  # pipeline-wide compute dtype: auto, float32, bfloat16, float16

    def resolve(self, ref: str | Path) -> str:
        """A checkpoint reference: a path relative to the config file, an absolute path, or a hub id."""
        candidate = (self.base_dir / ref).expanduser()
        return str(candidate) if candidate.exists() else str(ref)


class Stage:
    """Base class for pipeline stages (see the module docstring for the contract)."""

    kind: ClassVar[str] = "stage"
    consumes: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    tunable: ClassVar[tuple[str, ...]] = ()  # options Pipeline.load(**overrides) may set

    def __init__(self, name: str, options: Mapping[str, Any] | None = None):
        self.name = name
        self.options = dict(options or {})

    def initialize(self, context: StageContext) -> None:
        """Load weights and place them on the mesh; called once before the first execute."""

    def execute(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Compute this stage's outputs for every item; returns the items with `produces` filled in."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Release what initialize acquired."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "type": type(self).__name__,
                "consumes": list(self.consumes), "produces": list(self.produces)}


def find_stage_class(type_name: str) -> type[Stage]:
    """Resolve `type` from a pipeline config: an entry point name, or `module:Class`."""
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise StageError(f"stage type {type_name!r} cannot be imported: {err}") from err
    else:
        found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
        if not found:
            known = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
            raise StageError(f"no stage type {type_name!r} in entry-point group {ENTRY_POINT_GROUP!r} (known: {known})")
        try:
            cls = found[0].load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must say which one
            raise StageError(f"stage type {type_name!r} ({found[0].value}) failed to load: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise StageError(f"stage type {type_name!r} resolves to {cls!r}, which is not a palette Stage subclass")
    return cls
