"""Images in and out of the wire format: encoding generated images, checking uploaded ones."""

from __future__ import annotations

import io

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


def encode_image(image: Image.Image, fmt: int, quality: int = 0) -> tuple[bytes, str]:
    """Encode for the wire: (bytes, mime type). Deterministic for a given image and settings."""
    pil_format, mime = FORMATS[fmt]
    buf = io.BytesIO()
    if pil_format == "PNG":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=pil_format, quality=quality or DEFAULT_QUALITY)
    return buf.getvalue(), mime


def load_upload(data: bytes, index: int, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded image (Rank) as RGB, refusing what is not an image, too large, or a decompression bomb.

    The pixel count is checked from the header before any pixel data is decompressed, so a small
    file that claims a huge canvas costs nothing.
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
        return image.convert("RGB")
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
