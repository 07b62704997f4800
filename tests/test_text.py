"""Behaviour of palette.stages.text beyond the reference cases: fallbacks, truncation, batching."""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest

from palette.stages.text import WORD_FREQUENCY_FILENAME, DalleBartTextProcessor, TextNormalizer


@pytest.fixture(scope="module")
def tokenize_case(reference_root):
    case_dir = reference_root / "tokenize"
    if not (case_dir / "checkpoint").is_dir():
        pytest.skip(f"{case_dir} has no checkpoint/")
    return case_dir


@pytest.fixture(scope="module")
def processor(tokenize_case):
    return DalleBartTextProcessor.from_pretrained(
        tokenize_case / "checkpoint", word_frequency_file=tokenize_case / WORD_FREQUENCY_FILENAME)


@pytest.fixture
def model_dir(tokenize_case, tmp_path):
    """A writable copy of the tiny checkpoint (tokenizer files and config.json, no word list)."""
    return shutil.copytree(tokenize_case / "checkpoint", tmp_path / "model")


@pytest.mark.parametrize("word_file", [None, "does-not-exist.txt"])
def test_without_word_list_hashtags_are_kept_whole_and_a_warning_is_logged(word_file, tmp_path, caplog):
    path = None if word_file is None else tmp_path / word_file
    with caplog.at_level(logging.WARNING, logger="palette.stages.text"):
        normalizer = TextNormalizer(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "hashtags" in warnings[0].getMessage()
    assert normalizer("I love #DeepLearning and #throwback_thursday!") == " i love deeplearning and throwback thursday"
    assert normalizer("A café, 50% off") == " a cafe, 50 % off"


def test_word_list_splits_hashtags(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("the 900\nover 800\nsunset 700\nlake 600\n", encoding="utf8")
    assert TextNormalizer(words)("#SunsetOverTheLake") == " sunset over the lake"


def test_person_draws_come_from_the_given_rng():
    normalizer = TextNormalizer(None, rng=random.Random(7))
    first = [normalizer("<person> with <person>") for _ in range(5)]
    normalizer = TextNormalizer(None, rng=random.Random(7))
    assert [normalizer("<person> with <person>") for _ in range(5)] == first
    assert normalizer("<person> and <person>") == " people"


def test_from_pretrained_finds_the_word_list_in_the_model_folder(model_dir, tokenize_case, caplog):
    with caplog.at_level(logging.WARNING, logger="palette.stages.text"):
        without = DalleBartTextProcessor.from_pretrained(model_dir)
    assert any("hashtags" in r.getMessage() for r in caplog.records)
    assert without.normalize("#SunsetOverTheLake") == " sunsetoverthelake"

    shutil.copy(tokenize_case / WORD_FREQUENCY_FILENAME, model_dir / WORD_FREQUENCY_FILENAME)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palette.stages.text"):
        found = DalleBartTextProcessor.from_pretrained(model_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert found.normalize("#SunsetOverTheLake") == " sunset over the lake"


def test_batch_shapes_dtypes_and_unconditional_rows(processor):
    prompts = ["a cat", "", "sunset over a lake", "#nofilter"]
    out = processor(prompts)
    assert set(out) == {"input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond"}
    length = processor.max_text_length
    for name, array in out.items():
        assert array.dtype == np.int32, name
        assert array.shape == (len(prompts), length), name
    uncond = [0, 2] + [1] * (length - 2)
    assert out["input_ids_uncond"].tolist() == [uncond] * len(prompts)
    assert out["attention_mask_uncond"].tolist() == [[1, 1] + [0] * (length - 2)] * len(prompts)
    # The empty *prompt* is normalised to " " first, so it is not the unconditional row.
    assert out["input_ids"][1, :3].tolist() == [0, processor.tokenizer.convert_tokens_to_ids("Ġ"), 2]
    # Right padding: the mask is 1 then 0, and padded positions hold <pad>.
    for ids, mask in zip(out["input_ids"], out["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert ids[0] == 0 and ids[n - 1] == 2 and (ids[n:] == 1).all()


def test_token_count_and_truncation(processor):
    short, long = "sunset over a lake", "a very long prompt " * 10
    out = processor([short, long])
    assert processor.token_count(short) == int(out["attention_mask"][0].sum()) < processor.max_text_length
    assert processor.token_count(long) > processor.max_text_length
    assert out["attention_mask"][1].all()
    assert out["input_ids"][1, -1] == 2  # </s> stays last after truncation


def test_normalize_text_false_passes_prompts_through(model_dir):
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["normalize_text"] = False
    config_path.write_text(json.dumps(config))
    processor = DalleBartTextProcessor.from_pretrained(model_dir)
    assert processor.normalize("#Hello World!") == "#Hello World!"
    assert processor(["#Hello World!"])["input_ids"].shape == (1, config["max_text_length"])


def test_bad_inputs_are_rejected_with_a_reason(processor, tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        processor("one prompt")
    with pytest.raises(ValueError, match="at least one"):
        processor([])
    with pytest.raises(FileNotFoundError, match="config.json"):
        DalleBartTextProcessor.from_pretrained(tmp_path)
