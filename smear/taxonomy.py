"""The cell taxonomy: the 11 fine classes, 8 groups and 5 types, and the aliases of public datasets."""

from __future__ import annotations

from enum import Enum

from smear.errors import SmearError


class CellKind(str, Enum):
    """What the detector finds."""

    WBC = "wbc"
    RBC = "rbc"
    PLATELET = "platelet"


#: The 11 fine classes in the order every model and report uses.
FINE_CLASSES: tuple[str, ...] = (
    "SNE", "BNE", "MMY", "MY", "PMY", "EO", "BA", "LY", "MO", "ERB", "PLATELET",
)

FINE_NAMES: dict[str, str] = {
    "SNE": "segmented neutrophil",
    "BNE": "band neutrophil",
    "MMY": "metamyelocyte",
    "MY": "myelocyte",
    "PMY": "promyelocyte",
    "EO": "eosinophil",
    "BA": "basophil",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "ERB": "erythroblast",
    "PLATELET": "platelet",
}

#: The 8 PBC groups, in order.
GROUPS8: tuple[str, ...] = (
    "neutrophil", "ig", "eosinophil", "basophil", "lymphocyte", "monocyte", "erythroblast", "platelet",
)

FINE_TO_GROUP8: dict[str, str] = {
    "SNE": "neutrophil", "BNE": "neutrophil",
    "MMY": "ig", "MY": "ig", "PMY": "ig",
    "EO": "eosinophil", "BA": "basophil", "LY": "lymphocyte", "MO": "monocyte",
    "ERB": "erythroblast", "PLATELET": "platelet",
}

#: The 5 mature WBC types other datasets use, in order.
TYPES5: tuple[str, ...] = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")

#: Fine class -> 5-type; classes outside the 5 mature types map to None.
FINE_TO_TYPE5: dict[str, str | None] = {
    "SNE": "neutrophil", "BNE": "neutrophil",
    "MMY": None, "MY": None, "PMY": None,
    "EO": "eosinophil", "BA": "basophil", "LY": "lymphocyte", "MO": "monocyte",
    "ERB": None, "PLATELET": None,
}

#: Fine classes that are leukocytes and enter the WBC percentages.
WBC_CLASSES: tuple[str, ...] = tuple(c for c in FINE_CLASSES if c not in ("ERB", "PLATELET"))

#: Label used for cells whose calibrated top probability is under the review threshold.
UNIDENTIFIED = "UNIDENTIFIED"

#: Labels only a reviewer gives (the review page): not leukocytes, so outside every percentage.
ARTEFACT = "ARTEFACT"
SMUDGE = "SMUDGE"
REVIEW_NAMES: dict[str, str] = {ARTEFACT: "not a WBC / artefact", SMUDGE: "smudge cell"}
#: What a reviewer can move a cell to, in the order the review page lists them.
REVIEW_CLASSES: tuple[str, ...] = (*FINE_CLASSES, ARTEFACT, SMUDGE)

# Aliases seen in public datasets -> our names. Keys are lower-cased.
_FINE_ALIASES: dict[str, str] = {
    "sne": "SNE", "segmented neutrophil": "SNE", "seg": "SNE",
    "bne": "BNE", "band": "BNE", "band neutrophil": "BNE",
    "mmy": "MMY", "metamyelocyte": "MMY",
    "my": "MY", "myelocyte": "MY",
    "pmy": "PMY", "promyelocyte": "PMY",
    "eo": "EO", "eosinophil": "EO", "eosinophils": "EO",
    "ba": "BA", "basophil": "BA", "basophils": "BA",
    "ly": "LY", "lymphocyte": "LY", "lymphocytes": "LY",
    "mo": "MO", "monocyte": "MO", "monocytes": "MO",
    "erb": "ERB", "erythroblast": "ERB", "erythroblasts": "ERB", "nrbc": "ERB",
    "platelet": "PLATELET", "platelets": "PLATELET", "plt": "PLATELET", "thrombocyte": "PLATELET",
}
_GROUP_ALIASES: dict[str, str] = {
    "neutrophil": "neutrophil", "neutrophils": "neutrophil",
    "ig": "ig", "immature granulocyte": "ig", "immature granulocytes": "ig",
}
_KIND_ALIASES: dict[str, CellKind] = {
    "wbc": CellKind.WBC, "leukocyte": CellKind.WBC, "white blood cell": CellKind.WBC,
    "rbc": CellKind.RBC, "erythrocyte": CellKind.RBC, "red blood cell": CellKind.RBC,
    "platelet": CellKind.PLATELET, "platelets": CellKind.PLATELET, "plt": CellKind.PLATELET,
}


def fine_class(name: str) -> str | None:
    """Our fine class for a dataset's class name, or None if it names only a group or nothing."""
    return _FINE_ALIASES.get(name.strip().lower().replace("_", " "))


def group8_of(name: str) -> str | None:
    """The 8-group of a fine class or group name, or None."""
    fine = fine_class(name)
    if fine is not None:
        return FINE_TO_GROUP8[fine]
    key = name.strip().lower().replace("_", " ")
    return _GROUP_ALIASES.get(key) or (key if key in GROUPS8 else None)


def type5_of(name: str) -> str | None:
    """The 5-type of a fine class or group name, or None for classes outside the 5 mature types."""
    group = group8_of(name)
    return group if group in TYPES5 else None


def cell_kind(name: str) -> CellKind:
    """The detector kind for a dataset's object name (WBC/RBC/Platelets ...)."""
    key = name.strip().lower()
    if key not in _KIND_ALIASES:
        raise SmearError(f"unknown object class {name!r}", hint="expected WBC, RBC or Platelets")
    return _KIND_ALIASES[key]
