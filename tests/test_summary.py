"""Slide summaries: intervals, derived figures, review flags, too-few-cells warning."""

from __future__ import annotations

import pytest

from smear.config import default_config
from smear.report.summary import cells_needed, differential, proportion_ci
from smear.taxonomy import FINE_CLASSES, CellKind
from smear.types import CellPrediction, Detection, FieldResult, SlideReport

CFG = default_config("pipeline")


def _report(labels: dict[str, int], n_rbc: int = 0, n_plt: int = 0) -> SlideReport:
    dets, cells = [], []
    for label, n in labels.items():
        for _ in range(n):
            d = Detection((0.0, 0.0, 10.0, 10.0), CellKind.WBC, 0.9)
            dets.append(d)
            cells.append(CellPrediction(d, label, 0.9, {label: 0.9}))
    dets += [Detection((0.0, 0.0, 5.0, 5.0), CellKind.RBC, 0.9)] * n_rbc
    dets += [Detection((0.0, 0.0, 2.0, 2.0), CellKind.PLATELET, 0.9)] * n_plt
    field = FieldResult("s", "f.png", 640, 480, tuple(dets), tuple(cells))
    return SlideReport("s", (field,), classified=True)


def _row(labels, **kw):
    return differential(_report(labels, **kw), CFG.report, CFG.flags).row()


def test_percentages_sum_to_100_and_ci_contains_each():
    row = _row({"SNE": 55, "BNE": 3, "LY": 30, "MO": 7, "EO": 4, "BA": 1, "ERB": 2, "PLATELET": 1})
    assert row["n_wbc"] == 100
    wbc = ("SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO")
    assert sum(row[f"{c}_pct"] for c in wbc) == pytest.approx(100.0, abs=0.05)
    for c in wbc:
        assert row[f"{c}_ci_low"] <= row[f"{c}_pct"] <= row[f"{c}_ci_high"]
    assert row["ERB_pct"] is None and row["ERB_n"] == 2 and row["nrbc_per_100_wbc"] == 2.0
    assert row["group_neutrophil_n"] == 58 and row["group_neutrophil_pct"] == 58.0
    assert row["type_lymphocyte_pct"] == 30.0
    assert sum(row[f"type_{t}_n"] for t in ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")) == 100


def test_ci_narrows_as_counts_grow():
    widths = []
    for n in (10, 100, 1000):
        low, high = proportion_ci(n // 5, n)
        assert low < 20.0 < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    lo_exact, hi_exact = proportion_ci(0, 20, method="exact")
    assert lo_exact == 0.0 and hi_exact == pytest.approx(16.84, abs=0.01)  # Clopper-Pearson 0/20


def test_derived_counts_platelets_and_rbc():
    row = _row({"SNE": 60, "LY": 40, "PLATELET": 2}, n_rbc=200, n_plt=8)
    assert row["n_platelet"] == 10  # detector platelets + WBC boxes the classifier calls platelets
    assert row["platelets_per_100_rbc"] == 5.0 and row["rbc_per_field"] == 200.0


def test_flags_and_too_few_warning():
    normal = _row({"SNE": 60, "LY": 30, "MO": 6, "EO": 3, "BA": 1})
    assert normal["flags"] == [] and normal["warnings"] == []
    sick = _row({"SNE": 40, "BNE": 8, "MY": 5, "LY": 10, "MO": 20, "EO": 10, "BA": 7, "ERB": 5})
    text = " | ".join(sick["flags"])
    for word in ("immature granulocytes", "left shift", "NRBC", "eosinophilia", "basophilia", "monocytosis",
                 "lymphopenia"):
        assert word in text
    assert "lymphocytosis" not in text and all(f.endswith("review") for f in sick["flags"])
    few = _row({"SNE": 20, "LY": 10})
    assert any("too few cells counted (30 < 100)" in f for f in few["flags"])
    assert "only 30 WBCs" in few["warnings"][0] and str(few["wbc_needed"]) in few["warnings"][0]


def test_cells_needed_formula():
    assert cells_needed([50.0], 5.0, 0.95) == 385  # 1.96^2 * 0.25 / 0.05^2 = 384.1
    assert cells_needed([10.0, 90.0], 5.0, 0.95) == 139


def test_unclassified_report_counts_kinds_only():
    dets = (Detection((0, 0, 5, 5), CellKind.WBC), Detection((0, 0, 5, 5), CellKind.RBC))
    rep = SlideReport("s", (FieldResult("s", "f", 10, 10, dets),), classified=False)
    row = differential(rep, CFG.report, CFG.flags).row()
    assert row["n_wbc"] == 1 and row["n_unidentified"] is None and row["SNE_pct"] is None
    assert row["flags"] == [] and len(FINE_CLASSES) == 11


def test_differential_is_typed_and_frozen_and_its_row_is_the_summary():
    import dataclasses

    from smear.report.summary import differential
    from smear.types import Differential, Share

    rep = _report({"SNE": 6, "LY": 3, "ERB": 1}, n_rbc=20)
    d = differential(rep, CFG.report, CFG.flags, CFG.guard)
    assert isinstance(d, Differential) and isinstance(d.fine["SNE"], Share)
    assert d.n_wbc == 9 and d.fine["SNE"].n == 6 and d.fine["SNE"].pct == pytest.approx(66.67)
    assert d.fine["ERB"].pct is None and d.groups["neutrophil"].n == 6 and d.types["lymphocyte"].n == 3
    assert list(d.fine) == list(FINE_CLASSES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.n_wbc = 0  # type: ignore[misc]
    assert d.row() == differential(rep, CFG.report, CFG.flags, CFG.guard).row()


def test_summary_columns_are_the_csv_reports():
    """types.summary_columns (the page's recount writes its CSV in them) is the CSV report's header,
    classified or not."""
    from smear.report.tables import summary_csv
    from smear.types import summary_columns

    for rep in (_report({"SNE": 3, "LY": 1}, n_rbc=5), SlideReport("d", (), classified=False)):
        header = summary_csv([differential(rep, CFG.report, CFG.flags)]).splitlines()[0]
        assert header.split(",") == summary_columns()


def test_flag_rules_fill_their_messages_and_name_their_classes():
    """The rules the page interprets: each flag's message is filled by its quantity, and the classes
    behind it are the ones its quantity sums (the page asks for their cells before sign-off)."""
    from smear.report.html import FLAG_CLASSES
    from smear.report.summary import FLAG_RULES, MESSAGES

    row = _row({"SNE": 10, "BNE": 3, "MY": 2, "EO": 2, "LY": 1, "ERB": 2})
    assert "left shift (bands + IG 27.8%): review" in row["flags"]  # (3 + 2) of 18
    assert "NRBC present (11.11 per 100 WBC): review" in row["flags"]
    assert FLAG_CLASSES["left_shift_pct"] == ["BNE", "MMY", "MY", "PMY"] and FLAG_CLASSES["nrbc_present_per_100_wbc"] == ["ERB"]
    assert {key for key, *_ in FLAG_RULES} == set(CFG.flags.model_dump())  # a rule for every threshold
    assert MESSAGES["too_few"].format(n=3, min_wbc=100) == "too few cells counted (3 < 100)"
