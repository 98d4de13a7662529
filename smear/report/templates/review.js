/* smear review page: reclassify cells, recount the differential live (recount.js), sign off,
   export CSVs, keep work in progress in localStorage. Data is written into the page with
   textContent only, never as HTML. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("smear-data").textContent);
  const C = DATA.config;

  const { summarize, summaryCsv, csvSafe, csvText, fixed, pyFloat, pyG } = smearRecount(C);

  const CORRECTION_COLUMNS = ["slide", "field", "x0", "y0", "x1", "y1", "predicted_label", "prob",
    "corrected_label", "reviewer", "time"];

  // ------------------------------------------------------------ review state

  const slides = DATA.slides.map((s, i) => ({
    ...s, index: i, section: document.getElementById(`slide-${i}`), byId: new Map(s.cells.map((c) => [c.id, c])),
    order: new Map(s.cells.map((c, k) => [c.id, k])),
    state: { labels: {}, reviewed: {}, signoff: null },
  }));
  const REVIEWER_KEY = "smear-review:reviewer";
  const reviewerInput = document.getElementById("reviewer");
  const store = {
    get(key) { try { return JSON.parse(window.localStorage.getItem(key) || "null"); } catch (e) { return null; } },
    set(key, value) { try { window.localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode */ } },
    remove(key) { try { window.localStorage.removeItem(key); } catch (e) { /* private mode */ } },
  };
  const labelOf = (slide, id) => slide.state.labels[id] || slide.byId.get(id).label;
  const nowIso = () => new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const cellNode = (slide, id) => slide.section.querySelector(`.cell[data-id="${id}"]`);

  function counts(slide) {
    const out = { ...slide.base.counts };
    for (const [id, label] of Object.entries(slide.state.labels)) {
      const pred = slide.byId.get(id).label;
      out[pred] -= 1;
      out[label] = (out[label] || 0) + 1;
    }
    return out;
  }
  function save(slide) { store.set(slide.storage_key, slide.state); }

  function place(slide, id) {
    const node = cellNode(slide, id);
    if (!node) return;
    const label = labelOf(slide, id);
    const pred = slide.byId.get(id).label;
    const gallery = slide.section.querySelector(`.group[data-label="${label}"] .gallery`);
    const order = slide.order.get(id);
    const after = Array.from(gallery.children).find((el) => slide.order.get(el.dataset.id) > order);
    if (node.parentElement !== gallery || (after && node.nextElementSibling !== after)) gallery.insertBefore(node, after || null);
    node.dataset.label = label;
    node.classList.toggle("corrected", label !== pred);
    node.classList.toggle("reviewed", Boolean(slide.state.reviewed[id]));
    node.querySelector(".lab").textContent = label === pred ? label : `${label} (was ${pred})`;
  }

  function setLabel(slide, id, label) {
    const pred = slide.byId.get(id).label;
    if (!label) {  // back to predicted, not reviewed
      delete slide.state.labels[id];
      delete slide.state.reviewed[id];
    } else {
      if (label === pred) delete slide.state.labels[id]; else slide.state.labels[id] = label;
      slide.state.reviewed[id] = nowIso();
    }
    if (slide.state.signoff) slide.state.signoff.stale = true;
    save(slide);
    place(slide, id);
    refresh(slide);
  }

  function setText(el, text) { if (el) el.textContent = text; }
  function list(el, items, make, empty) {
    if (!el) return;
    el.replaceChildren(...items.map(make));
    if (!items.length && empty) el.appendChild(empty());
  }
  function li(text) { const e = document.createElement("li"); e.textContent = text; return e; }
  function para(cls, bold, text) {
    const p = document.createElement("p");
    p.className = cls;
    if (bold) { const b = document.createElement("b"); b.textContent = bold; p.append(b, " "); }
    p.append(text);
    return p;
  }
  const orNone = (v) => (v === null || v === undefined ? "None" : (Number.isInteger(v) ? String(v) : pyFloat(v)));

  function refresh(slide) {
    const sec = slide.section;
    const cnt = counts(slide);
    const row = summarize(slide.base, cnt);
    slide.row = row;
    if (!slide.base.classified) return;
    for (const tr of sec.querySelectorAll("table.summary tbody tr")) {
      const code = tr.dataset.code, pct = row[`${code}_pct`];
      setText(tr.querySelector(".n"), String(row[`${code}_n`]));
      setText(tr.querySelector(".pct"), pct === null ? "" : fixed(pct, 1));
      setText(tr.querySelector(".ci"), pct === null ? "" : `${fixed(row[`${code}_ci_low`], 1)} – ${fixed(row[`${code}_ci_high`], 1)}`);
      tr.classList.toggle("changed", row[`${code}_n`] !== (slide.base.counts[code] || 0));
    }
    list(sec.querySelector(".flags"), row.flags, li, () => li("none"));
    list(sec.querySelector(".warnings"), row.warnings, (w) => para("warn", "", w));
    list(sec.querySelector(".guards"), row.domain_warnings, (w) => para("guard", "Warning:", w));
    const extra = [["ARTEFACT", "not WBC / artefact"], ["SMUDGE", "smudge"]].filter(([c]) => cnt[c])
      .map(([c, name]) => `, ${cnt[c]} ${name}`).join("");
    setText(sec.querySelector(".counts"), `${row.n_fields} fields, ${row.n_wbc} WBC identified, ` +
      `${row.n_unidentified} unidentified (review queue)${extra}, ${row.n_rbc} RBC (${orNone(row.rbc_per_field)} per field), ` +
      `${row.n_platelet} platelets (${orNone(row.platelets_per_field)} per field, ${orNone(row.platelets_per_100_rbc)} per 100 RBC), ` +
      `NRBC ${orNone(row.nrbc_per_100_wbc)} per 100 WBC` + (row.n_skipped ? `, ${row.n_skipped} fields skipped` : ""));
    for (const group of sec.querySelectorAll(".group")) {
      const shown = group.querySelectorAll(".cell").length;
      setText(group.querySelector(".shown"), String(shown));
      setText(group.querySelector(".total"), String(cnt[group.dataset.label] || 0));
      group.classList.toggle("empty", shown === 0);
    }
    const left = slide.cells.filter((c) => !slide.state.reviewed[c.id]).length;
    setText(sec.querySelector(".n-left"), String(left));
    const so = slide.state.signoff, signed = sec.querySelector(".signed");
    if (signed) {
      signed.textContent = so ? `Signed off by ${so.name} at ${so.time}` + (so.left ? ` (${so.left} cells not reviewed)` : "") +
        (so.stale ? "; changed since: sign off again" : "") : "";
      signed.classList.toggle("stale", Boolean(so && so.stale));
    }
  }

  function signOff(slide) {
    const name = reviewerInput.value.trim();
    if (!name) { reviewerInput.focus(); reviewerInput.setCustomValidity("enter the reviewer's name"); reviewerInput.reportValidity(); return; }
    const left = slide.cells.filter((c) => !slide.state.reviewed[c.id]).length;
    slide.state.signoff = { name, time: nowIso(), left, stale: false };
    save(slide);
    refresh(slide);
  }

  function correctionRows(slide) {
    const who = slide.state.signoff ? slide.state.signoff.name : reviewerInput.value.trim();
    return slide.cells.filter((c) => slide.state.reviewed[c.id]).map((c) => [
      csvSafe(slide.base.slide), csvSafe(c.field), ...c.box.map(pyFloat), c.label, pyFloat(c.prob),
      labelOf(slide, c.id), csvSafe(who), slide.state.reviewed[c.id]]);
  }
  function correctionsCsv(slide) { return csvText(CORRECTION_COLUMNS, correctionRows(slide)); }

  function download(name, text) {
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
    const a = document.createElement("a");
    a.href = url;
    a.download = name.replace(/[\\/:*?"<>|\x00-\x1f]/g, "_");
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ------------------------------------------------------------ navigation, menu, keys

  let current = null;  // {slide, id}
  const menu = document.getElementById("menu");
  const keyToLabel = Object.fromEntries(DATA.keys.map((k) => [k.key, k.code]));

  function mark(slide, id) {
    document.querySelectorAll(".cell.current").forEach((el) => el.classList.remove("current"));
    current = { slide, id };
    const node = cellNode(slide, id);
    if (node) node.classList.add("current");
    return node;
  }
  function select(slide, id, openMenu) {
    const node = mark(slide, id);
    if (!node) return;
    node.focus({ preventScroll: false });
    if (openMenu) showMenu(node); else hideMenu();
  }
  function showMenu(node) {
    const r = node.getBoundingClientRect();
    const label = labelOf(current.slide, current.id);
    for (const b of menu.querySelectorAll("button")) b.classList.toggle("is-current", b.dataset.label === label);
    menu.hidden = false;
    menu.style.left = `${Math.min(window.scrollX + r.right + 4, window.scrollX + document.documentElement.clientWidth - menu.offsetWidth - 8)}px`;
    menu.style.top = `${window.scrollY + r.top}px`;
  }
  function hideMenu() { menu.hidden = true; }
  function step(slide, id, delta, unreviewedOnly) {
    const ids = slide.cells.map((c) => c.id);
    let i = ids.indexOf(id);
    for (let n = 0; n < ids.length; n++) {
      i += delta;
      if (i < 0 || i >= ids.length) return null;
      if (!unreviewedOnly || !slide.state.reviewed[ids[i]]) return ids[i];
    }
    return null;
  }
  function advance(slide, id) {
    const next = step(slide, id, 1, true) || step(slide, id, 1, false);
    if (next) select(slide, next, false); else select(slide, id, false);
  }
  function fromNode(node) {
    const sec = node.closest("section.slide");
    return { slide: slides[Number(sec.dataset.slide)], id: node.dataset.id };
  }
  function firstCell() {
    for (const s of slides) {
      const c = s.cells.find((x) => !s.state.reviewed[x.id]) || s.cells[0];
      if (c) return { slide: s, id: c.id };
    }
    return null;
  }

  document.addEventListener("click", (ev) => {
    const item = ev.target.closest("#menu button");
    if (item && current) { setLabel(current.slide, current.id, item.dataset.label); advance(current.slide, current.id); hideMenu(); return; }
    const cell = ev.target.closest(".cell");
    if (cell) { const { slide, id } = fromNode(cell); select(slide, id, true); return; }
    if (!ev.target.closest("#menu")) hideMenu();
  });
  document.addEventListener("focusin", (ev) => {
    const cell = ev.target.closest && ev.target.closest(".cell");
    if (cell) { const { slide, id } = fromNode(cell); mark(slide, id); }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest && ev.target.closest("input, textarea, select")) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const key = ev.key;
    if ((key === "Enter" || key === " ") && ev.target.closest && ev.target.closest("button")) return;  // press it
    if (key === "Escape") { hideMenu(); return; }
    const nav = { j: 1, ArrowRight: 1, k: -1, ArrowLeft: -1 }[key];
    if (!current && (nav || key in keyToLabel)) { const f = firstCell(); if (f) select(f.slide, f.id, false); if (nav) { ev.preventDefault(); return; } }
    if (!current) return;
    const { slide, id } = current;
    if (nav) {
      const next = step(slide, id, nav, false);
      if (next) select(slide, next, false);
      ev.preventDefault();
    } else if (key in keyToLabel) {
      setLabel(slide, id, keyToLabel[key]); advance(slide, id); hideMenu(); ev.preventDefault();
    } else if (key === "Enter" || key === " ") {
      setLabel(slide, id, labelOf(slide, id)); advance(slide, id); hideMenu(); ev.preventDefault();
    } else if (key === "Backspace") {
      setLabel(slide, id, ""); select(slide, id, false); ev.preventDefault();
    }
  });

  for (const slide of slides) {
    const sec = slide.section;
    if (!sec || !slide.base.classified) continue;
    sec.querySelector(".signoff").addEventListener("click", () => signOff(slide));
    sec.querySelector(".dl-reviewed").addEventListener("click", () => download(`${slide.base.slide}_reviewed.csv`, summaryCsv(slide.row)));
    sec.querySelector(".dl-corrections").addEventListener("click", () => download(`${slide.base.slide}_corrections.csv`, correctionsCsv(slide)));
  }
  reviewerInput.value = store.get(REVIEWER_KEY) || "";
  reviewerInput.addEventListener("input", () => { reviewerInput.setCustomValidity(""); store.set(REVIEWER_KEY, reviewerInput.value); });
  document.getElementById("reset").addEventListener("click", () => {
    if (!window.confirm("Forget every correction, review mark and sign-off on this page?")) return;
    for (const slide of slides) {
      store.remove(slide.storage_key);
      slide.state = { labels: {}, reviewed: {}, signoff: null };
      for (const c of slide.cells) place(slide, c.id);
      refresh(slide);
    }
  });

  // restore work in progress
  for (const slide of slides) {
    const saved = store.get(slide.storage_key);
    if (saved && typeof saved === "object") {
      const labels = {}, reviewed = {};
      for (const [id, label] of Object.entries(saved.labels || {})) if (slide.byId.has(id) && DATA.gallery_order.includes(label)) labels[id] = label;
      for (const [id, t] of Object.entries(saved.reviewed || {})) if (slide.byId.has(id)) reviewed[id] = String(t);
      slide.state = { labels, reviewed, signoff: saved.signoff || null };
    }
    for (const c of slide.cells) place(slide, c.id);
    refresh(slide);
  }

  window.smearReview = { summarize, summaryCsv, correctionsCsv: (i) => correctionsCsv(slides[i]), slides, fixed, pyG, pyFloat };
})();
