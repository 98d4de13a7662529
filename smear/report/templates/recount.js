/* The differential recounted in the browser, as smear/report/summary.py counts it (differential,
   proportion_ci, cells_needed) and report.to_csv writes it, with the thresholds, z values and CSV
   columns the Python report used (C, from the page's #smear-data). The flag and guard rules and every
   message are data from summary.py (C.quantities, C.flag_rules, C.implausible_rules, C.messages):
   this file interprets them, and fills the str.format templates as Python does, so the two agree to
   the byte. */
function smearRecount(C) {
  "use strict";
  // ------------------------------------------------------------ numbers as Python prints them

  /* x rounded to nd decimals as a string, half to even on the exact binary value: Python's
     format(x, ".Nf") and round(x, N) (toFixed(100) is the exact decimal expansion of a double). */
  function fixed(x, nd) {
    if (!isFinite(x)) return String(x);
    const neg = x < 0 || Object.is(x, -0);
    const s = Math.abs(x).toFixed(100);
    const dot = s.indexOf(".");
    const digits = (s.slice(0, dot) + s.slice(dot + 1, dot + 1 + nd)).split("").map(Number);
    const rest = s.slice(dot + 1 + nd);
    const last = digits.length ? digits[digits.length - 1] : 0;
    let up = false;
    if (rest[0] > "5") up = true;
    else if (rest[0] === "5") up = /[1-9]/.test(rest.slice(1)) || last % 2 === 1;
    if (up) {
      let i = digits.length - 1;
      while (i >= 0 && digits[i] === 9) { digits[i] = 0; i--; }
      if (i < 0) digits.unshift(1); else digits[i] += 1;
    }
    const all = digits.join("");
    const intPart = all.slice(0, all.length - nd) || "0";
    const out = nd ? intPart + "." + all.slice(all.length - nd) : intPart;
    return (neg ? "-" : "") + out;
  }
  function pyRound(x, nd) { return Number(fixed(x, nd)); }
  /* str() of a Python float: shortest repr, with ".0" on whole numbers */
  function pyFloat(x) {
    if (Number.isInteger(x) && Math.abs(x) < 1e16) return x.toFixed(1);
    const s = String(x);
    const m = /^(-?[\d.]+)e([+-])(\d+)$/.exec(s);
    return m ? `${m[1]}e${m[2]}${m[3].padStart(2, "0")}` : s;
  }
  /* Python's format(x, "g") */
  function pyG(x) {
    if (x === 0) return "0";
    const [mant, e] = x.toExponential(5).split("e");
    const exp = Number(e);
    const strip = (t) => (t.indexOf(".") >= 0 ? t.replace(/0+$/, "").replace(/\.$/, "") : t);
    if (exp < -4 || exp >= 6) return `${strip(mant)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
    return strip(x.toFixed(Math.max(0, 5 - exp)));
  }
  /* A float for format(): JSON drops a float's ".0", so a value that Python holds as a float and
     prints with str() is given as F(x); plain numbers are ints. */
  const F = (x) => ({ float: x });
  /* A str.format template filled as Python fills it: {name} (text as it is, an int's digits, F(x) as
     Python's str of a float, null as None), {name:.Nf}, {name:g} and {name:.N%}. */
  function format(template, vars) {
    return template.replace(/\{(\w+)(?::([^}]*))?\}/g, (_, name, spec) => {
      if (!(name in vars)) throw new Error(`no value for {${name}} in "${template}"`);
      let v = vars[name];
      const isFloat = v !== null && typeof v === "object" && "float" in v;
      if (isFloat) v = v.float;
      let m;
      if (!spec) return v === null ? "None" : isFloat ? pyFloat(v) : String(v);
      if ((m = /^\.(\d+)f$/.exec(spec))) return fixed(v, Number(m[1]));
      if (spec === "g") return pyG(v);
      if ((m = /^\.(\d+)%$/.exec(spec))) return fixed(v * 100, Number(m[1])) + "%";
      throw new Error(`format spec "${spec}" in "${template}" is not interpreted here`);
    });
  }

  // ------------------------------------------------------------ confidence intervals (scipy's binomtest)

  function wilson(k, n, z) {
    const p = k / n, q = 1 - p;
    const denom = 2 * (n + z ** 2);
    const center = (2 * n * p + z ** 2) / denom;
    const delta = z / denom * Math.sqrt(4 * n * p * q + z ** 2);
    return [k === 0 ? 0.0 : center - delta, k === n ? 1.0 : center + delta];
  }
  function logGamma(x) {  // Lanczos, g=7
    const g = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
      -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6,
      1.5056327351493116e-7];
    if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - logGamma(1 - x);
    x -= 1;
    let a = g[0];
    const t = x + 7.5;
    for (let i = 1; i < 9; i++) a += g[i] / (x + i);
    return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
  }
  function betacf(a, b, x) {  // continued fraction of the incomplete beta (Numerical Recipes)
    const tiny = 1e-300;
    let c = 1, d = 1 - (a + b) * x / (a + 1);
    d = Math.abs(d) < tiny ? tiny : d;
    d = 1 / d;
    let h = d;
    for (let m = 1; m <= 500; m++) {
      const m2 = 2 * m;
      let aa = m * (b - m) * x / ((a + m2 - 1) * (a + m2));
      d = 1 + aa * d; d = Math.abs(d) < tiny ? tiny : d; c = 1 + aa / c; c = Math.abs(c) < tiny ? tiny : c;
      d = 1 / d; h *= d * c;
      aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1));
      d = 1 + aa * d; d = Math.abs(d) < tiny ? tiny : d; c = 1 + aa / c; c = Math.abs(c) < tiny ? tiny : c;
      d = 1 / d;
      const del = d * c;
      h *= del;
      if (Math.abs(del - 1) < 1e-16) break;
    }
    return h;
  }
  function betaInc(a, b, x) {
    if (x <= 0) return 0;
    if (x >= 1) return 1;
    const front = Math.exp(logGamma(a + b) - logGamma(a) - logGamma(b) + a * Math.log(x) + b * Math.log(1 - x));
    return x < (a + 1) / (a + b + 2) ? front * betacf(a, b, x) / a : 1 - front * betacf(b, a, 1 - x) / b;
  }
  function betaPpf(q, a, b) {
    let lo = 0, hi = 1;
    for (let i = 0; i < 200 && hi - lo > 1e-17; i++) {
      const mid = (lo + hi) / 2;
      if (betaInc(a, b, mid) < q) lo = mid; else hi = mid;
    }
    return (lo + hi) / 2;
  }
  function clopperPearson(k, n, confidence) {
    const alpha = (1 - confidence) / 2;
    return [k === 0 ? 0.0 : betaPpf(alpha, k, n - k + 1), k === n ? 1.0 : betaPpf(1 - alpha, k + 1, n - k)];
  }
  /* summary.proportion_ci: the interval of k/n in percent */
  function proportionCi(k, n, rcfg) {
    if (n <= 0) return [NaN, NaN];
    const [lo, hi] = rcfg.ci_method === "exact" ? clopperPearson(k, n, rcfg.confidence) : wilson(k, n, C.z_ci);
    return [100.0 * lo, 100.0 * hi];
  }
  function cellsNeeded(pcts, halfwidthPct) {
    const z = C.z_needed;
    let pq = pcts.length ? Math.max(...pcts.map((p) => (p / 100.0) * (1 - p / 100.0))) : 0.25;
    pq = pq || 0.25;
    return Math.ceil(z * z * pq / (halfwidthPct / 100.0) ** 2);
  }

  // ------------------------------------------------------------ the summary row (summary.differential)

  function view(row, counts, names, apart, n, prefix, classified) {
    for (const name of names) {
      const k = classified ? (counts[name] || 0) : null;
      row[`${prefix}${name}_n`] = k;
      if (apart.includes(name) || n === 0 || k === null) {
        row[`${prefix}${name}_pct`] = row[`${prefix}${name}_ci_low`] = row[`${prefix}${name}_ci_high`] = null;
        continue;
      }
      const [low, high] = proportionCi(k, n, C.report);
      row[`${prefix}${name}_pct`] = pyRound(100.0 * k / n, 2);
      row[`${prefix}${name}_ci_low`] = pyRound(low, 2);
      row[`${prefix}${name}_ci_high`] = pyRound(high, 2);
    }
  }
  function sumBy(counts, map, key) {
    let s = 0;
    for (const [c, k] of Object.entries(counts)) if (map[c] === key) s += k;
    return s;
  }
  /* summary.quantities: what the rules read, each fine class's percentage (0 when none), nrbc and the
     sums of C.quantities (left to right from 0, as Python's sum) */
  function quantities(row) {
    const q = {};
    for (const c of C.fine) q[c] = row[`${c}_pct`] || 0.0;
    q.nrbc = row.nrbc_per_100_wbc || 0.0;
    for (const [name, terms] of C.quantities) q[name] = terms.reduce((s, t) => s + q[t], 0);
    return q;
  }
  /* summary.evaluate_flags over C.flag_rules; row.flag_keys: the flags raised (the page asks for
     their classes' cells) */
  function evaluateFlags(row, fcfg, minWbc) {
    row.flag_keys = [];
    if (!row.classified) return [];
    const flags = [];
    const n = row.n_wbc;
    if (n < minWbc) flags.push(format(C.messages.too_few, { n, min_wbc: minWbc }));
    if (n === 0) return flags;
    const q = quantities(row);
    for (const [key, name, side, text] of C.flag_rules) {
      const threshold = fcfg[key];
      if (side === "above" ? q[name] > threshold : q[name] < threshold) {
        flags.push(format(text, { value: F(q[name]) }));
        row.flag_keys.push(key);
      }
    }
    return flags;
  }
  const CAP = 99.0;  /* summary.EVIDENCE_CAP */
  function ratio(value, threshold) { return threshold <= 0 ? CAP : Math.min(CAP, value / threshold); }
  /* summary.implausible_differential over C.implausible_rules */
  function implausible(row, ic) {
    if (!row.classified || !row.n_wbc) return [];
    const q = quantities(row), vars = {};
    for (const [name, v] of Object.entries(q)) vars[name] = F(v);
    return C.implausible_rules.map(([terms, text]) => {
      const ratios = terms.map(([name, key, side]) => side === "above" ? ratio(q[name], ic[key]) : ratio(ic[key], q[name]));
      return [pyRound(Math.min(...ratios), 4), format(text, vars)];
    });
  }
  /* summary.domain_warnings: [score, evidence, warnings] */
  function domainWarnings(row, nScored, nNovel, g, fitted) {
    const out = [], advice = C.advice, evidence = {}, limit = g.max_domain_score;
    let seen = [];
    if (nScored >= g.min_scored) evidence.novel_share = pyRound(ratio(nNovel / nScored, g.max_novel_share), 4);
    if (row.classified && row.n_wbc >= g.min_cells) {
      const rules = implausible(row, g.implausible);
      evidence.differential = Math.max(...rules.map(([r]) => r));
      seen = rules.filter(([r]) => r > limit).map(([, text]) => text);
    }
    Object.assign(evidence, fitted || {});
    const values = Object.values(evidence);
    const score = values.length ? Math.max(...values) : null;
    if (score !== null && score > limit) {
      const fired = Object.entries(evidence).filter(([, v]) => v > limit)
        .sort((a, b) => (b[1] - a[1]) || (a[0] < b[0] ? 1 : a[0] > b[0] ? -1 : 0));
      const M = C.messages;
      const why = fired.map(([k, v]) => {
        let detail = "";
        if (k === "novel_share") detail = format(M.why_novel, { n_novel: nNovel, n_scored: nScored, share: F(100.0 * nNovel / nScored) });
        else if (k === "differential") detail = format(M.why_differential, { seen: seen.join("; ") });
        return format(M.why, { meaning: C.evidence_text[k] || k, detail, key: k, ratio: F(v) });
      });
      out.push(format(M.domain, { score: F(score), limit: F(limit), why: why.join("; "), advice }));
    }
    const nrbc = row.nrbc_per_100_wbc;
    if (nrbc !== null && nrbc !== undefined && nrbc > g.max_nrbc_per_100_wbc) {
      out.push(format(C.messages.nrbc_ceiling, { nrbc: F(nrbc), ceiling: F(g.max_nrbc_per_100_wbc), advice }));
    }
    const nRbc = row.n_rbc || 0, nWbc = row.n_wbc_detected || 0;
    if (nRbc >= g.min_rbc && nWbc / nRbc > g.max_wbc_per_rbc) {
      out.push(format(C.messages.wbc_boxes, { n_wbc: nWbc, n_rbc: nRbc, advice }));
    }
    return [score === null ? null : pyRound(score, 4), evidence, out];
  }
  /* The summary row of a slide from its fixed counts (base) and its label counts. */
  function summarize(base, counts) {
    const rcfg = C.report, classified = base.classified;
    const row = { slide: base.slide, n_fields: base.n_fields };
    const nFields = base.n_fields, nRbc = base.n_rbc;
    const nWbc = classified ? C.wbc.reduce((s, c) => s + (counts[c] || 0), 0) : base.n_wbc_detected;
    row.n_wbc = nWbc;
    row.n_unidentified = classified ? (counts[C.unidentified] || 0) : null;
    const nPct = classified ? nWbc : 0;
    view(row, counts, C.fine, C.apart, nPct, "", classified);
    const groups = {}, types = {};
    for (const g of C.groups) groups[g] = sumBy(counts, C.to_group, g);
    for (const t of C.types) types[t] = sumBy(counts, C.to_type, t);
    view(row, groups, C.groups, C.groups_apart, nPct, "group_", classified);
    view(row, types, C.types, [], nPct, "type_", classified);
    row.nrbc_per_100_wbc = classified && nWbc ? pyRound(100.0 * (counts.ERB || 0) / nWbc, 2) : null;
    row.n_rbc = nRbc;
    row.rbc_per_field = nFields ? pyRound(nRbc / nFields, 2) : null;
    row.n_platelet = base.n_platelet_detected + (counts.PLATELET || 0);
    row.platelets_per_field = nFields ? pyRound(row.n_platelet / nFields, 2) : null;
    row.platelets_per_100_rbc = nRbc ? pyRound(100.0 * row.n_platelet / nRbc, 2) : null;
    row.n_skipped = base.n_skipped;
    row.n_wbc_detected = base.n_wbc_detected;
    const pcts = C.wbc.map((c) => row[`${c}_pct`]).filter((p) => p !== null && p !== undefined);
    const needed = cellsNeeded(pcts, rcfg.target_halfwidth_pct);
    row.wbc_needed = classified ? needed : null;
    row.novel_share = base.n_scored ? pyRound(base.n_novel / base.n_scored, 4) : null;
    row.classified = classified;
    const [score, evidence, guard] = domainWarnings(row, base.n_scored, base.n_novel, C.guard, base.evidence);
    row.domain_score = score;
    row.domain_warning = guard.join(" | ");
    row.domain_evidence = evidence;
    row.domain_warnings = guard;
    row.warnings = [];
    if (classified && nWbc < rcfg.min_wbc) {
      row.warnings.push(format(C.messages.few_wbc, { slide: base.slide, n_wbc: nWbc, min_wbc: rcfg.min_wbc,
        halfwidth: F(rcfg.target_halfwidth_pct), confidence: F(rcfg.confidence), needed }));
    }
    row.flag_keys = [];
    row.flags = C.flags ? evaluateFlags(row, C.flags, rcfg.min_wbc) : [];
    return row;
  }

  // ------------------------------------------------------------ CSV as report.to_csv writes it

  function csvSafe(v) {
    return typeof v === "string" && C.formula_start.some((s) => v.startsWith(s)) ? "'" + v : v;
  }
  /* a number already printed as Python prints it: written as it is (text cells are formula-quoted) */
  const num = (text) => ({ num: text });
  function csvField(v) {
    const s = v !== null && typeof v === "object" && "num" in v ? v.num : csvSafe(String(v));
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }
  /* CSV text: every text cell formula-quoted (csvSafe), numbers given as num() written as they are */
  function csvText(columns, rows) {
    return [columns.map(csvField).join(","), ...rows.map((r) => r.map(csvField).join(","))].join("\n") + "\n";
  }
  /* The summary row's cells in the CSV report's columns, as pandas writes them. */
  function summaryValues(row) {
    return C.columns.map((c) => {
      const v = c === "flags" ? row.flags.join("; ") : row[c];
      if (v === null || v === undefined) return "";
      if (typeof v === "string") return v;
      if (typeof v === "boolean") return v ? "True" : "False";
      return num(C.int_columns.includes(c) ? String(v) : pyFloat(v));
    });
  }
  /* The summary row as the CSV report: header and one line, as pandas writes a one-row frame. */
  function summaryCsv(row) {
    return csvText(C.columns, [summaryValues(row)]);
  }

  return { summarize, summaryCsv, summaryValues, csvSafe, csvText, num, fixed, pyFloat, pyG, format, F };
}
