"""One markdown table from several `benchmarks/other_labs.py --json` outputs (for model cards).

    python benchmarks/ablation_table.py "shipped=out/shipped.json" "PBC+Raabin, GroupNorm=out/mixgn.json" ...

Per recipe: 5-type accuracy / balanced accuracy on each other-lab set, the PBC test split's 5-type
and 11-class accuracy, 5-type accuracy through the pale stain shift (when the JSON has it), the
unidentified share and the 5-type ECE per other-lab set, and the share of neutrophils called EO per
set; a JSON with several classifiers gives one row each.
"""

from __future__ import annotations

import json
import sys

SETS = ("jtsc", "cellavision", "raabin-test-A")


def _per_set(rows: dict, key: str, fmt: str) -> str:
    return " / ".join("-" if rows.get(s) is None else format(rows[s][key], fmt) for s in SETS)


def main() -> None:
    head = ["recipe", *[f"{s} acc / bal." for s in SETS], "PBC test 5-type / 11-class", "PBC + pale",
            "unidentified (jtsc / cv / raabin)", "ECE 5-type (jtsc / cv / raabin)", "neutrophils called EO (jtsc / cv / raabin)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in sys.argv[1:]:
        label, _, path = arg.partition("=")
        doc = json.load(open(path))
        for name, rows in doc["classifier"].items():
            cells = [label if len(doc["classifier"]) == 1 else f"{label} ({name})"]
            for s in SETS:
                r = rows.get(s)
                cells.append("-" if r is None else f"{r['type5_accuracy']:.3f} / {r['type5_balanced_accuracy']:.3f}")
            p, pale = rows.get("pbc-test"), rows.get("pbc-test+pale")
            cells.append("-" if p is None else f"{p['type5_accuracy']:.3f} / {p['accuracy']:.3f}")
            cells.append("-" if pale is None else f"{pale['type5_accuracy']:.3f}")
            cells.append(_per_set(rows, "unidentified", ".2f"))
            cells.append(_per_set(rows, "type5_ece", ".3f"))
            cells.append(_per_set(rows, "neutrophil_as_eo", ".3f"))
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
