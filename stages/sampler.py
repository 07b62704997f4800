"""Autoregressive image-token sampling for DalleBart, as a continuous-batching engine.

The engine owns `num_slots` rows of decode state on the device mesh. A request
is *admitted* into free slots (its prompt is encoded once and its
cross-attention keys/values are stored), then every `step()` advances all
occupied slots by `chunk_steps` tokens in one jit-compiled loop, and finished
or cancelled slots are *released* so the next request can take them at once.

Per slot, each step:
  * the conditional and the unconditional (empty prompt) rows run in the same
    batched forward (rows 2i and 2i+1, so a slot's pair never straddles devices);
  * super conditioning: logits = uncond + condition_scale · (cond − uncond);
  * temperature, top-k (0 = the original's default, 50) and top-p filtering,
    then a categorical draw keyed by fold_in(PRNGKey(seed), position), so a
    row's tokens depend only on its own seed and prompt, never on its neighbours;
  * the original's stopping rule: a row that emits EOS is finished, and the
    rest of its sequence is pad (no min-length masking).

Sampling settings are traced per-row values: the loop compiles once per
`num_slots`, never per top_k / top_p / temperature / scale / seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .devices import DeviceState, pad_rows
from .models import dallebart as db

DEFAULT_TOP_K = 50  # what the original's generation config falls back to when top_k is unset
DEFAULT_MAX_TOP_K = 256  # largest top_k a request may ask for (min-dalle's default top_k)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    seed: int
    top_k: int = 0  # 0 = DEFAULT_TOP_K
    top_p: float = 1.0  # (0, 1]
    temperature: float = 1.0  # > 0
    condition_scale: float = 10.0

    def problems(self, max_top_k: int = DEFAULT_MAX_TOP_K) -> list[str]:
        """Everything wrong with these settings, each a message that names the field, the allowed
        range and the value. The one place sampling settings are checked."""
        found = []
        if not 0 <= self.seed < 2**32:
            found.append(f"seed must be 0..{2**32 - 1}, got {self.seed}")
        if not 0 <= self.top_k <= max_top_k:
            found.append(f"top_k must be 0..{max_top_k} (0 = the model default), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            found.append(f"top_p must be in (0, 1], got {self.top_p:.9g}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            found.append(f"temperature must be a finite number > 0, got {self.temperature:.9g}")
        if not math.isfinite(self.condition_scale):
            found.append(f"condition_scale must be a finite number, got {self.condition_scale:.9g}")
        return found

    def validate(self, max_top_k: int = DEFAULT_MAX_TOP_K) -> None:
        """ValueError listing every problem (see `problems`)."""
        found = self.problems(max_top_k)
        if found:
            raise ValueError("; ".join(found))


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """One prompt ready for the sampler: its tokens and the empty prompt's, each [max_text_length]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    input_ids_uncond: np.ndarray
    attention_mask_uncond: np.ndarray


@dataclasses.dataclass
class SlotProgress:
    slot: int
    tokens: np.ndarray  # int32 [image_length]; valid up to steps_done, pad after
    steps_done: int
    finished: bool


def _rows(x: jax.Array) -> jax.Array:
    """[S, ...] -> [2S, ...] with each slot's value on its cond and uncond rows."""
    return jnp.repeat(x, 2, axis=0)


def filter_and_sample(logits, key, top_k, top_p, temperature, max_top_k: int):
    """One row: temperature, top-k, top-p (nucleus, keeping the token that crosses p), then a draw.

    Candidates come from lax.top_k with a static `max_top_k`: a full sort of a 16k
    vocabulary per row per step costs more than the rest of a small model's step.
    """
    values, ids = jax.lax.top_k(logits / temperature, max_top_k)  # descending; ties keep the lower id first
    rank = jnp.arange(max_top_k)
    keep = rank < top_k
    probs = jax.nn.softmax(jnp.where(keep, values, -jnp.inf))
    mass_before = jnp.cumsum(probs) - probs
    keep &= (mass_before < top_p) | (top_p >= 1.0)
    keep |= rank == 0
    choice = jax.random.categorical(key, jnp.where(keep, values, -jnp.inf))
    return ids[choice]


