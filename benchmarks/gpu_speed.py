"""Pipeline fields per second on a GPU, batched fields, fp16 and fp32; and CPU vs GPU reports side by side.

Usage: python benchmarks/gpu_speed.py [--device cuda] [--data ../shared/data/bccd/test/images] [--n 640]
       [--batch 8 --batch 32 --batch 64] [--compare-n 60] [--seconds 20]

Speed: the shipped detector and classifier (8 views per cell) on ``--n`` fields (the data folder's
fields repeated as needed), ``field_batch`` = detector batch = B, at fp16 (as `smear run` on CUDA) and
fp32; one untimed pass first. Prints fields/s per (precision, batch).

Agreement (``--compare-n``): `run_slide` on the demo slide and on that many data fields on the CPU
(runtime torch, fp32) and on ``--device`` (fp16, as shipped); prints the counts per class of both
and lists every cell whose label differs (same field, boxes matched at IoU 0.5), or "same counts".
Exit status 1 when a count differs by more than ``--max-count-diff`` per slide.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smear.config import load_config  # noqa: E402
from smear.io import Slide, find_slides  # noqa: E402
from smear.pipeline.build import build_stages  # noqa: E402
from smear.pipeline.run import run_slide  # noqa: E402


def stages_for(device: str, batch: int, half: bool):
    cfg = load_config("pipeline", None, ["classifier=cnn", "cache_dir=off", "runtime=torch", f"device={device}",
                                         f"field_batch={batch}"])
    stages = build_stages(cfg)
    for obj in _chain(stages.detector):
        if hasattr(obj, "half"):
            obj.half = half and device.startswith("cuda")
            obj.batch = batch
    stages.classifier.half = half and device.startswith("cuda")
    return stages


def _chain(det):
    """The detector and every detector it wraps (the WBC check and tiler hold the YOLO one)."""
    seen = []
    while det is not None and det not in seen:
        seen.append(det)
        det = next((getattr(det, a) for a in ("detector", "inner") if hasattr(det, a)), None)
    return seen


def fields_per_s(slide: Slide, device: str, batch: int, half: bool, seconds: float) -> float:
    stages = stages_for(device, batch, half)
    run_slide(Slide(slide.name, slide.fields[:batch]), stages, keep_fields=False)  # warm-up, cudnn autotune
    import torch

    done, start = 0, time.perf_counter()
    while True:
        run_slide(slide, stages, keep_fields=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        done += len(slide.fields)
        if time.perf_counter() - start >= seconds:
            break
    return done / (time.perf_counter() - start)


def _items(field) -> list[tuple[str, str, tuple[float, ...]]]:
    """(kind, label or '-', box) of every detection of a field, labels from its classified cells."""
    labels = {c.detection: c.label for c in field.cells}
    return [(d.kind.value, labels.get(d, "-"), d.box_xyxy) for d in field.detections]


def compare(slide: Slide, device: str, max_diff: int) -> bool:
    """CPU (fp32) against ``device`` (fp16 as shipped): counts per class and the cells that differ."""
    from smear.detect.evaluate import box_iou

    cpu = run_slide(slide, stages_for("cpu", 8, False))
    gpu = run_slide(slide, stages_for(device, 8, device.startswith("cuda")))

    def counts(rep):
        return Counter((k, label) for f in rep.fields for k, label, _ in _items(f))

    a, b = counts(cpu), counts(gpu)
    print(f"\n{slide.name} ({len(slide.fields)} fields): {sum(a.values())} cells on cpu, {sum(b.values())} on {device}")
    worst = 0
    for key in sorted(set(a) | set(b)):
        if a[key] != b[key]:
            worst = max(worst, abs(a[key] - b[key]))
            print(f"  {key[0]:9} {key[1]:12} cpu {a[key]:5}  {device} {b[key]:5}")
    if not worst:
        print("  same counts")
    on_gpu = {f.field: _items(f) for f in gpu.fields}
    for f in cpu.fields:
        other = list(on_gpu.get(f.field, []))
        for kind, label, box in _items(f):
            match = max(other, key=lambda o: box_iou(box, o[2]), default=None)
            where = tuple(round(v) for v in box)
            if match is None or box_iou(box, match[2]) < 0.5:
                print(f"  {f.field}: {kind} {label} at {where} only on cpu")
                continue
            other.remove(match)
            if (kind, label) != match[:2]:
                print(f"  {f.field}: cell at {where}: cpu {kind} {label}, {device} {match[0]} {match[1]}")
        for kind, label, box in other:
            print(f"  {f.field}: {kind} {label} at {tuple(round(v) for v in box)} only on {device}")
    return worst <= max_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd" / "test" / "images"))
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--batch", type=int, action="append", default=[])
    ap.add_argument("--precision", action="append", default=[], choices=["fp16", "fp32"])
    ap.add_argument("--seconds", type=float, default=20.0, help="time each setting for at least this long")
    ap.add_argument("--compare-n", type=int, default=60)
    ap.add_argument("--max-count-diff", type=int, default=1)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-compare", action="store_true")
    args = ap.parse_args()
    import torch

    [slide] = find_slides([Path(args.data)])
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}")
    ok = True
    if not args.no_compare:
        [demo] = find_slides([ROOT / "examples" / "slide_demo"])
        ok &= compare(demo, args.device, args.max_count_diff)
        ok &= compare(Slide(slide.name, slide.fields[: args.compare_n]), args.device, args.max_count_diff)
    if not args.no_speed:
        fields = tuple((list(slide.fields) * (1 + args.n // len(slide.fields)))[: args.n])
        big = Slide(slide.name, fields)
        print(f"\n| precision | fields per batch | fields/s ({len(fields)} fields, 8 views per WBC) |")
        print("|---|---|---|")
        cuda = args.device.startswith("cuda")
        for precision in args.precision or (["fp16", "fp32"] if cuda else ["fp32"]):  # no fp16 on the CPU
            for batch in args.batch or [8, 32, 64]:
                fps = fields_per_s(big, args.device, batch, precision == "fp16", args.seconds)
                print(f"| {precision} | {batch} | {fps:.1f} |", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
