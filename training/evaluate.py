"""`palette eval`: how well a model set draws what the prompts say.

On one-object and on two-object prompts, each held-out (the first object's
colour x shape pair no training image shows) and seen, separately:

* VQGAN reconstruction PSNR of the prompts' ground-truth images;
* attribute accuracy, read back by the deterministic analyser, of a random
  candidate (its expectation: the mean over all the candidates, which a single
  pick would only estimate with the noise of one draw per prompt) and of CLIP's
  top-1 among `candidates` images;
* CLIP top-1 retrieval of the right caption for the ground-truth image among
  itself and 7 distractor captions that each change one attribute of the scene
  (for two objects: of either object, or the two objects' colours, shapes or
  places swapped);
* how often some candidate is all correct: the most any ranker could score.

and on prompts that leave attributes open ("a red circle", "two shapes on a white
background"): how often what they state is right, and how many different values the
candidates show of what they leave free.

Everything runs through the same code the server runs (`Pipeline.load` of the
set's pipeline.toml), and everything is seeded, so the numbers are reproducible.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import analyse, shapes

ATTRS = ("count", "background", "colour", "shape", "size", "position", "all_correct")
#: Two-object prompts are also scored on the relation of the first object to the second.
TWO_OBJECT_ATTRS = ("count", "background", "colour", "shape", "size", "position", "relation", "all_correct")
ATTR_LABELS = {"count": "object count", "all_correct": "**all correct**"}
#: The prompt sets of one object, and of two (`TWO_OBJECT_KINDS[i]` is `KINDS[i]` with two objects).
KINDS = ("heldout", "seen")
TWO_OBJECT_KINDS = ("heldout_two", "seen_two")
KIND_LABELS = {"heldout": "held-out", "seen": "seen", "heldout_two": "held-out", "seen_two": "seen"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def reconstruction_psnr(vq, images: np.ndarray) -> float:
    """Mean per-image PSNR of VQGAN encode -> decode."""
    from .vqgan_trainer import decode_codes, encode_pool

    recon = decode_codes(vq, encode_pool(vq, images, batch_size=16), batch_size=16)
    return float(np.mean([psnr(a, b) for a, b in zip(images, recon)]))


def _variants(scene: shapes.SceneSpec) -> dict[str, list[shapes.SceneSpec]]:
    """Every valid scene that differs from `scene` in exactly one attribute of one object or the background, by
    attribute; for two objects also "swap": the two objects' colours, shapes or places exchanged."""
    out: dict[str, list[shapes.SceneSpec]] = {}

    def add(attr: str, **change) -> None:
        try:
            out.setdefault(attr, []).append(replace(scene, **change))
        except ValueError:
            pass

    values = {"colour": shapes.COLOUR_NAMES, "shape": shapes.SHAPES, "size": shapes.SIZES,
              "position": shapes.POSITION_NAMES}
    for k, o in enumerate(scene.objects):
        for attr, domain in values.items():
            for v in domain:
                if v != getattr(o, attr):
                    objects = list(scene.objects)
                    objects[k] = replace(o, **{attr: v})
                    add(attr, objects=tuple(objects))
    for b in shapes.BACKGROUNDS:
        if b != scene.background:
            add("background", background=b)
    if len(scene.objects) == 2:
        a, b = scene.objects
        for attr in ("colour", "shape", "position"):
            if getattr(a, attr) != getattr(b, attr):
                swapped = (replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)}))
                relation = analyse.relation_between(*swapped) if attr == "position" else scene.relation
                add("swap", objects=swapped, relation=relation)
    return out


def distractor_captions(scene: shapes.SceneSpec, rng: np.random.Generator, k: int = 7) -> list[str]:
    """`k` canonical captions of scenes one attribute away from `scene`, spread over the attributes."""
    by_attr = _variants(scene)
    picked: list[shapes.SceneSpec] = []
    attrs = sorted(by_attr)
    while len(picked) < k and any(by_attr.values()):
        for a in attrs:
            if by_attr[a] and len(picked) < k:
                picked.append(by_attr[a].pop(int(rng.integers(len(by_attr[a])))))
    return [shapes.caption(v, full=True) for v in picked]


