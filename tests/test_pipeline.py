"""The pipeline: stages from entry points, wired from TOML, sharing one device state."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from palette.stages.base import StageError
from palette.stages.pipeline import Pipeline, PromptError, SamplingParams, default_config_path

DEFAULT = default_config_path()

PLUGIN_SOURCE = textwrap.dedent('''
    """A third-party stage: inverts every image. Knows nothing of Palette's internals."""
    from PIL import ImageOps
    from palette.stages.base import IMAGE, Stage

    class Invert(Stage):
        kind = "image_filter"
        consumes = (IMAGE,)
        produces = (IMAGE,)

        def execute(self, batch):
            for item in batch:
                item[IMAGE] = ImageOps.invert(item[IMAGE])
            return batch
''')


def install_plugin(site: Path) -> None:
    """Lay out an installed distribution (package + dist-info with an entry point) in `site`."""
    (site / "invert_plugin").mkdir(parents=True)
    (site / "invert_plugin" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = site / "invert_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: invert-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[palette.stages]\ninvert = invert_plugin:Invert\n")


def config_with(extra: str, tmp_path: Path) -> Path:
    """The default pipeline config with checkpoints made absolute and `extra` appended."""
    text = DEFAULT.read_text()
    for folder in ("dallebart", "vqgan", "clip"):
        text = text.replace(f'checkpoint = "{folder}"', f'checkpoint = "{DEFAULT.parent / folder}"')
    path = tmp_path / "pipeline.toml"
    path.write_text(text + extra)
    return path


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load(num_slots=2, chunk_steps=16)


def test_default_pipeline_generates_ranked_images(pipeline):
    items = pipeline.run("a red circle on a white background", [SamplingParams(seed=s) for s in (1, 2)], rank=True)
    assert [it["image"].size for it in items] == [pipeline.limits.image_size[::-1]] * 2
    assert all(np.isfinite(it["score"]) for it in items)
    again = pipeline.run("a red circle on a white background", [SamplingParams(seed=1)])
    assert again[0]["image"].tobytes() == items[0]["image"].tobytes(), "same seed, same image"
    info = pipeline.info()
    assert [s["kind"] for s in info["stages"]] == ["text", "sampler", "image_decoder", "ranker"]
    assert info["limits"]["num_slots"] == 2


def test_prompts_the_model_cannot_take_are_refused_with_the_limit(pipeline):
    with pytest.raises(PromptError, match="empty"):
        pipeline.encode_prompt("   ")
    with pytest.raises(PromptError, match=f"at most {pipeline.limits.max_prompt_tokens} tokens"):
        pipeline.encode_prompt("a red circle " * 20)
    with pytest.raises(PromptError, match=f"the limit is {pipeline.limits.max_prompt_chars}"):
        pipeline.encode_prompt("x" * (pipeline.limits.max_prompt_chars + 1))


def test_a_plugin_stage_from_another_package_plugs_in(tmp_path, monkeypatch, pipeline):
    install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = config_with('\n[[stages]]\nname = "negative"\ntype = "invert"\n', tmp_path)
    # The plugin comes after the ranker in the file; image stages run right after the decoder.
    plugged = Pipeline.load(path, num_slots=2)
    assert [s.name for s in plugged.image_stages] == ["negative"]
    tokens = np.arange(plugged.limits.image_length, dtype=np.int32)[None] % 200
    plain = np.asarray(pipeline.decode(tokens)[0], np.int16)
    inverted = np.asarray(plugged.decode(tokens)[0], np.int16)
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_wiring_errors_name_the_stage(tmp_path):
    path = config_with('\n[[stages]]\nname = "mystery"\ntype = "no_such_stage"\n', tmp_path)
    with pytest.raises(StageError, match="no stage type 'no_such_stage'.*known: .*bart_sampler"):
        Pipeline.load(path)
    text = DEFAULT.read_text().split("[[stages]]")
    broken = tmp_path / "broken.toml"
    # Sampler before the text stage: nothing has produced prompt_tokens yet.
    broken.write_text(text[0] + "[[stages]]" + text[2] + "[[stages]]" + text[1])
    (tmp_path / "dallebart").symlink_to(DEFAULT.parent / "dallebart")
    with pytest.raises(StageError, match="stage 'sampler' consumes \\['prompt_tokens'\\]"):
        Pipeline.load(broken)


@pytest.mark.parametrize("setting, message", [("temperature = 0.0", "temperature must be a finite number > 0"),
                                              ('condition_scale = "high"', "must be numbers"),
                                              ("condition_scale = inf", "condition_scale must be a finite number")])
def test_unusable_sampling_defaults_are_refused_before_weights_load(tmp_path, setting, message):
    # Without the set's own values (they would clash as duplicate keys), then the unusable one.
    kept = [l for l in DEFAULT.read_text().splitlines() if not l.startswith(("condition_scale = ", "temperature = "))]
    text = "\n".join(kept).replace("[pipeline]\n", f"[pipeline]\n{setting}\n", 1) + "\n"
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    with pytest.raises(StageError, match=message):
        Pipeline.load(path)


def test_the_dalle_mini_example_config_is_a_well_wired_pipeline():
    """examples/dalle-mini.toml (the README's example) names known stage types, wired in order."""
    import tomllib

    from palette.stages.base import find_stage_class
    from palette.stages.pipeline import check_wiring, sampling_defaults

    path = Path(__file__).resolve().parent.parent / "examples" / "dalle-mini.toml"
    raw = tomllib.loads(path.read_text())
    stages = [find_stage_class(spec["type"])(spec["name"], spec) for spec in raw["stages"]]
    check_wiring(stages)
    assert sampling_defaults(raw["pipeline"]) == (10.0, 1.0)
    assert [s.kind for s in stages] == ["text", "sampler", "image_decoder", "ranker"]
