"""Training code: the loop (determinism, resume), each trainer on a tiny config (the loss goes down,
the released-format folder round-trips through the loaders), the evaluation helpers and the CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palette.stages.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from palette.stages.models.dallebart import DalleBart, DalleBartConfig
from palette.stages.models.vqgan import VQGAN, VQGANConfig
from palette.training import evaluate, model_set, patch_codes, recipe, shapes
from palette.training.cli import build_parser
from palette.training.clip_trainer import (
    clip_loss,
    one_attribute_neighbours,
    scene_attribute_labels,
    train_clip,
)
from palette.training.dallebart_trainer import grid_position_embeddings, train_dallebart
from palette.training.loop import (
    DONE_FILE,
    METRICS_FILE,
    LoopConfig,
    TrainState,
    batch_rng,
    is_done,
    learning_rate,
    load_checkpoint,
    make_optimizer,
    run_loop,
)
from palette.training.negatives import allowed_colours, corrupt_codes, drift_colours
from palette.training.pool import code_onsets, make_pool, near_object_pixels, object_token_mask, tokenizer_corpus
from palette.training.vqgan_trainer import (
    MATMUL_WGRAD_MIN_CHANNELS,
    PART_DIMS,
    matmul_wgrad_conv,
    product_codebook,
    train_vqgan,
)

SIDE = 16


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def pool():
    return make_pool(0, 64, size=SIDE)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, pool):
    out = tmp_path_factory.mktemp("set")
    bart_vocab, clip_vocab = model_set.write_tokenizers(out, tokenizer_corpus(0, n=200))
    model_set.write_clip_preprocessor(out)
    # The tiny CLIP below works at SIDE pixels.
    pre = json.loads((out / "clip" / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": SIDE, "width": SIDE}
    pre["size"] = {"shortest_edge": SIDE}
    (out / "clip" / "preprocessor_config.json").write_text(json.dumps(pre))
    return out, bart_vocab, clip_vocab


# ----------------------------------------------------------------------------- the loop


def _regression(seed: int):
    """A tiny least-squares problem whose batches come from the loop's seeded batch generator."""
    w_true = np.arange(4, dtype=np.float32)

    def make_batch(step):
        rng = batch_rng(seed, step)
        x = rng.normal(size=(8, 4)).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(x @ w_true)

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["w"] - y) ** 2), {}

    return {"w": jnp.zeros(4)}, loss_fn, make_batch


def test_loop_lowers_loss_and_writes_metrics(tmp_path):
    params, loss_fn, make_batch = _regression(0)
    cfg = LoopConfig(steps=60, lr=0.3, warmup=5, log_every=1, checkpoint_every=20, progress=False)
    state = run_loop("toy", tmp_path, params, loss_fn, make_batch, cfg)
    losses = _losses(tmp_path)
    assert state.step == 60 and len(losses) == 60
    assert losses[-1] < 0.05 * losses[0]
    record = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "samples_per_s", "grad_norm"} <= set(record)


def test_loop_is_deterministic_given_the_seed(tmp_path):
    params, loss_fn, make_batch = _regression(1)
    cfg = LoopConfig(steps=15, lr=0.05, warmup=5, progress=False)
    a = run_loop("toy", tmp_path / "a", params, loss_fn, make_batch, cfg)
    b = run_loop("toy", tmp_path / "b", params, loss_fn, make_batch, cfg)
    assert _leaves_equal(a.params, b.params)


