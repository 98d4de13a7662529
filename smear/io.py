"""Read any field image as RGB uint8 HxWx3, list slides and fields, write outputs atomically."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from smear.errors import ImageReadError, SmearError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
#: the formats PIL may decode (the README's list; a camera's multi-picture JPEG opens as JPEG):
#: GIF, ICO, PCX, TGA, EPS (Ghostscript) and the rest are refused whatever the file is called
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
DEFAULT_MAX_PIXELS = 200_000_000
#: a decoded field whose 99th percentile is under DARK, or whose 1st percentile is over BRIGHT, holds no cells
DARK, BRIGHT = 16, 245
#: share of the machine's memory that ``io.max_pixels_in_flight: auto`` gives to decoded fields
MEMORY_SHARE = 0.1

_log = logging.getLogger(__name__)
_multipage_said: set[str] = set()  # each multi-page file is said once a process, as warnings.warn did

# Truncated files must fail, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit or float array to uint8 by the data's real range: integers by the bit depth their
    maximum needs (12-bit camera data in a 16-bit file is scaled by 4095, not 65535)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        peak = int(arr.max(initial=0))
        top = 255 if peak <= 255 else (1 << peak.bit_length()) - 1
        return (arr.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    arr = arr.astype(np.float64)
    top = 1.0 if arr.max(initial=0) <= 1.0 else arr.max()
    return (arr / top * 255.0).round().clip(0, 255).astype(np.uint8)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (EXIF orientation applied), or raise ImageReadError."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's bomb limit is io.max_pixels (its own default is 89.5 MP)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                if im.width * im.height > max_pixels:
                    raise ImageReadError(
                        f"{path}: image is {im.width}x{im.height}, over the limit of {max_pixels} pixels",
                        hint="raise io.max_pixels in the pipeline config",
                    )
                if getattr(im, "n_frames", 1) > 1:
                    if str(path) not in _multipage_said:
                        _multipage_said.add(str(path))
                        _log.warning(f"{path}: multi-page image, using the first page only")
                    im.seek(0)
                wide = _sixteen_bit_rgb(im)
                im.load()
                fmt = im.format
                im = ImageOps.exif_transpose(im) or im
                arr = _wide_rgb(path, im) if wide else _pil_to_rgb(im, path)
                if fmt == "JPEG":
                    _check_not_decoder_filled(arr, path)
                return arr
    except ImageReadError:
        raise
    except (UnidentifiedImageError, ImportError) as exc:
        # ImportError: ultralytics patches Image.open to try an optional HEIF plugin on unknown files
        raise ImageReadError(f"{path}: not a readable image file (smear reads JPEG, PNG, BMP, TIFF and WebP only)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image is over the limit of {max_pixels} pixels ({exc})",
                             hint="raise io.max_pixels in the pipeline config") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{path}: unreadable or truncated image ({reason})") from exc


def check_exposure(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """``arr``, or ImageReadError when the decoded field is nearly black or nearly white (no cells to
    count: a dark frame, a blank area, or data scaled wrongly)."""
    grey = arr[::4, ::4].mean(axis=2)
    high, low = np.percentile(grey, 99), np.percentile(grey, 1)
    if high < DARK:
        raise ImageReadError(f"{path}: the field is nearly black (99% of it under {high:.0f} of 255)",
                             hint="an unlit frame, or image data smear cannot scale")
    if low > BRIGHT:
        raise ImageReadError(f"{path}: the field is nearly white (99% of it over {low:.0f} of 255)",
                             hint="a blank area of the slide, or an overexposed frame")
    return arr


def image_pixels(path: str | Path) -> int:
    """Width x height from an image file's header (0 when it is not one smear reads): nothing is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                return int(im.width) * int(im.height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


