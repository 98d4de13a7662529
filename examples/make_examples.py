"""Write the shipped example fields (synthetic, made by smear.synth; no real data is shipped).

Usage: python examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

from smear.io import write_image_atomic
from smear.synth import make_field

HERE = Path(__file__).parent
SLIDE = {  # seed -> white-cell kinds drawn on that field
    101: ("SNE", "LY"), 102: ("SNE", "MO"), 103: ("EO", "SNE"), 104: ("LY", "BNE"),
}


def main() -> None:
    for i, (seed, kinds) in enumerate(SLIDE.items(), start=1):
        f = make_field(seed, n_wbc=len(kinds), wbc_kinds=kinds)
        write_image_atomic(HERE / "slide_demo" / f"field_{i:02d}.jpg", f.image_rgb, quality=92)
    f = make_field(100, n_wbc=2, wbc_kinds=("SNE", "LY"))
    write_image_atomic(HERE / "field.jpg", f.image_rgb, quality=92)


if __name__ == "__main__":
    main()
