"""Pascal VOC annotations: the one VOC XML parser (detection datasets and the segmenter's WBC boxes read it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smear.errors import DataError


@dataclass(frozen=True)
class VocAnnotation:
    """One Pascal VOC XML file: the image file it names and its objects as (name, box xyxy or None
    when the box is missing or not numbers)."""

    path: Path
    filename: str
    objects: tuple[tuple[str, tuple[float, float, float, float] | None], ...]


def read_voc_xml(path: str | Path) -> VocAnnotation:
    """Parse a VOC annotation (the one VOC parser); DataError for XML that does not parse."""
    import xml.etree.ElementTree as ET

    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: unparseable XML ({exc})") from exc
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        try:
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr]
        except (TypeError, ValueError, AttributeError):
            box = None
        objects.append(((obj.findtext("name") or "").strip(), box))
    return VocAnnotation(path, root.findtext("filename") or path.stem + ".jpg", tuple(objects))