def pixel_budget(setting: Any, max_pixels: int) -> int:
    """``io.max_pixels_in_flight`` as pixels: ``auto`` is MEMORY_SHARE of the machine's memory at 3
    bytes a pixel, never under one field of ``max_pixels``."""
    if setting is None or str(setting).strip().lower() == "auto":
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            memory = 8 << 30
        return max(int(memory * MEMORY_SHARE) // 3, int(max_pixels))
    return int(setting)


def _sixteen_bit_rgb(im: Image.Image) -> bool:
    """Whether PIL would decode this image's colour samples from 16 bits to its 8-bit RGB by keeping
    the high byte (48/64-bit PNG and TIFF)."""
    tile = getattr(im, "tile", None) or []
    raw = str(tile[0][3][0] if tile and isinstance(tile[0][3], tuple) else (tile[0][3] if tile else ""))
    return im.mode in ("RGB", "RGBA") and ";16" in raw and im.format in ("PNG", "TIFF")


def _wide_rgb(path: Path, im: Image.Image) -> np.ndarray:
    """A 16-bit-per-channel colour image decoded by OpenCV (whose formats PIL has already named) and
    scaled by its data's real range."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[:2] != (im.height, im.width):
        return _pil_to_rgb(im, path)  # an orientation or layout OpenCV reads otherwise: PIL's 8 bits
    rgb = np.ascontiguousarray(arr[..., 2::-1])  # BGR(A) -> RGB; alpha dropped
    return _to_uint8(rgb)


def _check_not_decoder_filled(arr: np.ndarray, path: Path, max_flat: float = 0.5) -> None:
    """Refuse a decoded JPEG whose lower part is one exact colour over more than ``max_flat`` of its
    height below real content: libjpeg fills what a file does not hold (a header that claims more
    pixels than the data, a cut file) with flat blocks, without an error."""
    last = arr[-1:, -1:]
    if not (arr[-1] == last[0]).all():
        return  # the usual case: the bottom row has texture
    flat_rows = (arr == last).all(axis=(1, 2))
    content = np.flatnonzero(~flat_rows)
    if content.size == 0:
        return  # a blank image, not a fill
    filled = arr.shape[0] - 1 - content[-1]
    if filled > max_flat * arr.shape[0]:
        raise ImageReadError(f"{path}: {100 * filled / arr.shape[0]:.0f}% of the image is one flat colour below "
                             f"row {content[-1] + 1}: the file holds fewer pixels than its header says "
                             f"({arr.shape[1]}x{arr.shape[0]})", hint="the file is damaged or truncated")


def _pil_to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB",):
        arr = np.asarray(im)
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = _to_uint8(np.asarray(im))
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Composite on white: smear backgrounds are light, so transparency reads as background.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        arr = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV, 48-bit RGB decoded by PIL, ...
        try:
            arr = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise ImageReadError(f"{path}: unsupported image mode {mode}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"{path}: could not convert to an RGB image (shape {arr.shape})")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def is_image_file(path: Path) -> bool:
    """True for visible files with an image suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Slide:
    """A slide: a name and its field image paths, in sorted order."""

    name: str
    fields: tuple[Path, ...]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name, hidden files skipped: the one image lister.
    A pyramidal TIFF is a whole slide, not a field: it is left out (smear run counts it as its own slide)."""
    from smear.wsi.slide import TIFF_SUFFIXES, is_whole_slide

    return sorted((p for p in Path(folder).iterdir()
                   if is_image_file(p) and not (p.suffix.lower() in TIFF_SUFFIXES and is_whole_slide(p))),
                  key=lambda p: p.name)



def _walk_folders(root: Path) -> list[Path]:
    """Every visible subfolder under ``root``, sorted; hidden folders and folder symlinks are not
    entered, and each real folder is visited once."""
    seen = {os.path.realpath(root)}
    found: list[Path] = []
    todo = [Path(root)]  # a stack, not recursion: a tree thousands of levels deep is walked too
    while todo:
        top = todo.pop()
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError:
            continue  # unreadable or vanished: what os.walk skips as well
        for entry in entries:
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                continue
            seen.add(real)
            sub = Path(entry.path)
            found.append(sub)
            todo.append(sub)
    return sorted(found)


def find_slides(paths: list[str | Path], recursive: bool = False, empty_slides: bool = False) -> list[Slide]:
    """Each path as a slide: an image is a one-field slide, a folder of images is one slide.

    A folder without images is an error; with several paths and ``empty_slides``, it is a warning
    (logged) and an empty slide (reported with 0 fields) so the other slides still run.
    """
    slides: list[Slide] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SmearError(f"{path}: no such file or folder")
        if not path.is_file() and not path.is_dir():
            raise SmearError(f"{path}: not a regular file or folder (a pipe, a device or a socket); refusing to read it")
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageReadError(
                    f"{path}: not an image file (suffix {path.suffix or 'none'})",
                    hint=f"accepted: {', '.join(sorted(IMAGE_SUFFIXES))}",
                )
            slides.append(Slide(path.stem, (path,)))
            continue
        folders = [path] + (_walk_folders(path) if recursive else [])
        found = False
        for folder in folders:
            fields = list_images(folder)  # a slide's fields are the images of its folder
            if fields:
                name = path.name if folder == path else str(folder.relative_to(path.parent))
                slides.append(Slide(name or str(folder), tuple(fields)))
                found = True
        if not found:
            if empty_slides and len(paths) > 1:
                _log.warning(f"{path}: folder holds no image files, reported as an empty slide")
                slides.append(Slide(path.name or str(path), ()))
                continue
            raise SmearError(f"{path}: folder holds no image files",
                             hint=f"accepted suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}")
    return slides


def check_outputs(outputs: dict[str, Path | None], slides: list[Slide]) -> None:
    """Refuse outputs that would replace an input field (symlinks resolved), image-named outputs
    inside a slide folder, two outputs on one file, outputs that are symlinks or folders; create
    the output folders and check that they are writable. Called before any model loads."""
    inputs = {f.resolve() for s in slides for f in s.fields}
    slide_dirs = {f.resolve().parent for s in slides for f in s.fields}
    taken: dict[Path, str] = {}
    for option, target in outputs.items():
        if target is None:
            continue
        target = Path(target)
        real = target.resolve()
        if real in inputs:
            raise SmearError(f"{target}: {option} names an input field; refusing to overwrite an input")
        if real.parent in slide_dirs and real.suffix.lower() in IMAGE_SUFFIXES:
            raise SmearError(f"{target}: {option} is an image file name inside a slide folder; refusing it",
                             hint="write outputs outside the slide folders, or with a .csv/.json/.html name")
        if real in taken:
            raise SmearError(f"{target}: {taken[real]} and {option} name the same file", hint="give each its own file")
        if target.is_symlink():
            raise SmearError(f"{target}: {option} is a symbolic link; refusing to replace it with a file",
                             hint="name the file the link points at, or another path")
        if target.is_dir():
            raise SmearError(f"{target}: {option} is a folder, not a file")
        if target.exists() and not target.is_file():
            raise SmearError(f"{target}: {option} is not a regular file (a device, a pipe or a socket); "
                             "refusing to replace it", hint="name a regular file or a new path in a writable folder")
        taken[real] = option
        check_writable_folder(target.parent, option)
        try:  # a file can be made there (a folder of /proc or a read-only mount says so only when asked)
            fd, probe = tempfile.mkstemp(prefix=temp_name(target), suffix=".probe", dir=target.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SmearError(f"{target}: {option} cannot be written there ({exc.strerror or exc})",
                             hint="name a file in a folder you can write to") from exc
        sweep_stale_temps(target)


def check_writable_folder(folder: Path, what: str = "output") -> None:
    """Create ``folder`` if needed and check that files can be made in it, or raise SmearError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmearError(f"{folder}: cannot create the {what} folder ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SmearError(f"{folder}: the {what} folder is not writable")


def temp_name(target: Path) -> str:
    """The prefix of smear's temporary files beside ``target``: hidden, with this process's id."""
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(target: Path) -> list[Path]:
    """Delete temporary files that a killed smear process left beside ``target`` (``.<name>.<pid>.*tmp``
    of a pid that no longer runs); returns what was deleted."""
    removed = []
    prefix = f".{target.name}."
    try:
        candidates = list(target.parent.glob(f"{glob.escape(prefix)}*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: Path, error: type[SmearError] = SmearError) -> Any:
    """A JSON file's content, or ``error`` naming the file when it does not parse."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg})") from exc


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write text to ``target`` atomically (temp file + rename)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes_atomic(target: str | Path, data: bytes) -> Path:
    """Write bytes to ``target`` atomically (temp file + rename)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_image_atomic(target: str | Path, image_rgb: np.ndarray, **save_kwargs) -> Path:
    """Save an RGB uint8 array as an image file atomically; format from the suffix."""
    target = Path(target)
    fmt = Image.registered_extensions().get(target.suffix.lower())
    with atomic_path(target) as tmp:
        Image.fromarray(image_rgb).save(tmp, format=fmt, **save_kwargs)
    return target


@contextlib.contextmanager
def removed_on_failure(folder: str | Path, checkpoint: str) -> Iterator[None]:
    """A run folder the block creates is removed again when the block fails (an error or Ctrl-C)
    before ``folder/checkpoint`` exists, so that a retry does not find a half-made run in its way."""
    folder = Path(folder)
    made = not folder.exists()
    try:
        yield
    except BaseException:
        if made and folder.is_dir() and not (folder / checkpoint).exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise
