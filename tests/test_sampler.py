"""DalleBart loading and the sampler engine, on tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from palette.stages.checkpoint import CheckpointError
from palette.stages.models.dallebart import DalleBart, DalleBartConfig, UnsupportedConfigError
from palette.stages.sampler import PromptTokens, SamplerEngine, SamplingParams, generate

TINY = dict(encoder_vocab_size=50, image_vocab_size=32, image_length=16, max_text_length=8, d_model=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=48, decoder_ffn_dim=48, decoder_start_token_id=32, bos_token_id=33,
            eos_token_id=33, pad_token_id=33, init_std=0.3)


@pytest.fixture(scope="module")
def model() -> DalleBart:
    return DalleBart.init_random(DalleBartConfig(**TINY), seed=1)


def prompt(i: int) -> PromptTokens:
    ids = np.array([0, 5 + i, 7 + 2 * i, 2, 1, 1, 1, 1], np.int32)
    mask = (np.arange(8) < 4).astype(np.int32)
    return PromptTokens(ids, mask, np.array([0, 2, 1, 1, 1, 1, 1, 1], np.int32),
                        np.array([1, 1, 0, 0, 0, 0, 0, 0], np.int32))


def sample(engine: SamplerEngine, prompts, params) -> list[np.ndarray]:
    final = {}
    for progress in engine.run(prompts, params):
        final.update({p.slot: p.tokens.copy() for p in progress})
    return [final[s] for s in sorted(final)]


def test_rows_depend_only_on_their_own_seed_and_prompt(model):
    alone = sample(SamplerEngine(model, num_slots=1), [prompt(0)], [SamplingParams(seed=42)])[0]
    crowd = sample(SamplerEngine(model, num_slots=4), [prompt(3), prompt(0), prompt(1), prompt(2)],
                   [SamplingParams(seed=7), SamplingParams(seed=42), SamplingParams(seed=8, top_k=3),
                    SamplingParams(seed=9, temperature=0.5)])
    np.testing.assert_array_equal(crowd[1], alone)
    other_seed = sample(SamplerEngine(model, num_slots=1), [prompt(0)], [SamplingParams(seed=43)])[0]
    assert not np.array_equal(other_seed, alone), "a different seed should give a different image"


def test_chunking_does_not_change_tokens(model):
    params = [SamplingParams(seed=s, top_p=0.9) for s in range(2)]
    whole = sample(SamplerEngine(model, num_slots=2, chunk_steps=16), [prompt(0), prompt(1)], params)
    chunked = sample(SamplerEngine(model, num_slots=2, chunk_steps=3), [prompt(0), prompt(1)], params)
    np.testing.assert_array_equal(np.stack(whole), np.stack(chunked))


def test_progress_streams_partial_grids(model):
    engine = SamplerEngine(model, num_slots=1, chunk_steps=5)
    seen = [p[0].steps_done for p in engine.run([prompt(0)], [SamplingParams(seed=1)])]
    assert seen == [5, 10, 15, 16]


def test_greedy_matches_argmax_of_the_teacher_forced_forward(model):
    """top_k=1 is argmax; re-scoring the sampled sequence with the full forward gives the same choices."""
    p = prompt(2)
    seq = generate(model, p.input_ids[None], p.attention_mask[None], p.input_ids_uncond[None],
                   p.attention_mask_uncond[None], [SamplingParams(seed=0, top_k=1, condition_scale=1.0)])
    logits, _ = model(p.input_ids[None], p.attention_mask[None], seq[:, :-1])
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1)[0], seq[0, 1:])


def test_super_conditioning_uses_the_unconditional_row(model):
    p = prompt(1)
    args = (p.input_ids[None], p.attention_mask[None], p.input_ids_uncond[None], p.attention_mask_uncond[None])
    s1 = generate(model, *args, [SamplingParams(seed=0, top_k=1, condition_scale=1.0)])
    s10 = generate(model, *args, [SamplingParams(seed=0, top_k=1, condition_scale=10.0)])
    assert not np.array_equal(s1, s10)
    # And the combination is exactly uncond + scale * (cond - uncond) on the first step.
    start = np.full((1, 1), model.config.decoder_start_token_id, np.int32)
    lc, _ = model(p.input_ids[None], p.attention_mask[None], start)
    lu, _ = model(p.input_ids_uncond[None], p.attention_mask_uncond[None], start)
    expected = np.asarray(lu + 10.0 * (lc - lu))[0, 0].argmax()
    assert s10[0, 1] == expected


def test_top_k_limits_the_choices(model):
    p = prompt(0)
    start = np.full((1, 1), model.config.decoder_start_token_id, np.int32)
    logits, _ = model(p.input_ids[None], p.attention_mask[None], start)
    top3 = set(np.argsort(-np.asarray(logits)[0, 0])[:3])
    engine = SamplerEngine(model, num_slots=1)  # one engine: compiled once, reused for every seed
    firsts = {int(sample(engine, [p], [SamplingParams(seed=s, top_k=3, condition_scale=1.0)])[0][0])
              for s in range(12)}
    assert firsts <= top3 and len(firsts) > 1


def test_a_model_default_top_k_applies_when_the_request_leaves_it_unset(model):
    # pipeline.toml's default_top_k: top_k = 0 in a request means this model's default.
    params = [SamplingParams(seed=s, condition_scale=1.0) for s in range(3)]
    greedy_default = sample(SamplerEngine(model, num_slots=3, default_top_k=1), [prompt(0)] * 3, params)
    greedy_asked = sample(SamplerEngine(model, num_slots=3), [prompt(0)] * 3,
                          [SamplingParams(seed=s, top_k=1, condition_scale=1.0) for s in range(3)])
    for a, b in zip(greedy_default, greedy_asked):
        np.testing.assert_array_equal(a, b)
    sampled = sample(SamplerEngine(model, num_slots=3), [prompt(0)] * 3, params)
    assert any(not np.array_equal(a, b) for a, b in zip(sampled, greedy_asked))


def test_released_slots_are_reused_by_new_requests(model):
    engine = SamplerEngine(model, num_slots=2, chunk_steps=4)
    engine.admit([0, 1], [prompt(0), prompt(1)], [SamplingParams(seed=1), SamplingParams(seed=2)])
    engine.step()
    engine.release([1])  # cancelled after 4 tokens
    assert engine.free_slots() == [1]
    engine.admit([1], [prompt(0)], [SamplingParams(seed=1)])  # same request as slot 0, four steps behind
    finals = {}
    while len(finals) < 2:
        for p in engine.step():
            if p.finished:
                finals[p.slot] = p.tokens.copy()
                engine.release([p.slot])
    np.testing.assert_array_equal(finals[0], finals[1])


def test_bad_sampling_settings_are_refused(model):
    engine = SamplerEngine(model, num_slots=1)
    for bad, message in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
                         (dict(top_k=-2), "top_k"), (dict(seed=2**32), "seed")]:
        with pytest.raises(ValueError, match=message):
            engine.admit([0], [prompt(0)], [SamplingParams(**{"seed": 0, **bad})])
    assert engine.free_slots() == [0]


def test_eos_stops_a_row_and_pads_the_rest():
    """With EOS inside the logits and a huge bias towards it, rows stop at once and are padded."""
    config = DalleBartConfig(**{**TINY, "image_vocab_size": 40})  # ids 0..40: EOS 33 is a real output
    model = DalleBart.init_random(config, seed=3)
    # LayerNorm output has zero mean, so a constant kernel column sees only the final norm's bias.
    model.params["model"]["decoder"]["final_ln"]["bias"] = jnp.ones((32,))
    model.params["lm_head"]["kernel"] = model.params["lm_head"]["kernel"].at[:, 33].set(10.0)
    out = sample(SamplerEngine(model, num_slots=1), [prompt(0)], [SamplingParams(seed=0, top_k=1)])[0]
    assert (out == config.pad_token_id).all()


@pytest.mark.parametrize("use_scan", [True, False])
def test_save_and_load_round_trip_in_both_layouts(tmp_path, model, use_scan):
    config = DalleBartConfig(**{**TINY, "use_scan": use_scan})
    original = DalleBart(config, model.params)
    original.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["use_scan"] is use_scan
    loaded = DalleBart.from_pretrained(tmp_path)
    p = prompt(0)
    dec = np.arange(16, dtype=np.int32)[None] % 32
    np.testing.assert_array_equal(np.asarray(original(p.input_ids[None], p.attention_mask[None], dec)[0]),
                                  np.asarray(loaded(p.input_ids[None], p.attention_mask[None], dec)[0]))


def test_bf16_weights_sample_valid_tokens(tmp_path, model):
    model.save_pretrained(tmp_path)
    bf16 = DalleBart.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    out = sample(SamplerEngine(bf16, num_slots=1), [prompt(0)], [SamplingParams(seed=0)])[0]
    assert out.shape == (16,) and (out <= 32).all()


@pytest.mark.parametrize("flag,value", [("use_alibi", True), ("use_swin_position_embeddings", True),
                                        ("use_cosine_attention", True), ("sinkhorn_iters", 3),
                                        ("ln_positions", "swinv2"), ("use_head_scale", True)])
def test_unsupported_flags_are_refused_by_name(tmp_path, model, flag, value):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw[flag] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConfigError, match=flag):
        DalleBart.from_pretrained(tmp_path)


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, model):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="do not match the config"):
        DalleBart.from_pretrained(tmp_path)


def test_missing_local_folder_and_unreachable_hub_id_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        DalleBart.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(CheckpointError, match="dalle-mini/dalle-mega.*not in the local cache"):
        DalleBart.from_pretrained("dalle-mini/dalle-mega")


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_sampler import TINY, prompt
    from palette.stages.devices import DeviceState
    from palette.stages.models.dallebart import DalleBart, DalleBartConfig
    from palette.stages.sampler import SamplerEngine, SamplingParams
    model = DalleBart.init_random(DalleBartConfig(**TINY), seed=1)
    devices = DeviceState.create(model_parallel={mp})
    engine = SamplerEngine(model, devices, num_slots=4, chunk_steps=8)
    final = {{}}
    for progress in engine.run([prompt(i) for i in range(4)], [SamplingParams(seed=100 + i) for i in range(4)]):
        final.update({{p.slot: p.tokens.tolist() for p in progress}})
    shard_devices = len(engine.state["self_k"][0].sharding.device_set)
    print(json.dumps({{"devices": len(jax.devices()), "shard_devices": shard_devices,
                      "tokens": [final[s] for s in sorted(final)]}}))
""")