def test_resume_continues_at_the_saved_step(tmp_path):
    params, loss_fn, make_batch = _regression(2)
    cfg = dict(lr=0.05, warmup=5, checkpoint_every=5, progress=False, log_every=1)
    whole = run_loop("toy", tmp_path / "whole", params, loss_fn, make_batch, LoopConfig(steps=20, **cfg))
    # Simulate a crash after step 10: run 20 steps but keep only the step-10 checkpoint.
    calls = []

    def crashing_batch(step):
        calls.append(step)
        if step == 12:
            raise KeyboardInterrupt
        return make_batch(step)

    with pytest.raises(KeyboardInterrupt):
        run_loop("toy", tmp_path / "crash", params, loss_fn, crashing_batch, LoopConfig(steps=20, **cfg))
    saved = load_checkpoint(tmp_path / "crash", TrainState(params, make_optimizer().init(params)))
    assert saved.step == 10 and saved.total_steps == 20
    calls.clear()

    def recording_batch(step):
        calls.append(step)
        return make_batch(step)

    resumed = run_loop("toy", tmp_path / "crash", params, loss_fn, recording_batch, LoopConfig(steps=20, **cfg))
    assert calls[0] == 10 and resumed.step == 20
    # Same batches, same updates: the resumed run ends where the uninterrupted one ends.
    np.testing.assert_allclose(np.asarray(resumed.params["w"]), np.asarray(whole.params["w"]), rtol=1e-6)


