"""Command line of the training side: `palette train ...` and `palette eval ...`.

`main(argv)` takes the arguments after the program name, starting with the command:

    train default  --out models/default [--minutes 56] [--steps V,B,C] [--seed 0] [--run-dir DIR] [--pool-size N]
    train vqgan    --out DIR [--steps N] [--minutes M] [--seed S] [--run-dir DIR] [--pool-size N]
    train dallebart --out DIR [...]     (on the pool's patch codes, as `train default` trains it)
    train clip     --out DIR [...]      (on DIR/vqgan's paintings of the pool's codes; needs DIR/vqgan)
    eval [--models models/default] [--n 48] [--grid out/eval-grid.png] [--json out/eval.json] [--seed 0]
         [--prompt-seed S[,S...]] [--one-object | --two-objects] [--open-prompts 8] [--condition-scale S]

Runnable as `python -m palette.training.cli train default --out models/default`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


def _int_list(text: str) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3); () when any item is not an integer."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        return ()


def _step_counts(text: str) -> tuple[int, int, int]:
    counts = _int_list(text)
    if len(counts) != 3 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive step counts V,B,C, got {text!r}")
    return counts  # type: ignore[return-value]


def _prompt_seeds(text: str) -> int | tuple[int, ...]:
    seeds = _int_list(text)
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected a seed or seeds S1,S2,..., got {text!r}")
    return seeds[0] if len(seeds) == 1 else seeds


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import OPEN_PROMPTS_PER_PHRASING

    parser = argparse.ArgumentParser(prog="palette", description="Train and evaluate Palette's own model set.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the default model set, or one of its models")
    models = train.add_subparsers(dest="model", required=True)
    default = models.add_parser("default", help="VQGAN, then DalleBart, then CLIP, within one time budget")
    default.add_argument("--out", default="models/default", help="model-set folder to write (default: %(default)s)")
    default.add_argument("--minutes", type=float, default=56.0, help="wall-time budget (default: %(default)s)")
    default.add_argument("--steps", type=_step_counts, default=None, metavar="V,B,C",
                         help="step counts of VQGAN, DalleBart and CLIP; the same seed and counts give the same "
                              "weights (default: as many as the budget allows). A phase that runs out of its "
                              "share of the budget first stops early, with its schedule fitted to the time")
    default.add_argument("--seed", type=int, default=0)
    default.add_argument("--run-dir", default=None, help="checkpoints and metrics (default: runs/train-<out name>)")
    default.add_argument("--pool-size", type=int, default=8000, help="training images (default: %(default)s)")
    default.add_argument("--no-progress", action="store_true")
    for name in ("vqgan", "dallebart", "clip"):
        one = models.add_parser(name, help=f"train only the {name} of a model set")
        one.add_argument("--out", default="models/default")
        one.add_argument("--steps", type=int, default=1000)
        one.add_argument("--minutes", type=float, default=None)
        one.add_argument("--batch-size", type=int, default=None)
        one.add_argument("--seed", type=int, default=0)
        one.add_argument("--run-dir", default=None)
        one.add_argument("--pool-size", type=int, default=8000)
        one.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="evaluation table of a model set (held-out and seen prompts)")
    ev.add_argument("--models", default="models/default", help="model-set folder (default: %(default)s)")
    ev.add_argument("--n", type=int, default=48, help="prompts per set: held-out and seen, of one and of two objects (default: %(default)s)")
    ev.add_argument("--grid", default="out/eval-grid.png", help="grid picture to write ('' for none)")
    ev.add_argument("--json", default=None, help="write the results as JSON here")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--prompt-seed", type=_prompt_seeds, default=None, metavar="S[,S...]",
                    help="draw other prompts with this seed, or --n per seed with several, pooled (validation: "
                         "choose settings on these, so the eval prompts stay unseen; default: the fixed eval "
                         "prompts)")
    only = ev.add_mutually_exclusive_group()
    only.add_argument("--one-object", dest="objects", action="store_const", const=(1,), default=(1, 2),
                      help="only the single-object prompts (default: single- and two-object prompts)")
    only.add_argument("--two-objects", dest="objects", action="store_const", const=(2,),
                      help="only the two-object prompts")
    ev.add_argument("--open-prompts", type=int, default=OPEN_PROMPTS_PER_PHRASING, metavar="N",
                    help="prompts per phrasing that leaves attributes open, 'a red circle' or 'two shapes on a "
                         "white background' (0 for none; default: %(default)s)")
    ev.add_argument("--condition-scale", type=float, default=None,
                    help="super-conditioning scale of the candidates (default: the model set's, in its "
                         "pipeline.toml)")
    ev.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: the model set's, in its pipeline.toml)")
    ev.add_argument("--top-k", type=int, default=None, help="top-k of the sampling (default: the sampler's default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        from . import recipe

        if args.model == "default":
            extra = {} if args.steps is None else {"max_steps": args.steps}
            summary = recipe.train_default(args.out, args.minutes, seed=args.seed, run_dir=args.run_dir,
                                           pool_size=args.pool_size, progress=not args.no_progress, **extra)
            print(json.dumps(summary, indent=2))
        else:
            recipe.retrain(args.model, args.out, args.steps, args.minutes, seed=args.seed, run_dir=args.run_dir,
                           pool_size=args.pool_size, batch_size=args.batch_size, progress=not args.no_progress)
        return 0
    if args.command == "eval":
        from .evaluate import main_eval

        main_eval(args.models, args.n, args.grid or None, args.json, seed=args.seed, prompt_seed=args.prompt_seed,
                  condition_scale=args.condition_scale, temperature=args.temperature, top_k=args.top_k,
                  objects=args.objects, open_n=args.open_prompts)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
