"""`palette eval`: how well a model set draws what the prompts say.

On the held-out prompts (whose colour x shape pair no training image shows) and
on seen prompts, separately:

* VQGAN reconstruction PSNR of the prompts' ground-truth images;
* attribute accuracy, read back by the deterministic analyser, of a random
  candidate (its expectation: the mean over all the candidates, which a single
  pick would only estimate with the noise of one draw per prompt) and of CLIP's
  top-1 among `candidates` images;
* CLIP top-1 retrieval of the right caption for the ground-truth image among
  itself and 7 distractor captions that each change one attribute of the scene;
* how often some candidate is all correct: the most any ranker could score.

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
ATTR_LABELS = {"count": "object count", "all_correct": "**all correct**"}
KINDS = ("heldout", "seen")
KIND_LABELS = {"heldout": "held-out", "seen": "seen"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def reconstruction_psnr(vq, images: np.ndarray) -> float:
    """Mean per-image PSNR of VQGAN encode -> decode."""
    from .vqgan_trainer import decode_codes, encode_pool

    recon = decode_codes(vq, encode_pool(vq, images, batch_size=16), batch_size=16)
    return float(np.mean([psnr(a, b) for a, b in zip(images, recon)]))


def _variants(scene: shapes.SceneSpec) -> list[shapes.SceneSpec]:
    """Every valid scene that differs from `scene` in exactly one attribute of its first object or the background."""
    out = []
    o = scene.objects[0]
    changes: list[dict[str, Any]] = (
        [{"colour": c} for c in shapes.COLOUR_NAMES if c != o.colour]
        + [{"shape": s} for s in shapes.SHAPES if s != o.shape]
        + [{"size": z} for z in shapes.SIZES if z != o.size]
        + [{"position": p} for p in shapes.POSITION_NAMES if p != o.position]
    )
    for change in changes:
        try:
            out.append(replace(scene, objects=(replace(o, **change),) + scene.objects[1:]))
        except ValueError:
            pass
    for b in shapes.BACKGROUNDS:
        if b != scene.background:
            try:
                out.append(replace(scene, background=b))
            except ValueError:
                pass
    return out


def distractor_captions(scene: shapes.SceneSpec, rng: np.random.Generator, k: int = 7) -> list[str]:
    """`k` canonical captions of scenes one attribute away from `scene`, spread over the attributes."""
    variants = _variants(scene)
    by_attr: dict[str, list[shapes.SceneSpec]] = {}
    o = scene.objects[0]
    for v in variants:
        vo = v.objects[0]
        attr = next((a for a in ("colour", "shape", "size", "position") if getattr(vo, a) != getattr(o, a)), "background")
        by_attr.setdefault(attr, []).append(v)
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


def evaluate(
    models: str | Path = "models/default",
    n: int = 48,
    candidates: int = 8,
    grid_path: str | Path | None = None,
    grid_rows: int = 6,
    seed: int = 0,
    progress: bool = True,
    condition_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    prompt_seed: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """The evaluation table as a dict: {kind: {psnr, retrieval, random: {attr: acc}, clip_top1: {...},
    any_correct}, ...}; `any_correct` is the share of prompts with at least one all-correct candidate (what a
    perfect ranker would score).

    `prompt_seed` draws other prompts of the same kinds (validation prompts: settings chosen on them leave
    the eval prompts unseen), `n` per seed when it is several seeds, pooled; None gives the fixed eval
    prompts."""
    from palette.stages.models.vqgan import VQGAN
    from palette.stages.pipeline import Pipeline
    from palette.stages.ranker import CLIPScorer
    from palette.stages.sampler import SamplingParams

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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * n * len(seeds), desc="eval", dynamic_ncols=True, mininterval=2.0)
    for k_i, kind in enumerate(KINDS):
        prompts = [p for s in seeds for p in shapes.eval_prompts(kind, n, seed=s)]
        truth = np.stack([shapes.render(p.scene) for p in prompts])
        random_scores, top_scores, any_correct = [], [], []
        for i, p in enumerate(prompts):
            params = [SamplingParams(seed=seed * 1_000_003 + k_i * 100_000 + i * candidates + j, **scale)
                      for j in range(candidates)]
            items = pipeline.run(p.prompt, params, rank=True)
            images = [np.asarray(it["image"].convert("RGB")) for it in items]
            scores = np.asarray([float(it["score"]) for it in items])
            order = np.argsort(-scores, kind="stable")
            scores_each = [analyse.score(analyse.analyse(im), p.scene, p.mentioned) for im in images]
            random_scores.extend(scores_each)  # every candidate: the expected accuracy of a random pick
            top_scores.append(scores_each[int(order[0])])
            any_correct.append(any(r["all_correct"] for r in scores_each))
            if i < grid_rows:
                grid.append((f"[{KIND_LABELS[kind]}] {p.prompt}", truth[i], [images[j] for j in order[:4]]))
            if bar is not None:
                bar.update(1)
        results[kind] = {
            "psnr": reconstruction_psnr(vq, truth),
            "retrieval": retrieval_accuracy(scorer, truth, [p.scene for p in prompts], seed=seed + k_i),
            "random": analyse.accuracy(random_scores),
            "clip_top1": analyse.accuracy(top_scores),
            "any_correct": float(np.mean(any_correct)),
            "prompts": [p.prompt for p in prompts],
        }
    if bar is not None:
        bar.close()
    results["seconds"] = round(time.monotonic() - t0, 1)
    if grid_path is not None:
        save_grid(grid, grid_path)
        results["grid"] = str(grid_path)
    results["table"] = markdown_table(results)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The evaluation as two Markdown tables (attributes; reconstruction and retrieval)."""
    c = results.get("candidates", 8)
    head = ["attribute"] + [f"{KIND_LABELS[k]}: {col}" for k in KINDS
                            for col in (f"random (mean of {c})", f"CLIP top-1 of {c}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in ATTRS:
        row = [ATTR_LABELS.get(a, a)]
        for k in KINDS:
            for col in ("random", "clip_top1"):
                v = results[k][col].get(a)
                row.append("–" if v is None else f"{100 * v:.1f} %")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| | " + " | ".join(KIND_LABELS[k] for k in KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    lines.append("| VQGAN reconstruction PSNR | " + " | ".join(f"{results[k]['psnr']:.2f} dB" for k in KINDS) + " |")
    lines.append("| CLIP caption retrieval, top-1 of 8 (7 one-attribute distractors) | "
                 + " | ".join(f"{100 * results[k]['retrieval']:.1f} %" for k in KINDS) + " |")
    if all("any_correct" in results[k] for k in KINDS):
        lines.append(f"| all correct for some candidate of {c} (what a perfect ranker would score) | "
                     + " | ".join(f"{100 * results[k]['any_correct']:.1f} %" for k in KINDS) + " |")
    n = len(results[KINDS[0]]["prompts"]) if "prompts" in results[KINDS[0]] else results.get("n")
    lines.append("")
    sampling = results.get("sampling", {"condition_scale": results.get("condition_scale", 10.0)})
    labels = {"condition_scale": "condition scale", "top_k": "top-k"}
    how = ", ".join(f"{labels.get(k, k)} {v:g}" for k, v in sampling.items())
    seeds = results.get("prompt_seed")
    which = ("" if seeds is None else f" (prompt seed {seeds})" if isinstance(seeds, int)
             else f" (prompt seeds {', '.join(str(x) for x in seeds)})")
    lines.append(f"{n} single-object prompts per set{which}, {c} candidates each ({how}); "
                 "attributes read by `palette.training.analyse`.")
    return "\n".join(lines)


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
              top_k: int | None = None, prompt_seed: int | Sequence[int] | None = None) -> dict[str, Any]:
    results = evaluate(models, n=n, grid_path=grid, seed=seed, prompt_seed=prompt_seed,
                       condition_scale=condition_scale, temperature=temperature, top_k=top_k)
    print(results["table"])
    if grid:
        print(f"\ngrid: {grid}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results