class SamplerEngine:
    """Decode state for `num_slots` images on the mesh; one thread drives it (admit / step / release)."""

    def __init__(self, model: db.DalleBart, devices: DeviceState | None = None, num_slots: int = 8,
                 chunk_steps: int = 16, max_top_k: int = DEFAULT_MAX_TOP_K, params: Any = None,
                 default_top_k: int = DEFAULT_TOP_K):
        self.model = model
        self.config = model.config
        self.devices = devices or DeviceState.create()
        self.num_slots = self.devices.round_batch(max(1, num_slots))
        self.image_length = self.config.image_length
        self.chunk_steps = max(1, min(chunk_steps, self.image_length))
        self.max_top_k = max(1, min(max_top_k, self.config.logits_size))
        # What a request's top_k = 0 means for this model: a small codebook wants fewer candidates.
        self.default_top_k = max(1, min(int(default_top_k), self.max_top_k))
        self.params = params if params is not None else self.devices.place_params(model.params)
        self._occupied = np.zeros(self.num_slots, bool)
        # Host copy of state["position"], refreshed by the read every step already does, so bounding
        # the next chunk's context costs no extra device round trip.
        self._positions = np.zeros(self.num_slots, np.int32)
        self.state = self._initial_state()
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)
        self._admit = jax.jit(self._admit_fn, donate_argnums=0, out_shardings=shardings)
        self._chunk = jax.jit(self._chunk_fn, static_argnums=(2, 3), donate_argnums=0, out_shardings=shardings)
        # A fixed-shape mask keeps release to one compilation and the state's placement unchanged.
        self._release = jax.jit(lambda state, mask: dict(state, done=state["done"] | mask), donate_argnums=0,
                                out_shardings=shardings)

    # -- state ------------------------------------------------------------------------------

    def _initial_state(self) -> dict[str, Any]:
        c, s = self.config, self.num_slots
        heads = c.decoder_attention_heads
        head_dim = c.d_model // heads
        dtype = self.model.dtype
        cache = lambda length: [jnp.zeros((2 * s, heads, length, head_dim), dtype)  # noqa: E731
                                for _ in range(c.decoder_layers)]
        state = {
            "self_k": cache(c.image_length), "self_v": cache(c.image_length),
            "cross_k": cache(c.max_text_length), "cross_v": cache(c.max_text_length),
            "cross_mask": jnp.zeros((2 * s, c.max_text_length), bool),
            "tokens": jnp.full((s, c.image_length), c.pad_token_id, jnp.int32),
            "position": jnp.zeros((s,), jnp.int32),
            "prev": jnp.full((s,), c.decoder_start_token_id, jnp.int32),
            "done": jnp.ones((s,), bool),
            "key": jnp.zeros((s, 2), jnp.uint32),
            "top_k": jnp.full((s,), self.default_top_k, jnp.int32),
            "top_p": jnp.ones((s,), jnp.float32),
            "temperature": jnp.ones((s,), jnp.float32),
            "scale": jnp.ones((s,), jnp.float32),
        }
        return self.devices.place_batch(state)

    # -- jitted pieces ------------------------------------------------------------------------

    def _admit_fn(self, state, params, slots, ids, mask, uids, umask, seeds, top_k, top_p, temperature, scale):
        """Encode n new prompts (cond and uncond interleaved) and write them into `slots` (-1 = unused row)."""
        c = self.config
        n = ids.shape[0]
        both_ids = jnp.stack([ids, uids], axis=1).reshape(2 * n, -1)
        both_mask = jnp.stack([mask, umask], axis=1).reshape(2 * n, -1)
        enc = db.encode(params, both_ids, both_mask, c)
        kv = db.cross_attention_kv(params, enc, c)
        slot_idx = jnp.where(slots >= 0, slots, self.num_slots)  # out of range -> dropped by the scatters
        row_idx = jnp.stack([2 * slot_idx, 2 * slot_idx + 1], axis=1).reshape(-1)
        new = dict(state)
        new["cross_k"] = [old.at[row_idx].set(k.astype(old.dtype), mode="drop") for old, (k, _) in zip(state["cross_k"], kv)]
        new["cross_v"] = [old.at[row_idx].set(v.astype(old.dtype), mode="drop") for old, (_, v) in zip(state["cross_v"], kv)]
        new["cross_mask"] = state["cross_mask"].at[row_idx].set(both_mask.astype(bool), mode="drop")
        put = lambda name, value: state[name].at[slot_idx].set(value, mode="drop")  # noqa: E731
        new["tokens"] = put("tokens", jnp.full((n, c.image_length), c.pad_token_id, jnp.int32))
        new["position"] = put("position", jnp.zeros((n,), jnp.int32))
        new["prev"] = put("prev", jnp.full((n,), c.decoder_start_token_id, jnp.int32))
        new["done"] = put("done", jnp.zeros((n,), bool))
        new["key"] = put("key", jax.vmap(jax.random.PRNGKey)(seeds))
        new["top_k"] = put("top_k", jnp.where(top_k > 0, top_k, self.default_top_k))
        new["top_p"] = put("top_p", top_p)
        new["temperature"] = put("temperature", temperature)
        new["scale"] = put("scale", scale)
        return new

    def _decode_step(self, state, params, context: int):
        """One token for every slot. Self-attention reads only the first `context` cached
        positions (a static bound on every row's position during this chunk): the cache
        is the largest thing read per step after the weights."""
        c = self.config
        position = state["position"]
        row_pos = _rows(jnp.minimum(position, c.image_length - 1))
        h = db.embed(_rows(state["prev"])[:, None], row_pos[:, None], params["model"]["decoder"], c)
        self_allowed = (jnp.arange(context)[None, :] <= row_pos[:, None])[:, None, None, :]
        cross_allowed = state["cross_mask"][:, None, None, :]
        write = jax.vmap(lambda cache, x, t: jax.lax.dynamic_update_slice_in_dim(cache, x, t, axis=1))
        new_k, new_v = [], []
        for p, ck, cv, sk, sv in zip(db.decoder_layers(params, c), state["cross_k"], state["cross_v"],
                                     state["self_k"], state["self_v"]):
            def self_kv(k, v, sk=sk, sv=sv):
                k_all, v_all = write(sk, k, row_pos), write(sv, v, row_pos)
                return k_all[:, :, :context], v_all[:, :, :context], (k_all, v_all)

            h, (k_all, v_all) = db.decoder_layer(h, self_kv, self_allowed, (ck, cv), cross_allowed, p, c)
            new_k.append(k_all)
            new_v.append(v_all)
        logits = db.lm_logits(params, h[:, 0], c).reshape(self.num_slots, 2, -1)
        cond, uncond = logits[:, 0], logits[:, 1]
        scale = state["scale"][:, None]
        # With scale 1 the original ignores the unconditional row entirely; keep that bit-exact.
        logits = jnp.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
        keys = jax.vmap(jax.random.fold_in)(state["key"], position)
        sample = functools.partial(filter_and_sample, max_top_k=self.max_top_k)
        nxt = jax.vmap(sample)(logits, keys, state["top_k"], state["top_p"], state["temperature"])

        active = ~state["done"]
        emitted_eos = active & (nxt == c.eos_token_id)
        nxt = jnp.where(emitted_eos, c.pad_token_id, nxt).astype(jnp.int32)
        slot = jnp.arange(self.num_slots)
        tokens = state["tokens"].at[slot, jnp.minimum(position, c.image_length - 1)].set(
            jnp.where(active, nxt, state["tokens"][slot, jnp.minimum(position, c.image_length - 1)]))
        position = position + active.astype(jnp.int32)
        new = dict(state, self_k=new_k, self_v=new_v, tokens=tokens, position=position,
                   prev=jnp.where(active, nxt, state["prev"]),
                   done=state["done"] | emitted_eos | (position >= c.image_length))
        return new

    def _chunk_fn(self, state, params, steps: int, context: int):
        return jax.lax.fori_loop(0, steps, lambda _, s: self._decode_step(s, params, context), state)

    def _context_bound(self, steps: int) -> int:
        """Cached positions the next `steps` steps can read, rounded up to a quarter of the image
        length so the loop compiles for at most four context sizes."""
        position = self._positions[self._occupied]
        needed = int(position.max()) + steps if position.size else self.image_length
        quarter = -(-self.image_length // 4)
        return min(self.image_length, -(-needed // quarter) * quarter)

    # -- the driver's API ---------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._occupied)]

    def occupied_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self._occupied)]

    def admit(self, slots: Sequence[int], prompts: Sequence[PromptTokens], params: Sequence[SamplingParams]) -> None:
        """Start decoding `prompts[i]` with `params[i]` in `slots[i]` (which must be free)."""
        if not (len(slots) == len(prompts) == len(params)):
            raise ValueError("slots, prompts and params must have the same length")
        if not slots:
            return
        for s in slots:
            if self._occupied[s]:
                raise ValueError(f"slot {s} is occupied")
        for p in params:
            p.validate(self.max_top_k)
        # Admissions are padded to a power of two so the encoder compiles for a few sizes only; the
        # padded rows repeat the first admission and write to no slot (-1).
        n = 1 << (len(slots) - 1).bit_length()
        stack = lambda name, dtype: pad_rows(  # noqa: E731
            np.stack([np.asarray(getattr(p, name), dtype) for p in prompts]), n, fill=None)
        column = lambda values, dtype: pad_rows(np.asarray(values, dtype), n, fill=None)  # noqa: E731
        self.state = self._admit(
            self.state, self.params,
            pad_rows(np.asarray(slots, np.int32), n, fill=-1),
            stack("input_ids", np.int32), stack("attention_mask", np.int32),
            stack("input_ids_uncond", np.int32), stack("attention_mask_uncond", np.int32),
            column([p.seed for p in params], np.uint32),
            column([p.top_k for p in params], np.int32),
            column([p.top_p for p in params], np.float32),
            column([p.temperature for p in params], np.float32),
            column([p.condition_scale for p in params], np.float32),
        )
        self._occupied[list(slots)] = True
        self._positions[list(slots)] = 0

    def step(self, steps: int | None = None) -> list[SlotProgress]:
        """Advance every occupied slot by `steps` (default chunk_steps) tokens; report the occupied slots."""
        if not self._occupied.any():
            return []
        steps = steps or self.chunk_steps
        self.state = self._chunk(self.state, self.params, steps, self._context_bound(steps))
        tokens, position, done = jax.device_get((self.state["tokens"], self.state["position"], self.state["done"]))
        self._positions = np.array(position, np.int32)
        return [SlotProgress(slot=s, tokens=tokens[s], steps_done=int(position[s]), finished=bool(done[s]))
                for s in self.occupied_slots()]

    def release(self, slots: Sequence[int]) -> None:
        """Free slots (finished or cancelled); a freed slot stops counting at the next step."""
        if not len(slots):
            return
        self._occupied[list(slots)] = False
        # Unoccupied rows still flow through the batched forward, but as `done` rows they
        # never write tokens; a cancelled row must stop at once.
        mask = np.zeros(self.num_slots, bool)
        mask[list(slots)] = True
        self.state = self._release(self.state, mask)

    def warmup(self, prompt: PromptTokens) -> np.ndarray:
        """Compile what a continuous-batching driver will ask for, before the first request: every
        admission size, whole runs, a step after an admit, after a step and after a release, and
        every release count. Returns a finished row's tokens (for warming the decoder)."""
        params = lambda n: [SamplingParams(seed=i + 1) for i in range(n)]  # noqa: E731
        final = None
        for n in sorted({min(1 << i, self.num_slots) for i in range(self.num_slots.bit_length() + 1)}):
            slots = self.free_slots()[:n]
            self.admit(slots, [prompt] * n, params(n))
            progress = self.step()
            while not all(p.finished for p in progress):
                progress = self.step()
            final = progress[0].tokens
            self.release(slots)
        self.admit([0], [prompt], params(1))
        self.step()
        if self.num_slots > 1:
            self.admit([1], [prompt], params(1))
            self.step()
            self.release([0])
            self.step()
            self.release([1])
        else:
            self.release([0])
        for count in range(1, self.num_slots + 1):
            self.release(list(range(count)))
        self.admit([0], [prompt], params(1))
        self.step()
        self.release([0])
        return final

    def run(self, prompts: Sequence[PromptTokens], params: Sequence[SamplingParams]) -> Iterator[list[SlotProgress]]:
        """Admit everything that fits, step until all are finished, yielding progress after each chunk."""
        if len(prompts) > self.num_slots:
            raise ValueError(f"{len(prompts)} prompts do not fit {self.num_slots} slots")
        slots = self.free_slots()[: len(prompts)]
        self.admit(slots, prompts, params)
        try:
            while True:
                progress = [p for p in self.step() if p.slot in slots]
                yield progress
                if all(p.finished for p in progress):
                    return
        finally:
            self.release(slots)


def generate(model: db.DalleBart, input_ids, attention_mask, input_ids_uncond, attention_mask_uncond,
             params: Sequence[SamplingParams], devices: DeviceState | None = None,
             chunk_steps: int | None = None) -> np.ndarray:
    """Sample a batch like the original `DalleBart.generate`: [B, image_length + 1], column 0 = decoder start."""
    rows = len(params)
    prompts = [PromptTokens(np.asarray(input_ids[i]), np.asarray(attention_mask[i]),
                            np.asarray(input_ids_uncond[i]), np.asarray(attention_mask_uncond[i])) for i in range(rows)]
    engine = SamplerEngine(model, devices, num_slots=rows, chunk_steps=chunk_steps or model.config.image_length)
    final: dict[int, np.ndarray] = {}
    for progress in engine.run(prompts, params):
        for p in progress:
            final[p.slot] = p.tokens
    slots = sorted(final)[:rows]
    start = np.full((rows, 1), model.config.decoder_start_token_id, np.int32)
    return np.concatenate([start, np.stack([final[s] for s in slots])], axis=1)