def test_learning_rate_schedule():
    cfg = LoopConfig(lr=1.0, warmup=10)
    assert learning_rate(0, 100, cfg) == pytest.approx(0.1)
    assert learning_rate(9, 100, cfg) == pytest.approx(1.0)
    assert learning_rate(100, 100, cfg) == pytest.approx(0.1)
    assert learning_rate(55, 100, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("lr,warmup,total", [(2e-3, 50, 961), (2e-3, 100, 3227), (1e-3, 50, 1145), (0.3, 5, 60)])
def test_learning_rate_is_the_closed_form_to_the_last_bit_of_float32(lr, warmup, total):
    """The step takes the rate as a float32: optax's schedule, evaluated on the host in float64, must
    round to the same float32 as the closed form, or a run's weights would change."""
    import math

    def closed_form(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    cfg = LoopConfig(lr=lr, warmup=warmup)
    steps = range(0, total + 1, 7 if total > 100 else 1)
    assert [np.float32(learning_rate(s, total, cfg)) for s in steps] == [np.float32(closed_form(s)) for s in steps]


# ----------------------------------------------------------------------------- the trainers


@pytest.fixture(scope="module")
def vocabulary():
    return patch_codes.PatchVocabulary.for_images(SIDE, SIDE // 2)


def tiny_vqgan_config(vocabulary) -> VQGANConfig:
    return VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=SIDE,
                       z_channels=8, embed_dim=sum(PART_DIMS), n_embed=vocabulary.size)


def test_vqgan_trainer_lowers_loss_and_round_trips(tmp_path, pool, vocabulary):
    codes = patch_codes.patch_codes(pool.images, pool.scenes, vocabulary)
    loop = LoopConfig(steps=30, batch_size=8, lr=2e-3, warmup=5, log_every=1, checkpoint_every=10, progress=False)
    vq = train_vqgan(tmp_path / "set", tmp_path / "run", pool, codes, vocabulary, loop, tiny_vqgan_config(vocabulary))
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert np.mean([r["code_accuracy"] for r in records[-5:]]) > np.mean([r["code_accuracy"] for r in records[:5]])
    loaded = VQGAN.from_pretrained(tmp_path / "set" / "vqgan")
    assert loaded.config == vq.config and _leaves_equal(loaded.params, vq.params)
    images = jnp.asarray(pool.images[:4], jnp.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(loaded.encode(images)[1]), np.asarray(vq.encode(images)[1]))
    assert is_done(tmp_path / "run")


@pytest.mark.parametrize("stride", [1, 2])
def test_wide_convs_train_with_the_same_gradients_as_xla_convs(stride):
    # Convs with >= 64 input channels take their kernel gradient as an im2col matmul (faster on
    # XLA:CPU); the values and both gradients must be those of the plain convolution.
    c = MATMUL_WGRAD_MIN_CHANNELS
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, c))
    kernel = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, 5))
    pads = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))
    target = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, 5))

    def loss(conv, x, kernel):
        y = conv(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(y) * target[:, : y.shape[1], : y.shape[2]])

    ours = jax.value_and_grad(lambda x, k: loss(matmul_wgrad_conv, x, k), argnums=(0, 1))(x, kernel)
    xla = jax.value_and_grad(lambda x, k: loss(jax.lax.conv_general_dilated, x, k), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5)
    for a, b in zip(ours[1], xla[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_the_product_codebook_finds_the_nearest_code_part_by_part(vocabulary):
    rng = np.random.default_rng(0)
    parts = {name: jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
             for name, n, d in zip(("mask", "colour", "background"), vocabulary.factor_sizes, PART_DIMS)}
    table = np.asarray(product_codebook(parts, vocabulary))
    assert table.shape == (vocabulary.size, sum(PART_DIMS))
    latents = rng.normal(size=(200, sum(PART_DIMS))).astype(np.float32)
    flat = np.argmin(((latents[:, None] - table[None]) ** 2).sum(-1), axis=1)
    bounds = np.cumsum((0,) + PART_DIMS)
    per_part = [np.argmin(((latents[:, None, lo:hi] - np.asarray(p)[None]) ** 2).sum(-1), axis=1)
                for (lo, hi), p in zip(zip(bounds[:-1], bounds[1:]), parts.values())]
    np.testing.assert_array_equal(flat, vocabulary.code(*per_part))


def tiny_dallebart_config(vocab: int) -> DalleBartConfig:
    return DalleBartConfig(
        encoder_vocab_size=vocab, image_vocab_size=16, image_length=16, max_text_length=model_set.MAX_TEXT_LENGTH,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=16, bos_token_id=17, eos_token_id=17,
        pad_token_id=17,
    )


def test_factored_dallebart_learns_and_saves_logits_that_factor(tmp_path, pool, tokenizers, vocabulary):
    out, bart_vocab, _ = tokenizers
    out = out.parent / "factored"
    (out / "dallebart").mkdir(parents=True)
    for f in (tokenizers[0] / "dallebart").iterdir():
        (out / "dallebart" / f.name).write_bytes(f.read_bytes())
    codes = patch_codes.patch_codes(pool.images, pool.scenes, vocabulary)
    v = vocabulary.size
    config = dataclasses.replace(tiny_dallebart_config(bart_vocab), image_vocab_size=v, image_length=codes.shape[1],
                                 decoder_start_token_id=v, bos_token_id=v + 1, eos_token_id=v + 1, pad_token_id=v + 1)
    loop = LoopConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, log_every=1, checkpoint_every=10, progress=False)
    model = train_dallebart(out, tmp_path / "run", pool, codes, vocabulary, loop, config)
    losses = _losses(tmp_path / "run")
    assert {"first_ce", "onset_ce"} <= set(json.loads((tmp_path / "run" / METRICS_FILE).read_text().splitlines()[-1]))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    loaded = DalleBart.from_pretrained(out / "dallebart")
    assert loaded.config == model.config and _leaves_equal(loaded.params, model.params)
    # The saved lm_head is the factored one: over the image codes, log-softmax of the flat logits
    # is the sum of the three factors' log-softmaxes -- the likelihood the trainer optimised.
    h = jnp.asarray(np.random.default_rng(0).normal(size=(5, config.d_model)), jnp.float32)
    kernel = loaded.params["lm_head"]["kernel"][:, :v]
    flat = jax.nn.log_softmax(h @ kernel, axis=-1)
    picked = vocabulary.all_factors()
    # Recover each factor's vectors from the flat table: codes that differ only in that factor.
    k = np.asarray(kernel)
    base = k[:, vocabulary.code(0, 0, 0)][:, None]
    tables = [k[:, vocabulary.code(np.arange(vocabulary.num_masks), 0, 0)],
              k[:, vocabulary.code(0, np.arange(patch_codes.N_COLOURS), 0)] - base,
              k[:, vocabulary.code(0, 0, np.arange(patch_codes.N_COLOURS))] - base]
    factored = sum(jax.nn.log_softmax(h @ t, axis=-1)[:, i] for t, i in zip(tables, picked))
    np.testing.assert_allclose(np.asarray(flat), np.asarray(factored), atol=1e-4)


def test_dallebart_trainer_needs_a_config_for_the_code_vocabulary(tmp_path, pool, tokenizers, vocabulary):
    out, bart_vocab, _ = tokenizers
    codes = np.zeros((len(pool), 16), np.int32)
    with pytest.raises(ValueError, match=f"image_vocab_size={vocabulary.size}"):
        train_dallebart(out, tmp_path / "run", pool, codes, vocabulary, LoopConfig(steps=1, progress=False),
                        tiny_dallebart_config(bart_vocab))


def test_open_prompts_state_only_what_their_phrasing_says():
    prompts = shapes.open_prompts(3)
    assert len(prompts) == 3 * sum(map(len, shapes.OPEN_PHRASINGS.values()))
    by_phrasing = {p.phrasing: p for p in prompts}
    one = by_phrasing["{a_c} {s}"]
    assert one.prompt == f"{'an' if one.scene.objects[0].colour[0] in 'aeiou' else 'a'} {one.scene.objects[0].colour} "\
                         f"{one.scene.objects[0].shape}" and one.mentioned == {"colour", "shape"}
    two = by_phrasing["two shapes on {a_b} background"]
    assert len(two.scene.objects) == 2 and two.mentioned == {"background"} and two.scene.background in two.prompt
    assert not any(p.scene.has_heldout for p in prompts)
    assert shapes.phrasing_label("{a_c1} {s1} and {a_c2} {s2}") == "a [colour] [shape] and a [colour] [shape]"
    assert [p.prompt for p in shapes.open_prompts(3)] == [p.prompt for p in prompts]


def test_grid_positions_encode_rows_and_columns():
    table = grid_position_embeddings(16, 128, std=0.02)
    assert table.shape == (256, 128) and np.isclose(table.std(), 0.02, rtol=1e-3)

    def similarity(i, j):
        return float(table[i] @ table[j] / np.linalg.norm(table[i]) / np.linalg.norm(table[j]))

    # Position 0 is row 0, column 0: its right and lower neighbours are alike, the far corner is not.
    assert similarity(0, 1) > 0.25 and similarity(0, 16) > 0.25 and similarity(0, 255) < 0.1
    # The row half of the features is the same along a row, the column half along a column.
    assert np.allclose(table[3 * 16:4 * 16, :64], table[3 * 16, :64])
    assert np.allclose(table[5::16, 64:], table[5, 64:])


def test_object_token_mask_marks_the_patches_under_the_object():
    scene = shapes.SceneSpec((shapes.ObjectSpec("square", "red", "small", "top left"),), background="blue")
    image = shapes.render(scene)
    mask = object_token_mask(image[None], 16)[0].reshape(16, 16)
    rows, cols = np.nonzero(mask)
    assert mask.sum() >= 9 and rows.max() < 8 and cols.max() < 8
    assert not object_token_mask(np.full((1, 64, 64, 3), 7, np.uint8), 16).any()


def test_near_object_pixels_cover_the_object_and_a_ring_around_it():
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[0, 5, 5] = 200  # one object pixel
    image[0, 15, 8] = 200  # one on the bottom edge: the ring stops there, it does not wrap to the top
    near = near_object_pixels(image, radius=2)[0, ..., 0]
    assert near.shape == (16, 16)
    assert near[3:8, 3:8].all() and near.sum() == 25 + 15
    assert not near[2, 5] and not near[5, 8] and not near[0, 8]
    assert np.array_equal(near_object_pixels(image, radius=0)[0, ..., 0], np.any(image[0] > 0, -1))


def test_code_onsets_find_where_the_background_first_changes():
    codes = np.full((3, 16), 5)
    codes[0, 7:9] = 2
    codes[1, 0] = 9
    assert code_onsets(codes).tolist() == [7, 0, 0]


def test_one_attribute_neighbours_are_exactly_one_attribute_away():
    scenes = make_pool(5, 400, size=SIDE, two_objects_prob=0.2).scenes

    def attrs(s):
        o = s.objects[0]
        return (o.shape, o.colour, o.size, o.position, s.background)

    neighbours = one_attribute_neighbours(scenes)
    for i, s in enumerate(scenes):
        expected = [j for j, t in enumerate(scenes) if len(s.objects) == len(t.objects) == 1
                    and sum(a != b for a, b in zip(attrs(s), attrs(t))) == 1]
        assert sorted(neighbours[i].tolist()) == expected
    assert sum(len(n) > 0 for n in neighbours) > 20


def tiny_clip_config(vocab: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=model_set.MAX_TEXT_LENGTH),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=SIDE, patch_size=8),
        projection_dim=16,
    )


