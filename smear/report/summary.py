"""A slide's differential: counts, percentages with confidence intervals, derived figures, flags."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

from smear.config_models import Flags, Guard, Implausible, ReportSection

from smear.taxonomy import (
    FINE_CLASSES, FINE_TO_GROUP8, FINE_TO_TYPE5, GROUPS8, TYPES5, UNIDENTIFIED, WBC_CLASSES, CellKind,
)
from smear.types import Differential, Share, SlideReport

APART = ("ERB", "PLATELET")  # counted, but outside the WBC percentages
GROUPS_APART = ("erythroblast", "platelet")


def proportion_ci(k: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Confidence interval of k/n in percent: 'wilson' (scipy's binomtest formula, written out so a
    run does not import scipy.stats, about a second of start-up) or 'exact' (scipy's binomtest)."""
    if n <= 0:
        return float("nan"), float("nan")
    if method == "wilson":
        return tuple(100.0 * v for v in wilson_ci(k, n, confidence))  # type: ignore[return-value]
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method=method)
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def wilson_ci(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of k/n (Newcombe 1998), two-sided, without continuity correction, as
    ``scipy.stats.binomtest(k, n).proportion_ci(method='wilson')`` computes it."""
    p = k / n
    z = NormalDist().inv_cdf(0.5 + 0.5 * confidence)
    denom = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denom
    delta = z / denom * math.sqrt(4 * n * p * (1 - p) + z**2)
    return (0.0 if k == 0 else center - delta), (1.0 if k == n else center + delta)


def cells_needed(pcts: list[float], halfwidth_pct: float, confidence: float) -> int:
    """WBCs to count so the widest interval among these percentages is about +/- halfwidth (normal approx.)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    pq = max([(p / 100.0) * (1 - p / 100.0) for p in pcts] or [0.25]) or 0.25
    return int(math.ceil(z * z * pq / (halfwidth_pct / 100.0) ** 2))


def _shares(counts: dict[str, int], names: tuple[str, ...], apart: tuple[str, ...], n: int,
            rcfg: ReportSection) -> dict[str, Share]:
    """Each name's Share of ``n`` WBCs (no counts: the slide was not classified)."""
    out: dict[str, Share] = {}
    for name in names:
        k = counts.get(name, 0) if counts else None
        if name in apart or n == 0 or k is None:
            out[name] = Share(k)
            continue
        low, high = proportion_ci(k, n, rcfg.confidence, rcfg.ci_method)
        out[name] = Share(k, round(100.0 * k / n, 2), round(low, 2), round(high, 2))
    return out


#: Every message of the flags, the domain guard and the count's warning, as ``str.format`` templates
#: (specs: none, .Nf, g, .0%): filled here, and by the review page's recount (templates/recount.js) from
#: the page's data (html.summary_config), so each is written once.
MESSAGES = {
    "too_few": "too few cells counted ({n} < {min_wbc})",
    "few_wbc": ("{slide}: only {n_wbc} WBCs identified (minimum {min_wbc}); +/-{halfwidth:g} points at "
                "{confidence:.0%} needs about {needed} WBCs"),
    "domain": "unlike the training data or misread: domain score {score:.2f} (threshold {limit:g}); {why}; {advice}",
    "why": "{meaning}{detail}: {key} {ratio:.2f}",
    "why_novel": " ({n_novel} of {n_scored} WBCs, {share:.0f}%)",
    "why_differential": " ({seen})",
    "nrbc_ceiling": ("implausible: {nrbc:g} NRBC per 100 WBC (ceiling {ceiling:g}); red cells are likely being "
                     "counted as nucleated cells; {advice}"),
    "wbc_boxes": ("implausible: {n_wbc} WBC boxes to {n_rbc} RBCs (a smear has far fewer white than red cells); "
                  "the detector is likely taking red cells for white cells on this stain; {advice}"),
}
#: The quantities the rules read, besides each fine class's percentage (0.0 when it has none) and
#: ``nrbc`` (NRBC per 100 WBC, 0.0 when none): each a sum, left to right from 0 as Python's ``sum``,
#: of those and of the quantities before it.
QUANTITIES: dict[str, tuple[str, ...]] = {
    "ig": ("MMY", "MY", "PMY"), "left_shift": ("BNE", "ig"), "neutrophils": ("SNE", "BNE")}
#: The review flags: the key under ``flags:`` that holds the threshold, the quantity, whether it fires
#: "above" or "below" the threshold, the message (with the quantity as ``value``).
FLAG_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("ig_present_pct", "ig", "above", "immature granulocytes present ({value:.1f}%): review"),
    ("left_shift_pct", "left_shift", "above", "left shift (bands + IG {value:.1f}%): review"),
    ("nrbc_present_per_100_wbc", "nrbc", "above", "NRBC present ({value} per 100 WBC): review"),
    ("eosinophilia_pct", "EO", "above", "eosinophilia ({value:.1f}%): review"),
    ("basophilia_pct", "BA", "above", "basophilia ({value:.1f}%): review"),
    ("monocytosis_pct", "MO", "above", "monocytosis ({value:.1f}%): review"),
    ("lymphocytosis_pct", "LY", "above", "lymphocytosis ({value:.1f}%): review"),
    ("lymphopenia_pct", "LY", "below", "lymphopenia ({value:.1f}%): review"),
)
#: The slide guard's rules for a differential almost no blood has: terms (quantity, key under
#: ``guard.implausible``, "above" or "below"), the rule's ratio the smallest of its terms' ratios to
#: their thresholds (over 1 fires), and what it saw (the quantities by name). Unlike the clinical flags,
#: these assume the typing may be wrong.
IMPLAUSIBLE_RULES: tuple[tuple[tuple[tuple[str, str, str], ...], str], ...] = (
    ((("EO", "eosinophil_pct", "above"), ("neutrophils", "eosinophil_neutrophil_max_pct", "below")),
     "EO {EO:.1f}% with neutrophils {neutrophils:.1f}%"),
    ((("BA", "basophil_pct", "above"),), "BA {BA:.1f}%"),
    ((("PMY", "promyelocyte_pct", "above"),), "PMY {PMY:.1f}%"),
    ((("MO", "monocyte_pct", "above"),), "MO {MO:.1f}%"),
    ((("nrbc", "nrbc_per_100_wbc", "above"), ("LY", "nrbc_lymphocyte_max_pct", "below")),
     "{nrbc:g} NRBC per 100 WBC with lymphocytes {LY:.1f}%"),
)


