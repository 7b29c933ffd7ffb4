"""Parsing of the IDX format MNIST ships in, with checks that name the file and the problem.

Format (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions, one uint32 per dimension, then the data. A wrong file gives an ``IDXFormatError``
instead of a numpy reshape traceback.
"""

from __future__ import annotations

import struct

import numpy as np

UBYTE = 0x08
IMAGE_SHAPE = (28, 28)


class IDXFormatError(ValueError):
    """A file is not the IDX file it should be."""


def parse_idx(data: bytes, name: str, ndim: int) -> np.ndarray:
    """Decode IDX bytes into an array of ``ndim`` dimensions, checking header, counts and length."""
    if len(data) < 4:
        raise IDXFormatError(f"{name}: {len(data)} bytes is too short to be an IDX file")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    magic = int.from_bytes(data[:4], "big")
    if zero != 0 or dtype != UBYTE:
        raise IDXFormatError(
            f"{name}: magic number 0x{magic:08x} is not an unsigned-byte IDX file "
            f"(expected 0x{0x0800 + ndim:08x}); is it still gzip-compressed, or another file?"
        )
    if dims != ndim:
        raise IDXFormatError(
            f"{name}: magic number 0x{magic:08x} says {dims} dimensions, expected {ndim} "
            f"({'labels' if ndim == 1 else 'images'} file 0x{0x0800 + ndim:08x})"
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise IDXFormatError(f"{name}: truncated header ({len(data)} bytes)")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise IDXFormatError(
            f"{name}: header declares shape {shape} = {expected} bytes, but the file has {len(data)} bytes"
            + (" (truncated)" if len(data) < expected else " (trailing data)")
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def parse_images(data: bytes, name: str) -> np.ndarray:
    images = parse_idx(data, name, ndim=3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise IDXFormatError(f"{name}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    return images


def parse_labels(data: bytes, name: str) -> np.ndarray:
    labels = parse_idx(data, name, ndim=1)
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{name}: label {int(labels.max())} is not a digit 0-9")
    return labels


def pair(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that a label file belongs to its image file (same count)."""
    if len(images) != len(labels):
        raise IDXFormatError(
            f"{labels_name} holds {len(labels)} labels but {images_name} holds {len(images)} images: "
            "the label file does not belong to this image file"
        )
    return images, labels


def encode_idx(array: np.ndarray) -> bytes:
    """The inverse of ``parse_idx``; used to build fixtures and subsets in the same format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
