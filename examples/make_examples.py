"""Write the shipped example fields: synthetic smears made by smear.synth (no real data is shipped).

Usage: python examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

from smear.io import write_image_atomic
from smear.synth import make_field

HERE = Path(__file__).resolve().parent
#: seed -> white-cell kinds drawn on that field of the demo slide
SLIDE = {101: ("SNE", "LY"), 102: ("MO",), 103: ("EO", "SNE"), 104: ("BNE", "BA")}


def main() -> None:
    for i, (seed, kinds) in enumerate(SLIDE.items(), start=1):
        f = make_field(seed, wbc_kinds=kinds, n_wbc=len(kinds))
        write_image_atomic(HERE / "slide_demo" / f"field_{i:02d}.png", f.image_rgb, optimize=True)
    f = make_field(100, wbc_kinds=("SNE",), n_wbc=1)
    write_image_atomic(HERE / "field.png", f.image_rgb, optimize=True)


if __name__ == "__main__":
    main()