def rule_classes(name: str) -> list[str]:
    """The fine classes a quantity counts (``nrbc``: the erythroblasts), in order."""
    if name == "nrbc":
        return ["ERB"]
    return [c for term in QUANTITIES[name] for c in rule_classes(term)] if name in QUANTITIES else [name]


def quantities(d: Differential) -> dict[str, float]:
    """What the flag and guard rules read of a differential (QUANTITIES)."""
    q = {code: d.fine[code].pct or 0.0 for code in FINE_CLASSES}
    q["nrbc"] = d.nrbc_per_100_wbc or 0.0
    for name, terms in QUANTITIES.items():
        q[name] = sum(q[t] for t in terms)
    return q


def evaluate_flags(d: Differential, fcfg: Flags, min_wbc: int) -> list[str]:
    """Review prompts from a slide's differential and the flag thresholds (FLAG_RULES)."""
    if not d.classified:
        return []
    flags = []
    if d.n_wbc < min_wbc:
        flags.append(MESSAGES["too_few"].format(n=d.n_wbc, min_wbc=min_wbc))
    if d.n_wbc == 0:
        return flags
    q = quantities(d)
    for key, name, side, text in FLAG_RULES:
        threshold = getattr(fcfg, key)
        if q[name] > threshold if side == "above" else q[name] < threshold:
            flags.append(text.format(value=q[name]))
    return flags