def test_clip_trainer_learns_with_negatives_and_attribute_heads_and_round_trips(tmp_path, pool, tokenizers):
    out, _, clip_vocab = tokenizers
    loop = LoopConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, log_every=1, checkpoint_every=20, progress=False)
    # Stand-ins for the VQGAN's paintings and their spoilt versions: any images no caption describes.
    clip = train_clip(out, tmp_path / "run", pool, pool.images, pool.images[:, ::-1], loop,
                      tiny_clip_config(clip_vocab))
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    losses, read = [r["loss"] for r in records], [r["attribute_loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert len(read) >= 30 and np.mean(read[-5:]) < 0.85 * np.mean(read[:5])
    loaded = CLIP.from_pretrained(out / "clip")
    assert "heads" not in loaded.params and _leaves_equal(loaded.params, clip.params)
    labels = scene_attribute_labels(pool.scenes)
    one = np.asarray([len(s.objects) == 1 for s in pool.scenes])
    assert (labels[one] >= 0).all() and (labels[~one] == -1).all()
    first = pool.scenes[int(np.flatnonzero(one)[0])]
    assert shapes.SHAPES[labels[int(np.flatnonzero(one)[0]), 1]] == first.objects[0].shape


def test_clip_loss_takes_negative_images_as_extra_columns():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    square = float(clip_loss(logits))
    expected = 0.5 * (float(_diagonal_cross_entropy(logits)) + float(_diagonal_cross_entropy(logits.T)))
    assert np.isclose(square, expected, atol=1e-6)
    # A negative image that every text likes a lot costs; one they all dislike costs next to nothing.
    liked = jnp.concatenate([logits, jnp.full((4, 1), 10.0)], axis=1)
    disliked = jnp.concatenate([logits, jnp.full((4, 1), -30.0)], axis=1)
    assert float(clip_loss(liked)) > square + 1.0
    assert np.isclose(float(clip_loss(disliked)), square, atol=1e-4)


def _diagonal_cross_entropy(x):
    """Mean cross-entropy of each row against the diagonal, written out."""
    x = np.asarray(x, np.float64)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_p))