def run_on_cpu_devices(count: int, model_parallel: int = 1) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    script = MULTI_DEVICE_SCRIPT.format(tests=os.path.dirname(__file__), mp=model_parallel)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_seeds_give_the_same_tokens_on_one_and_two_devices():
    one = run_on_cpu_devices(1)
    two = run_on_cpu_devices(2)
    assert two["devices"] == 2 and two["shard_devices"] == 2, "the decode state should be split over both devices"
    assert one["tokens"] == two["tokens"]
    sharded_weights = run_on_cpu_devices(2, model_parallel=2)
    assert sharded_weights["tokens"] == one["tokens"]


@pytest.mark.parametrize("variant", [
    dict(force_ln_scale=True),
    dict(tie_word_embeddings=True),
    dict(use_final_ln_encoder=False, use_final_ln_decoder=False),
    dict(use_glu=False, use_bias=True),  # normformer FFN with an inner norm
    dict(ln_positions="preln", use_glu=False, use_bias=True, use_scan=False),
    dict(scale_embedding=True),
])
def test_config_variants_load_and_agree_with_sampling(tmp_path, variant):
    """Every supported flag builds the matching tree, survives save/load, and greedy sampling
    reproduces the argmax of the teacher-forced forward."""
    model = DalleBart.init_random(DalleBartConfig(**{**TINY, **variant}), seed=5)
    model.save_pretrained(tmp_path)
    loaded = DalleBart.from_pretrained(tmp_path)
    assert ("lm_head" in loaded.params) is not variant.get("tie_word_embeddings", False)
    p = prompt(1)
    seq = generate(loaded, p.input_ids[None], p.attention_mask[None], p.input_ids_uncond[None],
                   p.attention_mask_uncond[None], [SamplingParams(seed=0, top_k=1, condition_scale=1.0)])
    logits, _ = loaded(p.input_ids[None], p.attention_mask[None], seq[:, :-1])
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1)[0], seq[0, 1:])
