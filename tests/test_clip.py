"""CLIP ranker: model loading/saving, pre-processing, scoring, training loss. Tiny configs, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import load_case, reference_dir
from palette.stages.checkpoint import CheckpointError, flatten
from palette.stages.clip_processing import CLIPTextTokenizer, image_processor, pixel_values
from palette.stages.models.clip import CLIP, CLIPConfig
from palette.stages.ranker import CLIPScorer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
STD = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None]


def tiny_config(vocab_size: int = 64, hidden_act: str = "quick_gelu", init: float = 0.02,
                layers: int = 2) -> CLIPConfig:
    return CLIPConfig.from_dict({
        "projection_dim": 8,
        "text_config": {"vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
                        "num_attention_heads": 2, "max_position_embeddings": 12, "hidden_act": hidden_act,
                        "initializer_range": init},
        "vision_config": {"image_size": 16, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": layers, "num_attention_heads": 2, "hidden_act": hidden_act,
                          "initializer_range": init},
    })


def write_tiny_tokenizer(folder: Path, specials_first: bool = False) -> int:
    """A character-level BPE in CLIP's convention ("</w>" word ends, BOS/EOS last, or first when
    `specials_first`, which CLIP cannot read); returns the vocab size."""
    from tokenizers.models import BPE

    letters = "abcdefghijklmnopqrstuvwxyz"
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = [*letters, *(c + "</w>" for c in letters), "ca", "cat</w>"]
    # EOS must be the largest id: the model pools at argmax(input_ids).
    vocab = {token: i for i, token in enumerate(specials + words if specials_first else words + specials)}
    folder.mkdir(parents=True, exist_ok=True)
    BPE(vocab, [("c", "a"), ("ca", "t</w>")], end_of_word_suffix="</w>").save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 12,
    }))
    return len(vocab)


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(23, 17), (16, 16), (9, 30), (40, 21), (17, 17), (32, 8), (12, 19)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(n))]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab_size = write_tiny_tokenizer(folder)
    CLIP.init_random(tiny_config(vocab_size, init=0.1), seed=1).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- pre-processing


def processor(size, crop_size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size=size, crop_size=crop_size)


def test_preprocess_crop_geometry_and_normalisation_by_hand():
    # 7 wide x 4 high, shortest side already 4: the resize keeps the pixels, the crop takes columns 1..4.
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
    pre = processor({"shortest_edge": 4}, {"height": 4, "width": 4})
    got = pixel_values(pre, [Image.fromarray(hwc)])
    expected = (hwc[:, 1:5].transpose(2, 0, 1).astype(np.float32) / 255 - MEAN) / STD
    assert got.shape == (1, 3, 4, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-6)


def test_preprocess_resize_shortest_edge_then_center_crop():
    rng = np.random.default_rng(4)
    # 10 wide x 4 high -> 5 x 2 (long side int(2 * 10 / 4) = 5), crop 2x2 from column (5 - 2) // 2 = 1.
    wide = Image.fromarray(rng.integers(0, 256, (4, 10, 3), dtype=np.uint8))
    # 3 wide x 8 high -> 2 x 5 (int(2 * 8 / 3) = 5, truncated), crop from row (5 - 2) // 2 = 1.
    tall = Image.fromarray(rng.integers(0, 256, (8, 3, 3), dtype=np.uint8))
    pre = processor({"shortest_edge": 2}, {"height": 2, "width": 2})
    got = pixel_values(pre, [wide, tall])
    resized_wide = np.asarray(wide.resize((5, 2), Image.Resampling.BICUBIC))[:, 1:3]
    resized_tall = np.asarray(tall.resize((2, 5), Image.Resampling.BICUBIC))[1:3, :]
    for i, hwc in enumerate([resized_wide, resized_tall]):
        expected = (hwc.transpose(2, 0, 1).astype(np.float32) / 255 - MEAN) / STD
        np.testing.assert_allclose(got[i], expected, rtol=0, atol=1e-6)


def test_preprocess_pads_small_images_and_composites_alpha_on_white():
    # An image smaller than the crop is zero-padded (before normalising), ceil of half the gap on top/left.
    pixel = np.full((1, 1, 3), 255, np.uint8)
    pre = processor({"height": 1, "width": 1}, {"height": 4, "width": 4})
    got = pixel_values(pre, [Image.fromarray(pixel)])[0]
    raw = np.zeros((3, 4, 4), np.float32)
    raw[:, 2, 2] = 1.0
    np.testing.assert_allclose(got, (raw - MEAN) / STD, atol=1e-6)
    # Fully transparent pixels become white, not black.
    clear = Image.fromarray(np.zeros((2, 2, 4), np.uint8), "RGBA")
    got = pixel_values(processor({"shortest_edge": 2}, {"height": 2, "width": 2}), [clear])[0]
    np.testing.assert_allclose(got, np.broadcast_to((1.0 - MEAN) / STD, (3, 2, 2)), atol=1e-6)


def test_pipeline_pixels_and_ids_are_what_clip_processor_gives():
    """The ranker's inputs for a model folder are transformers' CLIPProcessor's, Pillow backend (its
    torchvision backend, the default when torchvision is installed, resizes differently)."""
    from transformers import CLIPProcessor

    from palette.stages.pipeline import default_config_path

    folder = default_config_path().parent / "clip"
    scorer = CLIPScorer.from_pretrained(folder)
    reference = CLIPProcessor.from_pretrained(str(folder), backend="pil")
    images = random_images(6, seed=7) + [random_images(1, seed=8)[0].convert("L"),
                                         Image.fromarray(np.zeros((30, 50, 4), np.uint8), "RGBA")]
    captions = ["a small orange ring at the top on a white background", "a red circle"]
    theirs = reference(images=images, text=captions, padding="max_length", max_length=scorer.tokenizer.max_length,
                       return_tensors="np")
    np.testing.assert_array_equal(scorer.pixels(images), theirs["pixel_values"])
    ours = scorer.tokenizer(captions, pad_to_max_length=True)
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


def test_preprocessor_config_file_and_fallback_to_model_image_size(tmp_path):
    tiny_config_dict = tiny_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict))
    pre = image_processor(tmp_path)
    assert pre.size == {"shortest_edge": 16} and pre.crop_size == {"height": 16, "width": 16}
    assert tuple(pre.image_mean) == OPENAI_CLIP_MEAN and pre.resample == int(Image.Resampling.BICUBIC)
    # The legacy openai/clip-vit-base-patch32 file: ints for size and crop_size.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 20, "do_center_crop": True, "do_normalize": False, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 24,
    }))
    pre = image_processor(tmp_path)
    assert pre.size == {"shortest_edge": 24} and pre.crop_size == {"height": 20, "width": 20}
    assert pre.resample == 2 and not pre.do_normalize
    out = pixel_values(pre, random_images(2))
    assert out.shape == (2, 3, 20, 20) and 0.0 <= out.min() and out.max() <= 1.0
    # A file with a crop size alone: the short side is resized to the crop, as CLIP does.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 12, "width": 12}}))
    pre = image_processor(tmp_path)
    assert pre.size == {"shortest_edge": 12} and pre.crop_size == {"height": 12, "width": 12}


# ---------------------------------------------------------------- model


def test_save_and_load_round_trip(tmp_path):
    model = CLIP.init_random(tiny_config(), seed=3)
    model.save_pretrained(tmp_path)
    loaded = CLIP.from_pretrained(tmp_path)
    assert loaded.config == model.config
    want, got = flatten(jax.device_get(model.params)), flatten(jax.device_get(loaded.params))
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 63, (2, 5)).astype(np.int32)
    ids[:, -1] = 63
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    a = loaded(ids, np.ones_like(ids), pixels)
    assert a["logits_per_image"].shape == (3, 2) and a["logits_per_text"].shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(a["image_embeds"]), axis=-1), 1.0, rtol=1e-5)
    # The written config is one transformers accepts as a CLIPConfig.
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPConfig.from_pretrained(tmp_path)
    assert hf.projection_dim == 8 and hf.vision_config.patch_size == 8 and hf.text_config.max_position_embeddings == 12


def test_unsupported_config_and_bad_tree_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_act 'mish'"):
        tiny_config(hidden_act="mish")
    bad = tiny_config().to_dict()
    bad["vision_config"]["hidden_act"] = "swiglu_9000"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="swiglu_9000"):
        CLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        CLIPConfig.from_dict({"text_config": {"hidden_size": 10, "num_attention_heads": 4}})
    # A checkpoint whose tree does not match its config names the offending leaves.
    model = CLIP.init_random(tiny_config(), seed=0)
    model.save_pretrained(tmp_path / "ok")
    config = tiny_config().to_dict()
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_model/encoder/layers/2"):
        CLIP.from_pretrained(tmp_path / "ok")


def test_gelu_variant_changes_the_activation():
    quick = CLIP.init_random(tiny_config(hidden_act="quick_gelu", layers=1), seed=0)
    exact = CLIP(tiny_config(hidden_act="gelu", layers=1), quick.params)
    pixels = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    a, b = np.asarray(quick.encode_image(pixels)), np.asarray(exact.encode_image(pixels))
    assert np.all(np.isfinite(b)) and not np.allclose(a, b, atol=1e-7)


def test_reference_case_if_present():
    case_dir = reference_dir() / "clip"
    if not (case_dir / "case.json").is_file():
        pytest.skip(f"no clip reference case under {reference_dir()}")
    from reference_checks.clip import CHECKS

    case = load_case(case_dir)
    with np.load(case_dir / "io.npz") as data:
        io = {name: data[name] for name in data.files}
    CHECKS["clip"](case_dir, case, io)


# ---------------------------------------------------------------- tokenizer and scorer


def test_tokenizer_pads_with_eos_and_truncates(tiny_folder):
    tok = CLIPTextTokenizer.from_pretrained(tiny_folder)
    assert tok.max_length == 12
    out = tok(["a cat", "the cat sat on a mat with a hat and a bat"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 12)
    eos = tok.tokenizer.eos_token_id
    assert ids[0, 0] == tok.tokenizer.bos_token_id and ids[0, 3] == eos and mask[0].tolist() == [1] * 4 + [0] * 8
    assert ids[1, -1] == eos and mask[1].all()  # truncated, EOS kept
    assert np.all(ids[0, mask[0] == 0] == eos)


def test_tokenizer_missing_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="tokenizer.json, or vocab.json and merges.txt"):
        CLIPTextTokenizer.from_pretrained(tmp_path)


def test_tokenizer_whose_eos_is_not_the_largest_id_is_refused(tmp_path):
    # CLIP reads a caption at argmax(input_ids): with EOS = 1 it would read the caption's
    # largest-id word and drop every word after it, without an error anywhere.
    write_tiny_tokenizer(tmp_path, specials_first=True)
    with pytest.raises(CheckpointError, match=r"EOS id \(1\) is not its largest id \(55\)"):
        CLIPTextTokenizer.from_pretrained(tmp_path)


def test_scorer_scores_are_finite_and_independent_of_batching(tiny_folder):
    images = random_images(5)
    scorer = CLIPScorer.from_pretrained(tiny_folder, buckets=(1, 2, 4, 8))
    scores = scorer.score("a cat", images)
    assert scores.shape == (5,) and scores.dtype == np.float32 and np.all(np.isfinite(scores))
    assert len(np.unique(scores)) == 5
    single = CLIPScorer(scorer.model, scorer.image_processor, scorer.tokenizer, buckets=(1,)).score("a cat", images)
    chunks = CLIPScorer(scorer.model, scorer.image_processor, scorer.tokenizer, buckets=(2,)).score("a cat", images)
    np.testing.assert_allclose(single, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunks, scores, rtol=1e-5, atol=1e-5)
    # ... and they are the model's logits_per_image[:, 0] for the unpadded prompt.
    text = scorer.tokenizer(["a cat"])
    out = scorer.model(text["input_ids"], text["attention_mask"], scorer.pixels(images))
    np.testing.assert_allclose(scores, np.asarray(out["logits_per_image"])[:, 0], rtol=1e-5, atol=1e-5)
    assert scorer.score("a cat", []).shape == (0,)