def _drift_inputs(pool):
    """(vocabulary, codes, is_object, allowed colours) of a pool, as `clip_images` hands them to `drift_colours`."""
    vocabulary = patch_codes.PatchVocabulary.for_images(64, 16)
    codes = patch_codes.patch_codes(pool.images, pool.scenes, vocabulary)
    return vocabulary, codes, object_token_mask(pool.images, 16), allowed_colours(pool.scenes)


def test_drift_colours_switches_one_colour_from_a_point_on():
    pool = make_pool(4, 40, two_objects_prob=0.0)
    vocabulary, codes, is_object, allowed = _drift_inputs(pool)
    drifted = drift_colours(codes, is_object, vocabulary, np.random.default_rng(3), share=0.5, allowed=allowed)
    assert np.array_equal(drifted, drift_colours(codes, is_object, vocabulary, np.random.default_rng(3), share=0.5,
                                                   allowed=allowed))
    changed = (drifted != codes).any(axis=1)
    assert 0.25 < changed.mean() < 0.75
    kinds = set()
    for before, after in zip(codes[changed], drifted[changed]):
        (m0, c0, b0), (m1, c1, b1) = vocabulary.factors(before), vocabulary.factors(after)
        assert np.array_equal(m0, m1)  # the shapes stay: only a colour changes
        kind = "object" if (c0 != c1).any() else "background"
        old, new = (c0, c1) if kind == "object" else (b0, b1)
        assert not ((c0 != c1).any() and (b0 != b1).any())
        cut = int(np.flatnonzero(old != new)[0])
        assert len(set(new[cut:].tolist())) == 1 and np.array_equal(old[:cut], new[:cut])  # one colour from the cut on
        kinds.add(kind)
    assert kinds == {"object", "background"}
    assert np.array_equal(drift_colours(codes, is_object, vocabulary, np.random.default_rng(3), share=0.0,
                                          allowed=allowed), codes)


