"""The shipped default model set, served over gRPC, draws what the prompt says.

These run the real embedded model through a real server and client and read the
images back with the deterministic analyser (training/analyse.py), which is right
on >= 99 % of the generator's own images. A random or untrained model set fails.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from palette.client import GeneratedImage, PaletteClient
from palette.stages.pipeline import default_config_path
from palette.training.analyse import analyse
from server_fixtures import running_server

# Seen colour×shape pairs (held-out ones never appear in training), three seeds each.
PROMPTS = [  # (prompt, colour, background, shape)
    ("a large red circle in the centre on a white background", "red", "white", "circle"),
    ("a large blue square in the centre on a yellow background", "blue", "yellow", "square"),
    ("a large green circle in the centre on a red background", "green", "red", "circle"),
]
SEEDS = (1, 2, 3)


def test_the_default_set_is_the_trained_one():
    text = default_config_path().read_text()
    assert "random" not in text.splitlines()[0].lower(), "models/default still holds random weights"
    sizes = sum(p.stat().st_size for p in default_config_path().parent.rglob("*") if p.is_file())
    assert sizes <= 25 * 2**20, f"the default set is {sizes / 2**20:.1f} MB; the limit is 25 MB"


def test_the_shipped_pipeline_config_is_the_one_training_writes():
    """`make train-default` must reproduce the served settings: a default tuned by hand in
    models/default/pipeline.toml alone would be lost on the next retrain."""
    from palette.training.model_set import PIPELINE_TOML

    text = default_config_path().read_text()
    description = text.splitlines()[0].split("model set: ", 1)[1]
    assert text == PIPELINE_TOML.format(description=description)


# One scene per row, then a caption that changes only the position and one that changes only the
# background: words at the end of the caption, after the shape.
WHOLE_CAPTION_CASES = [
    (("circle", "red", "large", "top left", "white"), "bottom right", "blue"),
    (("square", "blue", "small", "bottom", "yellow"), "top", "black"),
    (("star", "orange", "large", "right", "purple"), "left", "green"),
    (("cross", "white", "small", "centre", "red"), "top right", "yellow"),
]


def test_the_shipped_clip_reads_the_whole_caption():
    """The ranker must tell a caption's position and background, which come after the shape words:
    CLIP pools at the largest token id, and with EOS not the largest the shipped CLIP once read each
    caption only up to its largest-id word ("a small orange ring")."""
    from dataclasses import replace

    from palette.stages.ranker import CLIPScorer
    from palette.training import shapes

    scorer = CLIPScorer.from_pretrained(default_config_path().parent / "clip")
    for (shape, colour, size, position, background), other_position, other_background in WHOLE_CAPTION_CASES:
        scene = shapes.SceneSpec((shapes.ObjectSpec(shape, colour, size, position),), background)
        image = Image.fromarray(shapes.render(scene))
        moved = replace(scene, objects=(replace(scene.objects[0], position=other_position),))
        captions = [shapes.caption(scene, full=True), shapes.caption(moved, full=True),
                    shapes.caption(replace(scene, background=other_background), full=True)]
        scores = [float(scorer.score(c, [image])[0]) for c in captions]
        assert scores[0] > max(scores[1:]), (captions, scores)


@pytest.fixture(scope="module")
def client():
    with running_server() as server, PaletteClient(server.address) as client:
        yield client


def _read(image: GeneratedImage) -> dict:
    analysis = analyse(np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")))
    return {"seed": image.seed, "score": None if image.score is None else round(image.score, 2),
            "background": analysis.background, "colours": [o.colour for o in analysis.objects],
            "shapes": [o.shape for o in analysis.objects], "positions": [o.position for o in analysis.objects]}


def _ranked_readings(client, prompt: str, n: int, seed: int) -> list[dict]:
    """What the analyser reads in each of `n` served candidates, best CLIP score first."""
    images = [e for e in client.generate(prompt, n, seed=seed, rank=True) if isinstance(e, GeneratedImage)]
    assert len(images) == n
    return [_read(image) for image in sorted(images, key=lambda im: -im.score)]


@pytest.fixture(scope="module")
def readings(client) -> dict[str, list[dict]]:
    """For each prompt, what the analyser reads in each served candidate (best CLIP score first)."""
    return {prompt: _ranked_readings(client, prompt, len(SEEDS), SEEDS[0]) for prompt, *_ in PROMPTS}


@pytest.mark.parametrize("prompt,colour,background", [p[:3] for p in PROMPTS], ids=[p[1] for p in PROMPTS])
def test_the_clip_top_image_has_the_prompted_colours(readings, prompt, colour, background):
    best = readings[prompt][0]
    assert best["background"] == background and colour in best["colours"], json.dumps(readings[prompt])


def test_most_candidates_have_the_prompted_colours(readings):
    """Not only CLIP's pick: the sampler itself mostly draws the right colours."""
    right = sum(r["background"] == background and colour in r["colours"]
                for prompt, colour, background, _ in PROMPTS for r in readings[prompt])
    total = len(PROMPTS) * len(SEEDS)
    assert right >= 2 * total // 3, json.dumps(readings, indent=1)


