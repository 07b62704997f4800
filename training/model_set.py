"""The model set Palette ships as its default: sizes, tokenizers and the pipeline config.

One folder per network, each in the released format, plus `pipeline.toml`:

    models/default/
      pipeline.toml
      dallebart/   config.json flax_model.msgpack + BART tokenizer files
      vqgan/       config.json flax_model.msgpack
      clip/        config.json flax_model.msgpack + CLIP tokenizer files + preprocessor_config.json

The sizes are chosen for a 2-core CPU: 64×64 images from a 16×16 grid of codes (VQGAN f4).
At f4 a code is a 4×4 patch: flat colour or a simple edge between two colours, which
composes into any shape in any colour (an f8 code would hold a colour-specific piece of a
shape, and a held-out colour × shape pair would have no codes to draw it with).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from palette.stages.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from palette.stages.models.dallebart import DalleBartConfig
from palette.stages.models.vqgan import VQGANConfig
from palette.stages.text import WORD_FREQUENCY_FILENAME

from .tokenizers import train_bart_tokenizer, train_clip_tokenizer

IMAGE_SIZE = 64
GRID = 16  # VQGAN f4: 64×64 image <-> 16×16 codes
TEXT_VOCAB = 512
MAX_TEXT_LENGTH = 32


def vqgan_config(n_embed: int, embed_dim: int) -> VQGANConfig:
    # ch=64 at full resolution: GroupNorm has 32 groups, and with 32 channels each group is one
    # channel, which normalises away every channel's flat value -- the decoder could then not
    # paint flat backgrounds. No attention in the levels (the mid block attends globally, which is
    # how the encoder finds the colour of the object a background patch is nearest).
    # num_res_blocks=0 keeps the encoder to its downsampling convs.
    return VQGANConfig(ch=64, ch_mult=(1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                       resolution=IMAGE_SIZE, z_channels=64, embed_dim=embed_dim, n_embed=n_embed)


def dallebart_config(encoder_vocab_size: int, image_vocab_size: int) -> DalleBartConfig:
    v = image_vocab_size
    return DalleBartConfig(
        encoder_vocab_size=encoder_vocab_size, image_vocab_size=v, image_length=GRID * GRID,
        max_text_length=MAX_TEXT_LENGTH, d_model=128, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        ln_positions="normformer", use_glu=True, use_bias=False, use_scan=True,
        decoder_start_token_id=v, bos_token_id=v + 1, eos_token_id=v + 1, pad_token_id=v + 1,
    )


def clip_config(vocab_size: int) -> CLIPConfig:
    return CLIPConfig(
        # BOS and EOS are the tokenizer's last two ids, as in CLIP's vocabulary; EOS pads. Width 96:
        # the embeddings hold position and background as well as colour, shape and size
        # (docs/default-model-set.md).
        text_config=CLIPTextConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=192,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TEXT_LENGTH,
                                   bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                   pad_token_id=vocab_size - 1),
        vision_config=CLIPVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=64,
    )


def write_tokenizers(out: Path, captions: Iterable[str]) -> tuple[int, int]:
    """Train both tokenizers on the captions; returns (bart vocab size, clip vocab size)."""
    captions = list(captions)
    write_word_frequencies(out / "dallebart", captions)
    bart_dir = train_bart_tokenizer(captions, out / "dallebart", vocab_size=TEXT_VOCAB,
                                    model_max_length=MAX_TEXT_LENGTH)
    clip_dir = train_clip_tokenizer(captions, out / "clip", vocab_size=TEXT_VOCAB, model_max_length=MAX_TEXT_LENGTH)
    return vocab_size(bart_dir), vocab_size(clip_dir)


def vocab_size(folder: Path) -> int:
    """The number of ids of the tokenizer in `folder` (its vocab.json)."""
    return len(json.loads((Path(folder) / "vocab.json").read_text()))


def write_word_frequencies(folder: Path, captions: Iterable[str]) -> Path:
    """The text normaliser's hashtag splitter reads word costs from this file, most frequent word first."""
    counts = Counter(word for caption in captions for word in re.findall(r"[a-z]+", caption.lower()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WORD_FREQUENCY_FILENAME
    path.write_text("".join(f"{word} {n}\n" for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    return path


def write_clip_preprocessor(out: Path) -> None:
    (out / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE},
    }, indent=2) + "\n")


PIPELINE_TOML = """\
# Palette's embedded default model set: {description}
[pipeline]
dtype = "auto"
max_images_per_request = 16
# Mild super conditioning, cooled. It leans on the caption against the codes already drawn (a purple apex is a
# star in every training image), but it also pushes away from the colour the empty prompt copies from the codes
# before the object, so a held-out object's first code drifts to a colour seen with its shape: 1.35 did better
# than 1.5 on three validation draws, and 2 worse; at 3 this small model's objects break into fragments, and at
# temperature 1 its long tail of unlikely codes draws stray specks.
condition_scale = 1.35
temperature = 0.5

[[stages]]
name = "text"
type = "text"
checkpoint = "dallebart"
max_prompt_chars = 500

[[stages]]
name = "sampler"
type = "bart_sampler"
checkpoint = "dallebart"
num_slots = 8
chunk_steps = 16
# 8 of the codes: a small model's long tail of unlikely codes draws stray specks.
default_top_k = 8

[[stages]]
name = "vqgan"
type = "vqgan_decoder"
checkpoint = "vqgan"
batch_size = 8

[[stages]]
name = "clip"
type = "clip_ranker"
checkpoint = "clip"
"""


def write_pipeline_config(out: Path, description: str) -> Path:
    path = out / "pipeline.toml"
    path.write_text(PIPELINE_TOML.format(description=description))
    return path