def test_drifting_objects_never_take_a_held_out_colour():
    pool = make_pool(5, 400, two_objects_prob=0.2)
    vocabulary, codes, is_object, allowed = _drift_inputs(pool)
    square = [i for i, s in enumerate(pool.scenes) if any(o.shape == "square" for o in s.objects)]
    assert not allowed[square, shapes.COLOUR_NAMES.index("yellow")].any()  # ("yellow", "square") is held out
    drifted = drift_colours(codes, is_object, vocabulary, np.random.default_rng(0), share=1.0, allowed=allowed)
    seen_colours = set()
    for i in np.flatnonzero((drifted != codes).any(axis=1)):
        _, before, _ = vocabulary.factors(codes[i])
        _, after, _ = vocabulary.factors(drifted[i])
        for c in set(after.tolist()) - set(before.tolist()):
            seen_colours.add(c)
            assert all((shapes.COLOUR_NAMES[c], o.shape) not in shapes.HELDOUT for o in pool.scenes[i].objects)
    assert len(seen_colours) == len(shapes.COLOUR_NAMES)  # every colour is still drifted to somewhere


def test_corrupt_codes_spoil_the_object_and_its_surroundings_only():
    pool = make_pool(4, 24, two_objects_prob=0.2)
    grid = 16
    # Codes: one per distinct 4x4 patch.
    patches = pool.images.reshape(len(pool), grid, 4, grid, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    codes = np.unique(patches.reshape(len(pool) * grid * grid, -1), axis=0, return_inverse=True)[1]
    codes = codes.reshape(len(pool), grid * grid)
    is_object = object_token_mask(pool.images, grid)
    empty = np.zeros((1, grid * grid), bool)
    spoilt = corrupt_codes(codes, is_object, np.random.default_rng(1))
    assert np.array_equal(spoilt, corrupt_codes(codes, is_object, np.random.default_rng(1)))
    assert np.array_equal(corrupt_codes(codes[:1], empty, np.random.default_rng(1)), codes[:1])
    for before, after, obj in zip(codes, spoilt, is_object):
        changed = before != after
        assert changed.any()
        assert set(after[changed].tolist()) <= set(before.tolist())  # only codes the grid already had
        rows, cols = np.divmod(np.flatnonzero(obj), grid)
        for i in np.flatnonzero(changed):
            r, c = divmod(i, grid)
            assert np.min(np.maximum(np.abs(rows - r), np.abs(cols - c))) <= 3


def test_pool_is_deterministic_and_excludes_heldout():
    a, b = make_pool(3, 50, size=SIDE), make_pool(3, 50, size=SIDE)
    assert np.array_equal(a.images, b.images) and a.scenes == b.scenes
    assert not any(s.has_heldout for s in a.scenes)


def test_publish_model_set_replaces_entries(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in (src, dst):
        for name in ("dallebart", "vqgan", "clip"):
            (d / name).mkdir(parents=True)
    (src / "vqgan" / "config.json").write_text("new")
    (dst / "vqgan" / "stale.txt").write_text("old")
    (src / "pipeline.toml").write_text("x = 1\n")
    (dst / "README.md").write_text("kept")
    recipe.publish_model_set(src, dst)
    assert (dst / "vqgan" / "config.json").read_text() == "new"
    assert not (dst / "vqgan" / "stale.txt").exists()
    assert (dst / "pipeline.toml").read_text() == "x = 1\n" and (dst / "README.md").read_text() == "kept"


# ----------------------------------------------------------------------------- evaluation and CLI


def test_distractor_captions_change_one_attribute():
    rng = np.random.default_rng(0)
    for p in shapes.eval_prompts("heldout", 6):
        captions = evaluate.distractor_captions(p.scene, rng)
        assert len(captions) == 7 == len(set(captions))
        assert p.prompt not in captions


def test_distractor_captions_of_two_objects_include_swaps():
    rng = np.random.default_rng(0)
    for p in shapes.eval_prompts("heldout", 6, two_objects_prob=1.0):
        scene = p.scene
        captions = evaluate.distractor_captions(scene, rng, k=40)
        assert len(captions) == 40 == len(set(captions)) and p.prompt not in captions
        a, b = scene.objects
        swap = dataclasses.replace
        colours_swapped = swap(scene, objects=(swap(a, colour=b.colour), swap(b, colour=a.colour)))
        # (the canonical caption states places, not the relation)
        places_swapped = swap(scene, objects=(swap(a, position=b.position), swap(b, position=a.position)))
        assert shapes.caption(colours_swapped, full=True) in captions
        assert shapes.caption(places_swapped, full=True) in captions


def test_markdown_table_lists_every_attribute():
    acc = {a: 0.5 for a in evaluate.ATTRS}
    results = {"n": 4, "candidates": 8, **{k: {"psnr": 20.0, "retrieval": 0.25, "random": acc, "clip_top1": acc}
                                             for k in evaluate.KINDS}}
    table = evaluate.markdown_table(results)
    for a in ("colour", "shape", "size", "position", "background", "all correct", "PSNR", "retrieval"):
        assert a in table
    assert "50.0 %" in table and "20.00 dB" in table and "perfect ranker" not in table
    for k in evaluate.KINDS:
        results[k]["any_correct"] = 0.75
    assert "| all correct for some candidate of 8 (what a perfect ranker would score) | 75.0 % | 75.0 % |" in (
        evaluate.markdown_table(results))
    assert "two objects" not in evaluate.markdown_table(results)
    two = {a: 0.25 for a in evaluate.TWO_OBJECT_ATTRS}
    results.update({k: {"psnr": 20.0, "retrieval": 0.25, "random": two, "clip_top1": two, "any_correct": 0.5}
                    for k in evaluate.TWO_OBJECT_KINDS})
    table = evaluate.markdown_table(results)
    assert "| relation | 25.0 % | 25.0 % | 25.0 % | 25.0 % |" in table
    assert "two objects, held-out: CLIP top-1 of 8" in table and "4 two-object prompts per set" in table
    assert "| relation" not in table.split("| attribute | two objects")[0]


def test_cli_parses_train_and_eval():
    p = build_parser()
    a = p.parse_args(["train", "default", "--out", "x", "--minutes", "5", "--seed", "3"])
    assert (a.command, a.model, a.out, a.minutes, a.seed, a.steps) == ("train", "default", "x", 5.0, 3, None)
    assert p.parse_args(["train", "default", "--steps", "10,20,30"]).steps == (10, 20, 30)
    for bad in ("10,20", "10,x,30", "10,0,30"):
        with pytest.raises(SystemExit):
            p.parse_args(["train", "default", "--steps", bad])
    a = p.parse_args(["eval", "--models", "m", "--n", "6"])
    assert (a.command, a.models, a.n, a.temperature, a.top_k, a.prompt_seed) == ("eval", "m", 6, None, None, None)
    assert p.parse_args(["eval", "--prompt-seed", "1234"]).prompt_seed == 1234
    assert p.parse_args(["eval", "--prompt-seed", "11,12,13"]).prompt_seed == (11, 12, 13)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--prompt-seed", "11,x"])
    a = p.parse_args(["eval", "--temperature", "0.7", "--top-k", "4"])
    assert (a.temperature, a.top_k, a.objects) == (0.7, 4, (1, 2))
    assert p.parse_args(["eval", "--two-objects"]).objects == (2,)
    assert p.parse_args(["eval", "--one-object"]).objects == (1,)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--one-object", "--two-objects"])


def write_random_set(out, seed: int = 0) -> None:
    """A complete, loadable model set with random weights, the default set's sizes."""
    bart_vocab, clip_vocab = model_set.write_tokenizers(out, tokenizer_corpus(0, n=200))
    vocabulary = patch_codes.PatchVocabulary.for_images(model_set.IMAGE_SIZE, model_set.GRID)
    DalleBart.init_random(model_set.dallebart_config(bart_vocab, vocabulary.size), seed).save_pretrained(
        out / "dallebart")
    VQGAN.init_random(model_set.vqgan_config(vocabulary.size, sum(PART_DIMS)), seed).save_pretrained(out / "vqgan")
    CLIP.init_random(model_set.clip_config(clip_vocab), seed).save_pretrained(out / "clip")
    model_set.write_clip_preprocessor(out)
    model_set.write_pipeline_config(out, "randomly initialised weights (not trained)")


def test_train_one_model_retrains_that_model_of_a_set_and_leaves_the_others(tmp_path):
    """`palette train clip|vqgan --out SET` retrains one phase of a set, as `train default` trains it."""
    from palette.training.cli import main

    write_random_set(tmp_path / "set")
    before = {name: (tmp_path / "set" / name / "flax_model.msgpack").read_bytes()
              for name in ("vqgan", "dallebart", "clip")}
    for name in ("clip", "vqgan"):
        assert main(["train", name, "--out", str(tmp_path / "set"), "--steps", "2", "--pool-size", "24",
                     "--batch-size", "8", "--run-dir", str(tmp_path / f"run-{name}"), "--no-progress"]) == 0
        assert (tmp_path / f"run-{name}" / DONE_FILE).is_file()
    after = {name: (tmp_path / "set" / name / "flax_model.msgpack").read_bytes() for name in before}
    assert after["clip"] != before["clip"] and after["vqgan"] != before["vqgan"]
    assert after["dallebart"] == before["dallebart"]
    CLIP.from_pretrained(tmp_path / "set" / "clip")
    VQGAN.from_pretrained(tmp_path / "set" / "vqgan")


def test_retraining_clip_needs_the_sets_vqgan(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the VQGAN first"):
        recipe.retrain("clip", tmp_path / "set", steps=1, pool_size=24, batch_size=8, progress=False)


def test_markdown_table_names_the_sampling():
    acc = {a: 0.5 for a in evaluate.ATTRS}
    results = {"n": 4, "candidates": 8, "sampling": {"condition_scale": 3.0, "top_k": 8, "temperature": 0.7},
               **{k: {"psnr": 20.0, "retrieval": 0.25, "random": acc, "clip_top1": acc} for k in evaluate.KINDS}}
    assert "condition scale 3, top-k 8, temperature 0.7" in evaluate.markdown_table(results)


def test_tokenizers_are_the_same_files_every_time(tmp_path):
    # Deterministic given a seed: the ids a model is trained on must not change between runs.
    from transformers import CLIPTokenizerFast

    from palette.training.tokenizers import train_bart_tokenizer, train_clip_tokenizer

    corpus = tokenizer_corpus(0, n=300)
    for train in (train_bart_tokenizer, train_clip_tokenizer):
        a, b = train(corpus, tmp_path / f"{train.__name__}-a"), train(corpus, tmp_path / f"{train.__name__}-b")
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), (train.__name__, name)
    clip = CLIPTokenizerFast.from_pretrained(str(a))
    text = "a large green star in the top right corner on a blue background"
    ids = clip(text)["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and clip.eos_token_id not in ids[1:-1]
    # CLIP's convention: BOS and EOS are the last two ids, so argmax(input_ids) finds the EOS.
    assert (clip.bos_token_id, clip.eos_token_id) == (len(clip) - 2, len(clip) - 1)
    assert max(clip.get_vocab().values()) == clip.eos_token_id and int(np.argmax(ids)) == len(ids) - 1
    assert clip.decode(ids, skip_special_tokens=True) == text
