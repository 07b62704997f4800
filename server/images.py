"""Images in and out of the wire format: encoding generated images, checking uploaded ones."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from palette.v1 import palette_pb2 as pb

from .errors import InvalidArgument

# format enum -> (Pillow format, mime type)
FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ("PNG", "image/png"),
    pb.IMAGE_FORMAT_PNG: ("PNG", "image/png"),
    pb.IMAGE_FORMAT_JPEG: ("JPEG", "image/jpeg"),
    pb.IMAGE_FORMAT_WEBP: ("WEBP", "image/webp"),
}
DEFAULT_QUALITY = 90

# Pillow warns about headers claiming a huge canvas; load_upload refuses those with a clear error of
# its own (the server's pixel limit is far below Pillow's), so the warning would only add noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def encode_image(image: Image.Image, fmt: int, quality: int = 0) -> tuple[bytes, str]:
    """Encode for the wire: (bytes, mime type). Deterministic for a given image and settings."""
    pil_format, mime = FORMATS[fmt]
    buf = io.BytesIO()
    if pil_format == "PNG":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=pil_format, quality=quality or DEFAULT_QUALITY)
    return buf.getvalue(), mime


def load_upload(data: bytes, index: int, max_bytes: int, max_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """An uploaded image (Rank) as RGB, refusing what is not an image, too large, or a decompression bomb.

    The pixel count is checked from the header before any pixel data is decompressed, so a small
    file that claims a huge canvas costs nothing. An image longer than `max_aspect_ratio` times
    its width (or the reverse) keeps only its centre at that ratio: the ranker scales the short side
    to its input size and looks at the centre square, so a 1 x 16M strip would otherwise be scaled
    to a 64 x 1G one first.
    """
    if not data:
        raise InvalidArgument(f"image {index} is empty; send the encoded file's bytes (PNG, JPEG, WebP, ...)")
    if len(data) > max_bytes:
        raise InvalidArgument(f"image {index} is {len(data)} bytes; the limit is {max_bytes} bytes per image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidArgument(
                f"image {index} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels "
                f"(width * height): downscale it first")
        image.load()
        return centre_crop_to_ratio(image.convert("RGB"), max_aspect_ratio)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:
        raise InvalidArgument(f"image {index} was refused as a decompression bomb: its header claims more pixels "
                              f"than Pillow will open; the limit is {max_pixels} pixels (width * height)") from None
    except Image.UnidentifiedImageError:
        raise InvalidArgument(f"image {index} is not an image format the server can read; "
                              f"send PNG, JPEG, WebP, GIF or BMP file bytes") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidArgument(f"image {index} is not a decodable image ({err}); "
                              f"send complete PNG, JPEG, WebP, GIF or BMP file bytes") from None


def centre_crop_to_ratio(image: Image.Image, max_ratio: float) -> Image.Image:
    """The centre of `image`, its long side cut to at most `max_ratio` times its short side."""
    width, height = image.size
    short = min(width, height)
    longest = max(short, int(short * max_ratio))
    if width > longest:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    if height > longest:
        top = (height - longest) // 2
        return image.crop((0, top, width, top + longest))
    return image
