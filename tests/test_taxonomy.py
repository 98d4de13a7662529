"""The taxonomy: 11 fine classes, 8 groups, 5 types, dataset aliases."""

from __future__ import annotations

import pytest

from smear.errors import SmearError
from smear.taxonomy import (
    FINE_CLASSES, FINE_TO_GROUP8, FINE_TO_TYPE5, GROUPS8, TYPES5, WBC_CLASSES, CellKind,
    cell_kind, fine_class, group8_of, type5_of,
)


def test_orders_and_sizes():
    assert FINE_CLASSES == ("SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO", "ERB", "PLATELET")
    assert len(GROUPS8) == 8 and len(TYPES5) == 5
    assert set(FINE_TO_GROUP8) == set(FINE_CLASSES)
    assert set(FINE_TO_GROUP8.values()) == set(GROUPS8)
    assert "ERB" not in WBC_CLASSES and "PLATELET" not in WBC_CLASSES and len(WBC_CLASSES) == 9


@pytest.mark.parametrize("fine,group,type5", [
    ("SNE", "neutrophil", "neutrophil"), ("BNE", "neutrophil", "neutrophil"),
    ("MMY", "ig", None), ("MY", "ig", None), ("PMY", "ig", None),
    ("EO", "eosinophil", "eosinophil"), ("BA", "basophil", "basophil"),
    ("LY", "lymphocyte", "lymphocyte"), ("MO", "monocyte", "monocyte"),
    ("ERB", "erythroblast", None), ("PLATELET", "platelet", None),
])
def test_fine_to_group_and_type(fine, group, type5):
    assert FINE_TO_GROUP8[fine] == group and group8_of(fine) == group
    assert FINE_TO_TYPE5[fine] == type5 and type5_of(fine) == type5


def test_dataset_aliases():
    assert fine_class("Lymphocyte") == "LY"
    assert fine_class("platelets") == "PLATELET"
    assert fine_class("neutrophil") is None  # stage not given: group level only
    assert group8_of("NEUTROPHIL") == "neutrophil" and group8_of("IG") == "ig"
    assert type5_of("neutrophil") == "neutrophil" and type5_of("ig") is None
    assert group8_of("banana") is None


def test_cell_kinds():
    assert cell_kind("WBC") is CellKind.WBC
    assert cell_kind("Platelets") is CellKind.PLATELET
    assert cell_kind(" rbc ") is CellKind.RBC
    with pytest.raises(SmearError, match="unknown object class 'Ghost'"):
        cell_kind("Ghost")