ADVICE = ("results are unreliable for this stain or scanner: review every cell, and adapt the "
          "classifier on this lab's own labelled cells (smear train classify --set model.init=<model folder>)")
#: what each piece of the guard's evidence means, for the warning (the fitted ones: smear.classify.guard)
EVIDENCE_TEXT = {
    "novel_share": "WBCs unlike every class the classifier was trained on",
    "differential": "a differential almost no blood has",
    "features": "the cells' features drift from the training data the way a stain or scanner moves them",
    "novelty_mean": "the cells as a whole sit further from the training classes than training-lab cells do",
    "confidence": "the classifier is less sure of these cells than of training-lab cells",
    "colour": "the crops' colour and texture are unlike the training labs'",
}
EVIDENCE_CAP = 99.0  # a ratio with a zero denominator (no neutrophils at all) is shown as this


def _ratio(value: float, threshold: float) -> float:
    return EVIDENCE_CAP if threshold <= 0 else min(EVIDENCE_CAP, value / threshold)


def implausible_differential(d: Differential, icfg: Implausible) -> list[tuple[float, str]]:
    """IMPLAUSIBLE_RULES on a differential, each (ratio to its threshold, what it saw); a ratio over 1
    fires."""
    if not d.classified or not d.n_wbc:
        return []
    q = quantities(d)
    out = []
    for terms, text in IMPLAUSIBLE_RULES:
        ratios = [_ratio(q[name], getattr(icfg, key)) if side == "above" else _ratio(getattr(icfg, key), q[name])
                  for name, key, side in terms]
        out.append((round(min(ratios), 4), text.format(**q)))
    return out


def domain_evidence(d: Differential, n_scored: int, n_novel: int, fitted: dict[str, float],
                    gcfg: Guard) -> tuple[dict[str, float], list[str]]:
    """Every piece of the slide guard's evidence as a ratio to its threshold, and what the
    differential rules saw: the novel share, the implausible differential, and the statistics
    fitted with the classifier (``fitted``, from the pipeline)."""
    out: dict[str, float] = {}
    if n_scored >= gcfg.min_scored:
        out["novel_share"] = round(_ratio(n_novel / n_scored, gcfg.max_novel_share), 4)
    seen: list[str] = []
    if d.classified and d.n_wbc >= gcfg.min_cells:
        rules = implausible_differential(d, gcfg.implausible)
        out["differential"] = max(r for r, _ in rules)
        seen = [text for r, text in rules if r > gcfg.max_domain_score]
    out.update({k: float(v) for k, v in fitted.items()})
    return out, seen


def domain_warnings(d: Differential, n_scored: int, n_novel: int, gcfg: Guard,
                    fitted: dict[str, float] | None = None) -> tuple[float | None, dict[str, float], list[str]]:
    """The domain guard: the slide's ``domain_score`` (the largest evidence ratio), its evidence,
    and its warnings: first the score's, when over ``max_domain_score``, saying which evidence
    fired and how strongly; then counts a smear cannot have (red cells taken for white cells)."""
    evidence, seen = domain_evidence(d, n_scored, n_novel, fitted or {}, gcfg)
    score = max(evidence.values()) if evidence else None
    out = []
    limit = gcfg.max_domain_score
    if score is not None and score > limit:
        fired = sorted(((v, k) for k, v in evidence.items() if v > limit), reverse=True)
        why = []
        for v, k in fired:
            detail = ""
            if k == "novel_share":
                detail = MESSAGES["why_novel"].format(n_novel=n_novel, n_scored=n_scored,
                                                      share=100.0 * n_novel / n_scored)
            elif k == "differential":
                detail = MESSAGES["why_differential"].format(seen="; ".join(seen))
            why.append(MESSAGES["why"].format(meaning=EVIDENCE_TEXT.get(k, k), detail=detail, key=k, ratio=v))
        out.append(MESSAGES["domain"].format(score=score, limit=limit, why="; ".join(why), advice=ADVICE))
    nrbc = d.nrbc_per_100_wbc
    if nrbc is not None and nrbc > gcfg.max_nrbc_per_100_wbc:
        out.append(MESSAGES["nrbc_ceiling"].format(nrbc=nrbc, ceiling=gcfg.max_nrbc_per_100_wbc, advice=ADVICE))
    n_rbc, n_wbc = d.n_rbc or 0, d.n_wbc_detected or 0
    if n_rbc >= gcfg.min_rbc and n_wbc / n_rbc > gcfg.max_wbc_per_rbc:
        out.append(MESSAGES["wbc_boxes"].format(n_wbc=n_wbc, n_rbc=n_rbc, advice=ADVICE))
    return (round(score, 4) if score is not None else None), evidence, out