def retrieval_accuracy(scorer, images: np.ndarray, scenes: Sequence[shapes.SceneSpec], seed: int = 0) -> float:
    """Share of images whose own canonical caption CLIP ranks first among it and 7 one-attribute distractors."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    hits = 0
    for image, scene in zip(images, scenes):
        captions = [shapes.caption(scene, full=True)] + distractor_captions(scene, rng)
        text = scorer.tokenizer(captions, pad_to_max_length=True)
        pixels = scorer.pixels([Image.fromarray(image)])
        t = np.asarray(scorer.model.encode_text(text["input_ids"], text["attention_mask"]))
        v = np.asarray(scorer.model.encode_image(pixels))
        sims = (t @ v[0])
        hits += int(int(np.argmax(sims)) == 0)
    return hits / max(1, len(scenes))


#: Prompts per open phrasing in `palette eval` (`shapes.OPEN_PHRASINGS`).
OPEN_PROMPTS_PER_PHRASING = 8
#: The attributes a prompt may leave open.
FREE_ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def shown(analysis: analyse.Analysis, attribute: str):
    """What a candidate shows of one of the `FREE_ATTRIBUTES` (for several objects, their values, sorted)."""
    if attribute == "background":
        return analysis.background
    return tuple(sorted(getattr(o, attribute) for o in analysis.objects))


def ranked_candidates(pipeline, prompt: str, seeds: Sequence[int],
                      sampling: dict) -> tuple[list[np.ndarray], np.ndarray]:
    """`prompt`'s candidates, sampled as the server would with these seeds (uint8 images), and CLIP's order of
    them, best first."""
    from palette.stages.sampler import SamplingParams

    items = pipeline.run(prompt, [SamplingParams(seed=s, **sampling) for s in seeds], rank=True)
    images = [np.asarray(it["image"].convert("RGB")) for it in items]
    return images, np.argsort(-np.asarray([float(it["score"]) for it in items]), kind="stable")


def evaluate_open(pipeline, prompts: Sequence[shapes.EvalPrompt], candidates: int, sampling: dict, seed: int = 0,
                  bar=None) -> dict[str, Any]:
    """Prompts that leave attributes open: per phrasing, how often the stated attributes (and the object count)
    are right, for a random candidate and CLIP's pick, and how many different values the candidates with the
    right count show of each attribute left open (the mean over prompts): right where the prompt binds, free
    where it does not."""
    by_phrasing: dict[str, dict[str, list]] = {}
    for i, p in enumerate(prompts):
        images, order = ranked_candidates(pipeline, p.prompt, [seed * 1_000_003 + 900_000 + i * candidates + j
                                                               for j in range(candidates)], sampling)
        readings = [analyse.analyse(im) for im in images]
        scores = [analyse.score(r, p.scene, p.mentioned) for r in readings]
        pick = int(order[0])
        entry = by_phrasing.setdefault(p.phrasing or p.prompt, {"random": [], "clip_top1": [], "distinct": []})
        entry["random"] += [s["all_correct"] for s in scores]
        entry["clip_top1"].append(scores[pick]["all_correct"])
        counted = [r for r in readings if len(r.objects) == len(p.scene.objects)]
        free = [a for a in FREE_ATTRIBUTES if a not in p.mentioned]
        entry["distinct"].append({a: len({shown(r, a) for r in counted}) for a in free})
        if bar is not None:
            bar.update(1)
    return {phrasing: {"random": float(np.mean(e["random"])), "clip_top1": float(np.mean(e["clip_top1"])),
                       "distinct": {a: float(np.mean([d[a] for d in e["distinct"]])) for a in e["distinct"][0]},
                       "prompts": len(e["clip_top1"])}
            for phrasing, e in by_phrasing.items()}


def evaluate(
    models: str | Path = "models/default",
    n: int = 48,
    candidates: int = 8,
    grid_path: str | Path | None = None,
    grid_rows: int = 4,
    seed: int = 0,
    progress: bool = True,
    condition_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    prompt_seed: int | Sequence[int] | None = None,
    objects: Sequence[int] = (1, 2),
    open_n: int = OPEN_PROMPTS_PER_PHRASING,
) -> dict[str, Any]:
    """The evaluation table as a dict: {kind: {psnr, retrieval, random: {attr: acc}, clip_top1: {...},
    any_correct, prompts, picks}, ...} for the one-object `KINDS` and the two-object `TWO_OBJECT_KINDS`
    (`objects`: which of them, by object count); `any_correct` is the share of prompts with at least one
    all-correct candidate (what a perfect ranker would score), `picks` per prompt the analyser's verdict on
    each candidate and CLIP's pick.

    `prompt_seed` draws other prompts of the same kinds (validation prompts: settings chosen on them leave
    the eval prompts unseen), `n` per seed when it is several seeds, pooled; None gives the fixed eval
    prompts. `open_n` prompts per phrasing that leaves attributes open (`shapes.open_prompts`; 0 for none)
    give "open": `evaluate_open`'s figures."""
    from palette.stages.models.vqgan import VQGAN
    from palette.stages.pipeline import Pipeline
    from palette.stages.ranker import CLIPScorer

    if not objects or set(objects) - {1, 2}:
        raise ValueError(f"objects must be 1, 2 or both, got {tuple(objects)}")
    models = Path(models)
    t0 = time.monotonic()
    pipeline = Pipeline.load(models / "pipeline.toml")
    vq = VQGAN.from_pretrained(models / "vqgan")
    scorer = CLIPScorer.from_pretrained(models / "clip")
    # Unset: what the server would use for this model set.
    scale = {"condition_scale": float(pipeline.default_condition_scale if condition_scale is None
                                      else condition_scale),
             "temperature": float(pipeline.default_temperature if temperature is None else temperature)}
    if top_k is not None:
        scale["top_k"] = int(top_k)
    # What the table reports: the overrides, else the set's own defaults (as the server applies them).
    sampling = dict(scale)
    if top_k is None:
        described = [stage.describe() for stage in pipeline.stages]
        sampling.update(next(({"top_k": d["default_top_k"]} for d in described if "default_top_k" in d), {}))
    results: dict[str, Any] = {"models": str(models), "n": n, "candidates": candidates, "seed": seed,
                               "prompt_seed": prompt_seed,
                               "sampling": sampling, "condition_scale": scale["condition_scale"]}
    grid: list[tuple[str, np.ndarray, list[np.ndarray]]] = []
    seeds = [prompt_seed] if prompt_seed is None or isinstance(prompt_seed, int) else list(prompt_seed)
    # (set, its prompts' kind, two-object share, index of the set in the candidates' seeds)
    sets = [(kind, kind, 0.0, k_i) for k_i, kind in enumerate(KINDS) if 1 in objects]
    sets += [(two, kind, 1.0, len(KINDS) + k_i) for k_i, (two, kind) in enumerate(zip(TWO_OBJECT_KINDS, KINDS))
             if 2 in objects]
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(sets) * n * len(seeds) + open_n * sum(map(len, shapes.OPEN_PHRASINGS.values()))
        bar = tqdm(total=total, desc="eval", dynamic_ncols=True, mininterval=2.0)
    for name, kind, two_objects_prob, k_i in sets:
        prompts = [p for s in seeds for p in shapes.eval_prompts(kind, n, seed=s, two_objects_prob=two_objects_prob)]
        truth = np.stack([shapes.render(p.scene) for p in prompts])
        random_scores, top_scores, any_correct, picks = [], [], [], []
        for i, p in enumerate(prompts):
            images, order = ranked_candidates(pipeline, p.prompt, [seed * 1_000_003 + k_i * 100_000 + i * candidates + j
                                                                   for j in range(candidates)], scale)
            scores_each = [analyse.score(analyse.analyse(im), p.scene, p.mentioned) for im in images]
            random_scores.extend(scores_each)  # every candidate: the expected accuracy of a random pick
            top_scores.append(scores_each[int(order[0])])
            any_correct.append(any(r["all_correct"] for r in scores_each))
            picks.append({"pick": int(order[0]), "candidates": scores_each})
            if i < grid_rows:
                grid.append((f"[{label(name)}] {p.prompt}", truth[i], [images[j] for j in order[:4]]))
            if bar is not None:
                bar.update(1)
        results[name] = {
            "psnr": reconstruction_psnr(vq, truth),
            "retrieval": retrieval_accuracy(scorer, truth, [p.scene for p in prompts], seed=seed + k_i),
            "random": analyse.accuracy(random_scores),
            "clip_top1": analyse.accuracy(top_scores),
            "any_correct": float(np.mean(any_correct)),
            "prompts": [p.prompt for p in prompts],
            "picks": picks,
        }
    if open_n:
        results["open"] = evaluate_open(pipeline, shapes.open_prompts(open_n, seed=None if prompt_seed is None
                                                                      else seeds[0] + 500),
                                        candidates, scale, seed, bar)
    if bar is not None:
        bar.close()
    results["seconds"] = round(time.monotonic() - t0, 1)
    if grid_path is not None:
        save_grid(grid, grid_path)
        results["grid"] = str(grid_path)
    results["table"] = markdown_table(results)
    return results


