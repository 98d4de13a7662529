"""Store a classifier model folder's float tensors in half precision (weights, novelty whitening).

The network still runs in float32 (``load_state_dict`` casts on copy); halving only shrinks the
shipped files so that all of smear's weights stay within the package budget. Check the model's
figures again afterwards (``benchmarks/other_labs.py``): the card's figures must be the half
model's.

    python benchmarks/half_model.py smear/weights/classifier
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def half_file(path: Path, keys: set[str] | None = None) -> tuple[int, int]:
    """Rewrite ``path`` (safetensors) with its float32 tensors (or only ``keys``) as float16; returns sizes."""
    from safetensors.numpy import load_file, save_file

    before = path.stat().st_size
    state = load_file(str(path))
    out = {k: (v.astype(np.float16) if v.dtype == np.float32 and (keys is None or k in keys) else v)
           for k, v in state.items()}
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)
    return before, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    for name, keys in (("model.safetensors", None), ("novelty.safetensors", {"whiten", "means"})):
        p = args.model_dir / name
        if p.is_file():
            a, b = half_file(p, keys)
            print(f"{p}: {a / 1e6:.1f} MB -> {b / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
