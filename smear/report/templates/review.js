/* smear review page: reclassify cells, recount the differential live (recount.js), sign off,
   export CSVs, keep work in progress in localStorage. Data is written into the page with
   textContent only, never as HTML. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("smear-data").textContent);
  const C = DATA.config;

  const { summarize, summaryValues, csvText, num, fixed, pyFloat, pyG } = smearRecount(C);

  const CORRECTION_COLUMNS = ["slide", "field", "x0", "y0", "x1", "y1", "predicted_label", "prob",
    "corrected_label", "reviewer", "time"];
  const UNIDENTIFIED = C.unidentified;
  const REVIEW_LABELS = new Set(DATA.keys.map((k) => k.code));
  const ISO_TIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/;

  // ------------------------------------------------------------ review state

  const freshState = (slide) => ({ page: slide.storage_key, labels: {}, reviewed: {}, signoff: null, expanded: [] });
  const slides = DATA.slides.map((s, i) => {
    const section = document.getElementById(`slide-${i}`);
    const slide = {
      ...s, index: i, section, byId: new Map(s.cells.map((c) => [c.id, c])),
      order: new Map(s.cells.map((c, k) => [c.id, k])),
      rendered: new Set(section ? Array.from(section.querySelectorAll(".cell"), (el) => el.dataset.id) : []),
    };
    slide.state = freshState(slide);
    return slide;
  });
  const REVIEWER_KEY = "smear-review:reviewer";
  const reviewerInput = document.getElementById("reviewer");
  const store = {
    get(key) { try { return JSON.parse(window.localStorage.getItem(key) || "null"); } catch (e) { return null; } },
    set(key, value) { try { window.localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode */ } },
    remove(key) { try { window.localStorage.removeItem(key); } catch (e) { /* private mode */ } },
  };
  const labelOf = (slide, id) => slide.state.labels[id] || slide.byId.get(id).label;
  const nowIso = () => new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const cellNode = (slide, id) => (slide.rendered.has(id) ? slide.section.querySelector(`.cell[data-id="${id}"]`) : null);
  const galleryOf = (slide, label) => slide.section.querySelector(`.group[data-label="${label}"] .gallery`);

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

  /* a short digest of the corrections and review marks, which a sign-off stamps */
  function digest(state) {
    const text = JSON.stringify([Object.entries(state.labels).sort(), Object.entries(state.reviewed).sort()]);
    let h = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 0x01000193) >>> 0; }
    return h.toString(16).padStart(8, "0");
  }

  /* the saved state of a slide if it belongs to this page and every entry names one of its cells
     with a valid class or time; else null (a state from another page, or edited by hand, is refused) */
  function validState(slide, saved) {
    const plain = (o) => o !== null && typeof o === "object" && !Array.isArray(o);
    if (!plain(saved) || saved.page !== slide.storage_key || !plain(saved.labels) || !plain(saved.reviewed)) return null;
    const labels = {}, reviewed = {};
    for (const [id, label] of Object.entries(saved.reviewed)) {
      if (!slide.byId.has(id) || typeof label !== "string" || !ISO_TIME.test(label)) return null;
      reviewed[id] = label;
    }
    for (const [id, label] of Object.entries(saved.labels)) {
      if (!slide.byId.has(id) || !REVIEW_LABELS.has(label) || label === slide.byId.get(id).label || !reviewed[id]) return null;
      labels[id] = label;
    }
    const expanded = Array.isArray(saved.expanded) ? saved.expanded : [];
    if (!expanded.every((l) => DATA.gallery_order.includes(l))) return null;
    const state = { page: slide.storage_key, labels, reviewed, signoff: null, expanded: [...new Set(expanded)] };
    const so = saved.signoff;
    if (so !== null && so !== undefined) {
      const whole = (v) => Number.isInteger(v) && v >= 0 && v <= slide.cells.length;
      if (!plain(so) || typeof so.name !== "string" || !so.name.trim() || so.name.length > 200 ||
          typeof so.time !== "string" || !ISO_TIME.test(so.time) || typeof so.stale !== "boolean" ||
          !["total", "reviewed", "changed", "never_shown", "never_reviewed"].every((k) => whole(so[k])) ||
          so.total !== slide.cells.length || so.reviewed + so.never_reviewed !== so.total) return null;
      if (!so.stale && (so.digest !== digest(state) || so.reviewed !== Object.keys(reviewed).length ||
                        so.changed !== Object.keys(labels).length)) return null;
      state.signoff = { name: so.name, time: so.time, total: so.total, reviewed: so.reviewed, changed: so.changed,
        never_shown: so.never_shown, never_reviewed: so.never_reviewed, stale: so.stale, digest: String(so.digest) };
    }
    return state;
  }

  function figure(slide, cell) {
    const extra = slide.more[cell.id];
    const fig = document.createElement("figure");
    fig.className = "cell";
    fig.tabIndex = 0;
    fig.dataset.id = cell.id;
    fig.dataset.label = cell.label;
    const img = document.createElement("img");
    img.alt = `cell of ${cell.field}`;
    img.src = extra.src;
    img.width = 96; img.height = 96; img.decoding = "async";
    const cap = document.createElement("figcaption");
    const span = (cls, text) => { const e = document.createElement("span"); e.className = cls; e.textContent = text; return e; };
    cap.append(span("lab", cell.label), " ", span("p", fixed(cell.prob, 2)));
    if (extra.nc !== null && extra.nc !== undefined) cap.append(" ", span("nc", `N:C ${fixed(extra.nc, 2)}`));
    const fname = span("fname", "");
    if (extra.pos) {  // a whole-slide tile: the field name links to the tile, its position in the title
      const a = document.createElement("a");
      a.className = "pos"; a.href = `#${extra.anchor}`; a.title = extra.pos; a.textContent = cell.field;
      fname.appendChild(a);
    } else fname.textContent = cell.field;
    cap.append(document.createElement("br"), fname);
    const tip = document.createElement("div");
    tip.className = "tip";
    tip.setAttribute("role", "tooltip");
    for (const [code, p] of extra.top3) { const d = document.createElement("div"); d.textContent = `${code} ${fixed(p, 2)}`; tip.appendChild(d); }
    fig.append(img, cap, tip);
    return fig;
  }

  /* make figures for these cells (in queue order) and put each into its class's gallery in queue
     order, leaving the figures already there where they are */
  function render(slide, cells) {
    const byGallery = new Map();
    for (const c of cells) {
      const gallery = galleryOf(slide, labelOf(slide, c.id));
      if (!byGallery.has(gallery)) byGallery.set(gallery, []);
      byGallery.get(gallery).push(c);
      slide.rendered.add(c.id);
    }
    for (const [gallery, list] of byGallery) {
      let child = gallery.firstElementChild;
      for (const c of list) {
        const order = slide.order.get(c.id);
        while (child && slide.order.get(child.dataset.id) < order) child = child.nextElementSibling;
        gallery.insertBefore(figure(slide, c), child);
      }
    }
  }

  /* show every cell of these labels that the page holds as data only */
  function showCells(slide, labels, remember) {
    const want = new Set(labels);
    render(slide, slide.cells.filter((c) => !slide.rendered.has(c.id) && want.has(labelOf(slide, c.id))));
    if (remember) {
      slide.state.expanded = [...new Set([...slide.state.expanded, ...labels])];
      save(slide);
    }
    for (const c of slide.cells) if (want.has(labelOf(slide, c.id))) place(slide, c.id);
    refresh(slide);
  }

  function place(slide, id) {
    const node = cellNode(slide, id);
    if (!node) return;
    const label = labelOf(slide, id);
    const pred = slide.byId.get(id).label;
    const gallery = galleryOf(slide, label);
    const order = slide.order.get(id), rank = (el) => (el ? slide.order.get(el.dataset.id) : null);
    const prev = rank(node.previousElementSibling), next = rank(node.nextElementSibling);
    if (node.parentElement !== gallery || (prev !== null && prev > order) || (next !== null && next < order)) {
      const after = Array.from(gallery.children).find((el) => el !== node && rank(el) > order);
      gallery.insertBefore(node, after || null);
    }
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

  /* where the review stands: cells in all, reviewed, changed, never shown, never reviewed */
  function tally(slide) {
    const total = slide.cells.length, reviewed = Object.keys(slide.state.reviewed).length;
    return { total, reviewed, changed: Object.keys(slide.state.labels).length,
      never_shown: total - slide.rendered.size, never_reviewed: total - reviewed };
  }
  /* the classes whose cells a sign-off needs reviewed: UNIDENTIFIED and those of the raised flags */
  function requiredLabels(slide) {
    const out = new Set([UNIDENTIFIED]);
    for (const key of (slide.row && slide.row.flag_keys) || []) for (const c of DATA.flag_classes[key] || []) out.add(c);
    return out;
  }
  function unreviewedRequired(slide) {
    const need = requiredLabels(slide);
    return slide.cells.filter((c) => !slide.state.reviewed[c.id] && need.has(labelOf(slide, c.id)));
  }
  function signedText(so) {
    return `Signed off by ${so.name} at ${so.time}: ${so.reviewed} of ${so.total} cells reviewed, ${so.changed} changed; ` +
      `${so.never_shown} never shown, ${so.never_reviewed} never reviewed` + (so.stale ? "; changed since: sign off again" : "");
  }

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
    const hidden = {};
    for (const c of slide.cells) if (!slide.rendered.has(c.id)) hidden[labelOf(slide, c.id)] = (hidden[labelOf(slide, c.id)] || 0) + 1;
    for (const group of sec.querySelectorAll(".group")) {
      const shown = group.querySelectorAll(".cell").length;
      setText(group.querySelector(".shown"), String(shown));
      setText(group.querySelector(".total"), String(cnt[group.dataset.label] || 0));
      group.classList.toggle("empty", shown === 0 && !hidden[group.dataset.label]);
      const more = group.querySelector(".show-all");
      if (more) more.hidden = !hidden[group.dataset.label];
    }
    const t = tally(slide);
    setText(sec.querySelector(".n-left"), String(t.never_reviewed));
    setText(sec.querySelector(".n-hidden"), String(t.never_shown));
    const every = sec.querySelector(".show-every");
    if (every) every.hidden = t.never_shown === 0;
    const so = slide.state.signoff, signed = sec.querySelector(".signed");
    if (signed) {
      signed.textContent = so ? signedText(so) : "";
      signed.classList.toggle("stale", Boolean(so && so.stale));
      signed.classList.remove("need");
    }
  }

  function signOff(slide) {
    const name = reviewerInput.value.trim();
    if (!name) { reviewerInput.focus(); reviewerInput.setCustomValidity("enter the reviewer's name"); reviewerInput.reportValidity(); return; }
    if (DATA.require_review) {
      const missing = unreviewedRequired(slide);
      if (missing.length) {
        const by = {};
        for (const c of missing) by[labelOf(slide, c.id)] = (by[labelOf(slide, c.id)] || 0) + 1;
        showCells(slide, Object.keys(by), true);  // every one of them on screen
        const signed = slide.section.querySelector(".signed");
        signed.textContent = `Not signed off: review every UNIDENTIFIED cell and every cell of a flagged class first ` +
          `(${missing.length} left: ${Object.entries(by).map(([l, n]) => `${n} ${l}`).join(", ")})`;
        signed.classList.add("need");
        return;
      }
    }
    slide.state.signoff = { name, time: nowIso(), ...tally(slide), stale: false, digest: digest(slide.state) };
    save(slide);
    refresh(slide);
  }

  function correctionRows(slide) {
    const who = slide.state.signoff ? slide.state.signoff.name : reviewerInput.value.trim();
    return slide.cells.filter((c) => slide.state.reviewed[c.id]).map((c) => [
      slide.base.slide, c.field, ...c.box.map((v) => num(pyFloat(v))), c.label, num(pyFloat(c.prob)),
      labelOf(slide, c.id), who, slide.state.reviewed[c.id]]);
  }
  function correctionsCsv(slide) { return csvText(CORRECTION_COLUMNS, correctionRows(slide)); }

  /* <slide>_reviewed.csv: the CSV report's columns (the corrected differential), then who signed off
     when, how far the review reached, and the models and smear version from the page's header */
  function reviewedCsv(slide) {
    const so = slide.state.signoff && !slide.state.signoff.stale ? slide.state.signoff : null;
    const t = so || tally(slide);
    const audit = { reviewer: so ? so.name : reviewerInput.value.trim(), signed_off_utc: so ? so.time : "",
      cells_total: num(String(t.total)), cells_reviewed: num(String(t.reviewed)), cells_changed: num(String(t.changed)),
      cells_never_shown: num(String(t.never_shown)), cells_never_reviewed: num(String(t.never_reviewed)), ...DATA.audit };
    const columns = [...C.columns, ...DATA.audit_columns, ...Object.keys(DATA.audit).filter((k) => !DATA.audit_columns.includes(k))];
    const values = [...summaryValues(slide.row), ...columns.slice(C.columns.length).map((k) => audit[k])];
    return csvText(columns, [values]);
  }

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
  /* the cells of a slide as they are on screen (document order of the shown figures) */
  function onScreen(slide) { return Array.from(slide.section.querySelectorAll(".cell"), (el) => el.dataset.id); }
  function step(slide, id, delta, unreviewedOnly) {
    const ids = onScreen(slide);
    let i = ids.indexOf(id);
    if (i < 0) return null;
    for (let n = 0; n < ids.length; n++) {
      i += delta;
      if (i < 0 || i >= ids.length) return null;
      if (!unreviewedOnly || !slide.state.reviewed[ids[i]]) return ids[i];
    }
    return null;
  }
  /* the cell to go to once this one is decided: the next unreviewed one on screen, else the next */
  function nextAfter(slide, id) {
    return step(slide, id, 1, true) || step(slide, id, 1, false) || id;
  }
  function decide(slide, id, label) {
    const next = nextAfter(slide, id);  // before the cell moves to its new class
    setLabel(slide, id, label);
    select(slide, next, false);
    hideMenu();
  }
  function fromNode(node) {
    const sec = node.closest("section.slide");
    return { slide: slides[Number(sec.dataset.slide)], id: node.dataset.id };
  }
  function firstCell() {
    for (const s of slides) {
      if (!s.section) continue;
      const ids = onScreen(s);
      const c = ids.find((x) => !s.state.reviewed[x]) || ids[0];
      if (c) return { slide: s, id: c };
    }
    return null;
  }

  document.addEventListener("click", (ev) => {
    const item = ev.target.closest("#menu button");
    if (item && current) { decide(current.slide, current.id, item.dataset.label); return; }
    const more = ev.target.closest(".show-all, .show-every");
    if (more) {
      const slide = slides[Number(more.closest("section.slide").dataset.slide)];
      showCells(slide, more.classList.contains("show-all") ? [more.closest(".group").dataset.label] : DATA.gallery_order, true);
      return;
    }
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
      decide(slide, id, keyToLabel[key]); ev.preventDefault();
    } else if (key === "Enter" || key === " ") {
      decide(slide, id, labelOf(slide, id)); ev.preventDefault();
    } else if (key === "Backspace") {
      setLabel(slide, id, ""); select(slide, id, false); ev.preventDefault();
    }
  });

  for (const slide of slides) {
    const sec = slide.section;
    if (!sec || !slide.base.classified) continue;
    sec.querySelector(".signoff").addEventListener("click", () => signOff(slide));
    sec.querySelector(".dl-reviewed").addEventListener("click", () => download(`${slide.base.slide}_reviewed.csv`, reviewedCsv(slide)));
    sec.querySelector(".dl-corrections").addEventListener("click", () => download(`${slide.base.slide}_corrections.csv`, correctionsCsv(slide)));
  }
  reviewerInput.value = store.get(REVIEWER_KEY) || "";
  reviewerInput.addEventListener("input", () => { reviewerInput.setCustomValidity(""); store.set(REVIEWER_KEY, reviewerInput.value); });
  document.getElementById("reset").addEventListener("click", () => {
    if (!window.confirm("Forget every correction, review mark and sign-off on this page?")) return;
    for (const slide of slides) {
      store.remove(slide.storage_key);
      slide.state = freshState(slide);
      if (!slide.section) continue;
      for (const c of slide.cells) place(slide, c.id);
      refresh(slide);
    }
  });

  // restore work in progress: only a state made for this page's cells
  const refused = [];
  for (const slide of slides) {
    if (!slide.section) continue;
    const saved = store.get(slide.storage_key);
    if (saved !== null) {
      const state = validState(slide, saved);
      if (state) slide.state = state; else refused.push(slide.base.slide);
    }
    const withState = new Set([...Object.keys(slide.state.labels), ...Object.keys(slide.state.reviewed)]);
    render(slide, slide.cells.filter((c) => !slide.rendered.has(c.id) && withState.has(c.id)));  // on screen again
    if (slide.state.expanded.length) showCells(slide, slide.state.expanded, false);
    for (const c of slide.cells) place(slide, c.id);
    refresh(slide);
  }
  if (refused.length) {
    const note = document.getElementById("refused");
    note.textContent = `a saved review of ${refused.join(", ")} does not match this page's cells and was not restored`;
    note.hidden = false;
  }

  window.smearReview = { summarize, summaryCsv: (row) => csvText(C.columns, [summaryValues(row)]),
    correctionsCsv: (i) => correctionsCsv(slides[i]), reviewedCsv: (i) => reviewedCsv(slides[i]),
    validState: (i, state) => validState(slides[i], state) !== null, tally: (i) => tally(slides[i]),
    slides, fixed, pyG, pyFloat };
})();