def test_most_candidates_draw_the_prompted_shape(readings):
    """The shape, read back from the image, is the prompted one for most candidates (chance: 1 in 6)."""
    right = sum(r["shapes"][:1] == [shape] for prompt, *_, shape in PROMPTS for r in readings[prompt])
    assert right >= 2 * len(PROMPTS) * len(SEEDS) // 3, json.dumps(readings, indent=1)


OPEN_PROMPT_SEED = 40


def test_a_prompt_that_leaves_attributes_open_gets_candidates_that_differ_there(client):
    """"a green circle" states a colour and a shape: CLIP's pick and most candidates keep those, and they spread
    over the backgrounds and places the prompt leaves free."""
    readings = _ranked_readings(client, "a green circle", 8, OPEN_PROMPT_SEED)
    right = [r for r in readings if r["colours"] == ["green"] and r["shapes"] == ["circle"]]
    assert readings[0] in right and len(right) >= len(readings) // 2, json.dumps(readings, indent=1)
    assert len({r["background"] for r in right}) >= 3, json.dumps(readings, indent=1)
    assert len({r["positions"][0] for r in right}) >= 2, json.dumps(readings, indent=1)


def test_eval_scores_the_shipped_set_on_eval_or_validation_prompts():
    from palette.training import evaluate
    from palette.training import shapes

    fixed = evaluate.evaluate(default_config_path().parent, n=2, candidates=3, progress=False, open_n=1)
    other = evaluate.evaluate(default_config_path().parent, n=2, candidates=3, progress=False, prompt_seed=1234,
                              objects=(1,), open_n=0)
    pooled = evaluate.evaluate(default_config_path().parent, n=1, candidates=2, progress=False, prompt_seed=(1234, 99),
                               objects=(2,), open_n=0)
    assert fixed["prompt_seed"] is None and other["prompt_seed"] == 1234
    assert "prompt seed 1234" in other["table"] and "perfect ranker" in other["table"]
    assert "two-object" in fixed["table"] and "two-object" not in other["table"]
    assert "2 two-object prompts per set (prompt seeds 1234, 99)" in pooled["table"]
    assert "single-object" not in pooled["table"]
    # Prompts that leave attributes open: a phrasing each, scored on what they state, the rest counted as spread.
    assert "open" not in other and "leaves attributes open" in fixed["table"]
    assert list(fixed["open"]) == [t for ts in shapes.OPEN_PHRASINGS.values() for t in ts]
    one_open = fixed["open"]["{a_c} {s}"]
    assert set(one_open["distinct"]) == {"background", "size", "position"} and one_open["prompts"] == 1
    assert set(fixed["open"]["two shapes on {a_b} background"]["distinct"]) == {"colour", "shape", "size", "position"}
    for results, kinds in ((fixed, evaluate.KINDS + evaluate.TWO_OBJECT_KINDS), (other, evaluate.KINDS),
                           (pooled, evaluate.TWO_OBJECT_KINDS)):
        for kind in kinds:
            r = results[kind]
            # A prompt whose pick is right has a right candidate: a ranker cannot beat the best candidate.
            assert r["any_correct"] >= max(r["random"]["all_correct"], r["clip_top1"]["all_correct"])
            assert r["psnr"] > 20.0
    for kind, two in zip(evaluate.KINDS, evaluate.TWO_OBJECT_KINDS):
        assert fixed[kind]["prompts"] == [p.prompt for p in shapes.eval_prompts(kind, 2)]
        assert fixed[two]["prompts"] == [p.prompt for p in shapes.eval_prompts(kind, 2, two_objects_prob=1.0)]
        assert other[kind]["prompts"] == [p.prompt for p in shapes.eval_prompts(kind, 2, seed=1234)]
        assert other[kind]["prompts"] != fixed[kind]["prompts"]
        assert pooled[two]["prompts"] == [p.prompt for s in (1234, 99)
                                          for p in shapes.eval_prompts(kind, 1, seed=s, two_objects_prob=1.0)]


# Two objects in the canonical phrasing, each with a seed at which the shipped set draws both in the prompted colours
# and places (it does so for about one candidate in eight, docs/default-model-set.md; a retrained set re-picks these).
TWO_OBJECT_PROMPTS = [  # (prompt, seed, {colour: position}, background)
    ("a small red square in the top right corner and a large yellow circle in the top left corner on a green "
     "background", 5, {"red": "top right", "yellow": "top left"}, "green"),
    ("a small green star at the top and a small black circle at the bottom on a purple background", 7,
     {"green": "top", "black": "bottom"}, "purple"),
    ("a large orange ring in the top left corner and a large black star in the bottom left corner on a red "
     "background", 2, {"orange": "top left", "black": "bottom left"}, "red"),
]


@pytest.mark.parametrize("prompt,seed,placed,background", TWO_OBJECT_PROMPTS,
                         ids=[f"{'-'.join(p[2])}-{p[1]}" for p in TWO_OBJECT_PROMPTS])
def test_the_default_set_draws_two_objects_with_the_prompted_colours(client, prompt, seed, placed, background):
    images = [e for e in client.generate(prompt, 1, seed=seed) if isinstance(e, GeneratedImage)]
    reading = _read(images[0])
    assert reading["background"] == background, reading
    assert dict(zip(reading["colours"], reading["positions"])) == placed, reading