def label(kind: str) -> str:
    """"held-out", "seen", "two objects, held-out", ..."""
    return ("two objects, " if kind in TWO_OBJECT_KINDS else "") + KIND_LABELS[kind]


def markdown_table(results: dict[str, Any]) -> str:
    """The evaluation as Markdown tables: per prompt set present (one object, two objects), attributes, then
    reconstruction and retrieval."""
    c = results.get("candidates", 8)
    sampling = results.get("sampling", {"condition_scale": results.get("condition_scale", 10.0)})
    labels = {"condition_scale": "condition scale", "top_k": "top-k"}
    how = ", ".join(f"{labels.get(k, k)} {v:g}" for k, v in sampling.items())
    seeds = results.get("prompt_seed")
    which = ("" if seeds is None else f" (prompt seed {seeds})" if isinstance(seeds, int)
             else f" (prompt seeds {', '.join(str(x) for x in seeds)})")
    out = []
    for kinds, attrs, what in ((KINDS, ATTRS, "single-object"), (TWO_OBJECT_KINDS, TWO_OBJECT_ATTRS, "two-object")):
        if not all(k in results for k in kinds):
            continue
        head = ["attribute"] + [f"{label(k)}: {col}" for k in kinds
                                for col in (f"random (mean of {c})", f"CLIP top-1 of {c}")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in attrs:
            row = [ATTR_LABELS.get(a, a)]
            for k in kinds:
                for col in ("random", "clip_top1"):
                    v = results[k][col].get(a)
                    row.append("–" if v is None else f"{100 * v:.1f} %")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "| | " + " | ".join(label(k) for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines.append("| VQGAN reconstruction PSNR | " + " | ".join(f"{results[k]['psnr']:.2f} dB" for k in kinds)
                     + " |")
        lines.append("| CLIP caption retrieval, top-1 of 8 (7 one-attribute distractors) | "
                     + " | ".join(f"{100 * results[k]['retrieval']:.1f} %" for k in kinds) + " |")
        if all("any_correct" in results[k] for k in kinds):
            lines.append(f"| all correct for some candidate of {c} (what a perfect ranker would score) | "
                         + " | ".join(f"{100 * results[k]['any_correct']:.1f} %" for k in kinds) + " |")
        n = len(results[kinds[0]]["prompts"]) if "prompts" in results[kinds[0]] else results.get("n")
        lines.append("")
        lines.append(f"{n} {what} prompts per set{which}, {c} candidates each ({how}); "
                     "attributes read by `palette.training.analyse`.")
        out.append("\n".join(lines))
    if results.get("open"):
        lines = [f"| prompt that leaves attributes open | stated attributes right: random (mean of {c}) | "
                 f"CLIP top-1 of {c} | different values among the {c} candidates (mean) |", "|---|---|---|---|"]
        for phrasing, r in results["open"].items():
            spread = ", ".join(f"{a} {v:.1f}" for a, v in r["distinct"].items())
            lines.append(f"| {shapes.phrasing_label(phrasing)} | {100 * r['random']:.1f} % | "
                         f"{100 * r['clip_top1']:.1f} % | {spread} |")
        n_open = next(iter(results["open"].values()))["prompts"]
        lines += ["", f"{n_open} prompts per phrasing, seen colour x shape pairs; the object count is always stated."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def save_grid(rows: list[tuple[str, np.ndarray, list[np.ndarray]]], path: str | Path, scale: int = 2) -> Path:
    """A PNG: per row the prompt, its ground-truth image, then the candidates in CLIP order (best first)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = rows[0][1].shape[0] * scale if rows else 64
    pad, text_w, header = 6, 230, 22
    ncols = 1 + max((len(r[2]) for r in rows), default=0)
    width = text_w + ncols * (side + pad) + pad
    height = header + len(rows) * (side + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 4), "prompt", fill=(0, 0, 0), font=font)
    draw.text((text_w, 4), "truth", fill=(0, 0, 0), font=font)
    for j in range(1, ncols):
        draw.text((text_w + j * (side + pad), 4), f"CLIP #{j}", fill=(0, 0, 0), font=font)
    for i, (prompt, truth, images) in enumerate(rows):
        y = header + i * (side + pad)
        draw.multiline_text((pad, y + 4), "\n".join(textwrap.wrap(prompt, 36)), fill=(0, 0, 0), font=font)
        for j, im in enumerate([truth] + list(images)):
            tile = Image.fromarray(np.asarray(im, np.uint8)).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (text_w + j * (side + pad), y))
    canvas.save(path)
    return path


def main_eval(models: str, n: int, grid: str | None, json_path: str | None, seed: int = 0,
              condition_scale: float | None = None, temperature: float | None = None,
              top_k: int | None = None, prompt_seed: int | Sequence[int] | None = None,
              objects: Sequence[int] = (1, 2), open_n: int = OPEN_PROMPTS_PER_PHRASING) -> dict[str, Any]:
    results = evaluate(models, n=n, grid_path=grid, seed=seed, prompt_seed=prompt_seed,
                       condition_scale=condition_scale, temperature=temperature, top_k=top_k, objects=objects,
                       open_n=open_n)
    print(results["table"])
    if grid:
        print(f"\ngrid: {grid}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results
