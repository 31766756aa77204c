"""PNG pictures of CLEAR maps with Pillow: upscaling, overlays, tiles with titles, a colour legend (palette
colour ↔ class name), and atomic PNG writes.

The colours themselves come from :mod:`clearmaps.reference` (compose, palette_rgb) and
:mod:`clearmaps.palettes` (the heatmap's colour map); which pictures a panel holds, :mod:`clearmaps.pictures`.
This module only arranges pixels: nearest-neighbour upscaling (so a 28×28 map stays crisp), tiles with
titles, and atomic PNG writes (a temp file in the same folder, then ``os.replace``: an interrupted run
never leaves half a PNG).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .reference import ClearmapsError

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)
_FONTS: dict = {}


def font(size: int = 14):
    """Pillow's built-in font at ``size`` px (the scalable one when FreeType is there, else the bitmap one)."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def text_size(text: str, size: int = 14) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font(size))
    return box[2] - box[0], box[3] - min(box[1], 0)


# ---- arrays -------------------------------------------------------------------------------------------

def auto_scale(height: int, width: int, target: int = 224) -> int:
    """The integer nearest-neighbour factor that brings the longer side to at least ``target`` px."""
    return max(1, -(-target // max(height, width)))


MAX_PICTURE_SIDE = 4096
"""The longest side an upscaled picture may have (an RGB panel of five such tiles is then about 250 MB)."""


def check_scale(height: int, width: int, factor) -> int:
    """``factor`` as an upscaling factor for a ``height`` × ``width`` picture: an int ≥ 1 that keeps an
    upscaled picture within :data:`MAX_PICTURE_SIDE` pixels a side (1 is always allowed)."""
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
        raise ClearmapsError(f"scale {factor!r}; expected an integer upscaling factor >= 1.")
    side = max(int(height), int(width))
    if factor > 1 and side * factor > MAX_PICTURE_SIDE:
        raise ClearmapsError(f"--scale {factor} would draw {height}x{width} maps at {height * factor}x{width * factor} "
                             f"pixels; pictures are at most {MAX_PICTURE_SIDE} pixels a side: use --scale "
                             f"{max(1, MAX_PICTURE_SIDE // side)} or less.")
    return int(factor)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (H, W) or (H, W, 3) by an integer factor: each pixel becomes a block."""
    image = np.asarray(image)
    if check_scale(image.shape[0], image.shape[1], factor) == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def pixels_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """An input image (C, H, W) in [0, 1] (C = 1 or 3) as uint8 (H, W, 3) for display."""
    p = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0)
    if p.shape[0] == 1:
        p = np.repeat(p, 3, axis=0)
    elif p.shape[0] != 3:
        p = np.repeat(p.mean(axis=0, keepdims=True), 3, axis=0)
    return np.floor(p.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def overlay(image_rgb: np.ndarray, clear_rgb: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """The CLEAR map over the image (the paper's Fig. 2): each pixel is blended towards its dominant class's
    pure colour in proportion to the map's brightness V, so strong evidence shows its class's colour and
    pixels without response show the image."""
    img = np.asarray(image_rgb, dtype=np.float64)
    clear = np.asarray(clear_rgb, dtype=np.float64)
    v = clear.max(axis=-1, keepdims=True) / 255.0
    hue = np.where(v > 0, clear / np.maximum(v, 1e-12), 0.0)  # the class colour at full brightness
    w = alpha * v
    return np.floor(img * (1 - w) + hue * w + 0.5).clip(0, 255).astype(np.uint8)


# ---- layout -------------------------------------------------------------------------------------------

def to_image(array_or_image) -> Image.Image:
    if isinstance(array_or_image, Image.Image):
        return array_or_image.convert("RGB")
    a = np.asarray(array_or_image)
    if a.dtype != np.uint8:
        raise ClearmapsError(f"expected a uint8 image array, got dtype {a.dtype}.")
    return Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, axis=-1))


def text_block(text: str, width: int | None = None, size: int = 14, colour=BLACK, background=WHITE,
               pad: int = 3, align: str = "center") -> Image.Image:
    """Text on a background, centred in ``width`` px (or as wide as the text)."""
    tw, th = text_size(text, size)
    w = max(width or 0, tw + 2 * pad)
    img = Image.new("RGB", (w, th + 2 * pad), background)
    x = (w - tw) // 2 if align == "center" else pad
    ImageDraw.Draw(img).multiline_text((x, pad), text, fill=colour, font=font(size), align=align)
    return img


def hstack(images, gap: int = 6, background=WHITE, valign: str = "top") -> Image.Image:
    images = [to_image(i) for i in images]
    w = sum(i.width for i in images) + gap * (len(images) - 1)
    h = max(i.height for i in images)
    out = Image.new("RGB", (w, h), background)
    x = 0
    for i in images:
        out.paste(i, (x, 0 if valign == "top" else (h - i.height) // 2))
        x += i.width + gap
    return out


def vstack(images, gap: int = 6, background=WHITE, align: str = "left") -> Image.Image:
    images = [to_image(i) for i in images]
    w = max(i.width for i in images)
    h = sum(i.height for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, h), background)
    y = 0
    for i in images:
        out.paste(i, (0 if align == "left" else (w - i.width) // 2, y))
        y += i.height + gap
    return out


def pad(image, border: int = 10, background=WHITE) -> Image.Image:
    image = to_image(image)
    out = Image.new("RGB", (image.width + 2 * border, image.height + 2 * border), background)
    out.paste(image, (border, border))
    return out


def titled(array, title: str, size: int = 13) -> Image.Image:
    """A picture with its title above it."""
    img = to_image(array)
    return vstack([text_block(title, img.width, size), img], gap=2, align="center")


def placeholder(width: int, height: int, text: str, size: int = 12) -> Image.Image:
    """A grey box saying why a picture is missing (e.g. no misclassified example exists)."""
    img = Image.new("RGB", (width, height), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    tw, th = text_size(text, size)
    draw.multiline_text(((width - tw) // 2, (height - th) // 2), text, fill=(60, 60, 60), font=font(size),
                        align="center")
    draw.rectangle((0, 0, width - 1, height - 1), outline=(170, 170, 170))
    return img


MAX_LEGEND_ENTRIES = 1024  # ImageNet's 1,000 classes fit; beyond, "... and N more" (--top-k shows fewer)
MAX_LABEL_CHARS = 60  # a class name longer than this is shown cut, so one name cannot make a huge picture


def label(text, limit: int = MAX_LABEL_CHARS) -> str:
    """A class name or caption part as it is drawn: one line (control characters shown as spaces), cut to
    ``limit`` characters with an ellipsis."""
    text = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def wrap(text: str, width: int, size: int = 14) -> str:
    """``text`` with line breaks between words so that no line is wider than ``width`` px."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_size(candidate, size)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def legend(colours, names, title: str = "CLEAR map colour = dominant class:", max_width: int = 900,
           size: int = 14) -> Image.Image:
    """The colour ↔ class-name key: a swatch of each palette colour followed by its class name, wrapped
    into rows no wider than ``max_width`` (the title too). Names are drawn with :func:`label` (one line, at
    most 60 characters), and at most 1,024 entries are drawn."""
    colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
    names = [str(n) for n in names]
    if len(names) != len(colours):
        raise ClearmapsError(f"legend: {len(colours)} colours for {len(names)} class names.")
    more = len(names) - MAX_LEGEND_ENTRIES
    names, colours = [label(n) for n in names[:MAX_LEGEND_ENTRIES]], colours[:MAX_LEGEND_ENTRIES]
    sw = size + 2
    entries = []
    for rgb, name in zip(colours, names):
        tw, th = text_size(name, size)
        e = Image.new("RGB", (sw + 5 + tw + 14, max(sw, th) + 4), WHITE)
        d = ImageDraw.Draw(e)
        d.rectangle((0, 2, sw - 1, 2 + sw - 1), fill=tuple(int(v) for v in rgb), outline=(90, 90, 90))
        d.text((sw + 5, 2), name, fill=BLACK, font=font(size))
        entries.append(e)
    rows, row, width = [], [], 0
    for e in entries:
        if row and width + e.width > max_width:
            rows.append(hstack(row, gap=0))
            row, width = [], 0
        row.append(e)
        width += e.width
    if row:
        rows.append(hstack(row, gap=0))
    if more > 0:
        rows.append(text_block(f"... and {more:,} more classes (--top-k shows fewer)", size=size, align="left",
                               pad=1))
    parts = ([text_block(wrap(title, max_width, size), size=size, align="left", pad=1)] if title else []) + rows
    return vstack(parts, gap=2) if parts else Image.new("RGB", (1, 1), WHITE)


# ---- files --------------------------------------------------------------------------------------------

# An interrupted write leaves at most one temp file per output, named after the writer so that a later run
# can tell a stale one (its process is gone) from one another process is still writing:
#   .<target name>.<host>-<pid>-<random>.clearmaps-tmp
TMP_SUFFIX = ".clearmaps-tmp"
_TMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
# what tempfile.mkstemp named them before the writer was in the name (kill -9 left these behind)
_OLD_TMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
_WRITING: set = set()  # temp paths this process is writing now (another thread may be mid-write)
_WRITING_LOCK = threading.Lock()


def atomic_write(path, write) -> Path:
    """Write ``path`` by calling ``write(file_object)`` on a temp file in the same folder, then
    ``os.replace``: readers see the old file or the whole new one, never a half-written one.

    The file gets the mode any new file gets here (0666 less the umask), like ``open(path, "w")``. An
    ``OSError`` of the write itself (a full disk says "No space left on device" without a file name) is
    raised again with ``path`` as its ``filename``, so that the message says which file failed.
    """
    path = Path(path)
    # the target's name is cut so that the temp name stays within the 255 bytes a file name may have
    stem = path.name.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")
    tmp = path.with_name(f".{stem}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    with _WRITING_LOCK:
        _WRITING.add(str(tmp))
    try:
        fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, as for any new file
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as exc:
        if exc.filename is None or str(exc.filename) == str(tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        with _WRITING_LOCK:
            _WRITING.discard(str(tmp))
    return path


def _writer_gone(pid: int, tmp: str) -> bool:
    if pid == os.getpid():
        with _WRITING_LOCK:
            return tmp not in _WRITING
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive under another user, or cannot tell: leave it
        return False
    return False


def remove_stale_temps(folder, old_targets=()) -> list[Path]:
    """Delete the temp files that writers no longer running on this machine left in ``folder`` (a process
    killed mid-write), and those of the older naming whose target is one of ``old_targets``. Temp files of
    live processes and of other machines (a shared folder) are left alone. Returns what was deleted."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        stale = (m is not None and m["host"] == _HOST and _writer_gone(int(m["pid"]), entry.path)) or (
            m is None and (old := _OLD_TMP.match(entry.name)) is not None and old["target"] in old_targets)
        if stale and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def save_png(path, image) -> Path:
    """Save a uint8 array or PIL image as PNG, atomically."""
    img = to_image(image)
    return atomic_write(path, lambda f: img.save(f, format="PNG", optimize=True))


def save_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