def differential(report: SlideReport, rcfg: ReportSection | None = None,
                 fcfg: Flags | None = None, gcfg: Guard | None = None) -> Differential:
    """The slide's Differential under the report, flag and guard settings of the pipeline config
    (None: the shipped report and guard settings, and no flags)."""
    from smear.config import default_config

    shipped = default_config("pipeline")
    rcfg, gcfg = rcfg or shipped.report, gcfg or shipped.guard
    n_rbc, n_plt = report.count(CellKind.RBC), report.count(CellKind.PLATELET)
    n_fields = report.n_fields
    counts = report.label_counts() if report.classified else {}
    n_wbc = sum(counts[c] for c in WBC_CLASSES) if report.classified else report.count(CellKind.WBC)
    n_for_pct = n_wbc if report.classified else 0
    groups = {g: sum(k for c, k in counts.items() if FINE_TO_GROUP8.get(c) == g) for g in GROUPS8} if counts else {}
    types = {t: sum(k for c, k in counts.items() if FINE_TO_TYPE5.get(c) == t) for t in TYPES5} if counts else {}
    fine = _shares(counts, FINE_CLASSES, APART, n_for_pct, rcfg)
    n_platelet = n_plt + counts.get("PLATELET", 0)
    pcts = [fine[c].pct for c in WBC_CLASSES if fine[c].pct is not None]
    needed = cells_needed(pcts, rcfg.target_halfwidth_pct, rcfg.confidence)
    n_scored, n_novel = report.novelty_counts()
    d = Differential(
        slide=report.slide, n_fields=n_fields, n_wbc=n_wbc,
        n_unidentified=counts.get(UNIDENTIFIED) if report.classified else None,
        fine=fine, groups=_shares(groups, GROUPS8, GROUPS_APART, n_for_pct, rcfg),
        types=_shares(types, TYPES5, (), n_for_pct, rcfg),
        nrbc_per_100_wbc=round(100.0 * counts.get("ERB", 0) / n_wbc, 2) if report.classified and n_wbc else None,
        n_rbc=n_rbc, rbc_per_field=round(n_rbc / n_fields, 2) if n_fields else None,
        n_platelet=n_platelet, platelets_per_field=round(n_platelet / n_fields, 2) if n_fields else None,
        platelets_per_100_rbc=round(100.0 * n_platelet / n_rbc, 2) if n_rbc else None,
        n_skipped=len(report.skipped), n_wbc_detected=report.count(CellKind.WBC),
        wbc_needed=needed if report.classified else None,
        novel_share=round(n_novel / n_scored, 4) if n_scored else None, classified=report.classified,
        whole_slide=report.whole_slide)
    warnings = []
    if report.classified and n_wbc < rcfg.min_wbc:
        warnings.append(MESSAGES["few_wbc"].format(slide=report.slide, n_wbc=n_wbc, min_wbc=rcfg.min_wbc,
                                                   halfwidth=rcfg.target_halfwidth_pct,
                                                   confidence=rcfg.confidence, needed=needed))
    score, evidence, guard = domain_warnings(d, n_scored, n_novel, gcfg, report.evidence)
    return dataclasses.replace(
        d, domain_score=score, domain_evidence=evidence, domain_warnings=tuple(guard),
        warnings=tuple(warnings), flags=tuple(evaluate_flags(d, fcfg, rcfg.min_wbc) if fcfg else ()))


