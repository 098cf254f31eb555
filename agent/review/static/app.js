// The review page: a trial table (sortable, filterable, polled every 2 s) and a candidate page.
// Everything shown that came from the search (titles, notes, messages: a model wrote some of them)
// goes in as text, never as HTML; only the diff is HTML, escaped by Pygments on the server.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("review-token") || "";
let data = null;            // the latest /api/trials
let dataText = "";          // ... as text: the table is redrawn only when it changed
let sort = { key: "number", dir: -1 };
let cand = null;            // the candidate page's data
let candSig = "";           // its trials' states, to refetch it when they change
let fidelity = null;
let want = null;            // the commit the address asks for: a late answer for another is dropped

function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem("review-token", token);
    history.replaceState(null, "", location.pathname + "#/");
  }
}

async function api(path, body) {
  const opts = { headers: { "X-Review-Token": token } };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const out = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (r.status === 403) { show("needtoken"); }
  if (!r.ok) throw new Error(out.error || `HTTP ${r.status}`);
  return out;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function show(id) {
  for (const s of ["needtoken", "tableview", "candview"]) $(s).hidden = s !== id;
}

// ---- the trial table ------------------------------------------------------------------------

function reviewOf(commit) {
  if (!data) return "";
  const r = data.reviews[commit];
  const q = data.queued.includes(commit);
  return [r && r.decision, r && r.note ? "note" : "", q ? "queued" : ""].filter(Boolean).join(" ");
}

function cell(row, key) {
  if (key === "review") return reviewOf(row.commit);
  if (key === "speedup") return row.speedup_text || "";
  if (key === "commit") return (row.commit || "").slice(0, 10);
  return row[key] === null || row[key] === undefined ? "" : row[key];
}

function sortValue(row, key) {
  if (key === "speedup") return row.speedup === null ? -Infinity : row.speedup;
  const v = cell(row, key);
  return typeof v === "number" ? v : String(v).toLowerCase();
}

function fillSelect(sel, values) {
  const keep = sel.value;
  const have = new Set(Array.from(sel.options).map((o) => o.value));
  for (const v of values) if (!have.has(v)) sel.appendChild(new Option(v, v));
  sel.value = keep;
}

function renderTable() {
  if (!data) return;
  const rows = data.trials;
  fillSelect($("fproposer"), [...new Set(rows.map((r) => r.proposer))].sort());
  fillSelect($("fstate"), [...new Set(rows.map((r) => r.state))].sort());
  const words = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const prop = $("fproposer").value, state = $("fstate").value, hideBase = $("hidebase").checked;
  const keys = ["number", "rung", "state", "proposer", "title", "speedup", "verdict", "review", "commit"];
  const shown = rows.filter((r) => {
    if (prop && r.proposer !== prop) return false;
    if (state && r.state !== state) return false;
    if (hideBase && r.proposer === "baseline" && !prop) return false;
    const text = keys.map((k) => String(cell(r, k))).join(" ").toLowerCase() + " " + r.commit + " " + r.reason;
    return words.every((w) => text.includes(w));
  });
  shown.sort((a, b) => {
    const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
    return (x < y ? -1 : x > y ? 1 : a.number - b.number) * sort.dir;
  });
  const body = document.querySelector("#trials tbody");
  body.replaceChildren();
  for (const r of shown) {
    const tr = el("tr", null, `state-${r.state}`);
    tr.dataset.commit = r.commit;
    tr.dataset.number = r.number;
    for (const k of keys) {
      const td = el("td", cell(r, k));
      if (k === "review") {
        td.replaceChildren(...reviewOf(r.commit).split(" ").filter(Boolean).map((t) => el("span", t, `tag ${t}`)));
      }
      if (k === "speedup" && r.reason && r.state !== "complete") td.title = r.reason;
      if (k === "commit") td.className = "commit";
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { location.hash = `#/c/${r.commit}`; });
    body.appendChild(tr);
  }
  document.querySelectorAll("#trials th").forEach((th) => {
    th.className = th.dataset.key === sort.key ? (sort.dir > 0 ? "asc" : "desc") : "";
  });
  $("count").textContent = `${shown.length} of ${rows.length} trials`;
}

// ---- the candidate page ---------------------------------------------------------------------

function signature(commit) {
  if (!data) return "";
  const mine = data.trials.filter((t) => t.commit === commit).map((t) => `${t.number}:${t.state}`);
  return mine.join(",") + "|" + JSON.stringify(data.reviews[commit] || null) + data.queued.includes(commit);
}

async function loadCandidate(commit, against) {
  const got = await api(`/api/candidate/${encodeURIComponent(commit)}?against=${against}`);
  if (got.commit.indexOf(want) !== 0) return;  // the page moved on while this was on its way
  cand = got;
  candSig = signature(cand.commit);
  renderCandidate();
}

function renderCandidate() {
  const c = cand;
  $("ctitle").textContent = c.title + (c.is_base ? " (the base)" : "");
  $("ccommit").textContent = `commit ${c.commit}` + (c.parent ? `, parent ${c.parent.slice(0, 10)}` : "");
  $("cmessage").textContent = c.message;
  // review
  const r = c.review;
  const words = r ? [r.decision ? `decision: ${r.decision}` : "no decision", r.note ? `note: ${r.note}` : ""] : ["not reviewed"];
  $("rstate").textContent = words.filter(Boolean).join("; ") + (c.queued ? " (a request is queued for the running search)" : "");
  $("reviewbox").hidden = c.is_base;
  $("approve").classList.toggle("on", !!(r && r.decision === "approve"));
  $("reject").classList.toggle("on", !!(r && r.decision === "reject"));
  if (document.activeElement !== $("note") && !$("note").dataset.dirty) $("note").value = (r && r.note) || "";
  // lineage: from the base down to this candidate
  const ol = $("lineage");
  ol.replaceChildren();
  for (const step of [...c.lineage].reverse()) {
    const li = el("li", null, step.commit === c.commit ? "current" : "");
    const a = el("a", step.title);
    a.href = `#/c/${step.commit}`;
    li.append(a, el("span", ` ${step.commit.slice(0, 8)}` + (step.base ? " (base)" : ""), "muted commit"));
    if (step.speedup_text) li.append(el("div", step.speedup_text, "muted"));
    ol.appendChild(li);
  }
  renderStats(c.stats);
  renderPlot();
  $("changed").textContent = c.changed.map((f) => `${f.path}: ${f.status}, +${f.added} -${f.removed}`).join("; ")
    + ` (against ${c.against} ${c.against_commit.slice(0, 8)})`;
  $("diff").innerHTML = c.diff_html;  // Pygments' escaped HTML, built on the server
  document.querySelector(`input[name=against][value=${c.against}]`).checked = true;
}

function renderStats(s) {
  const box = $("stats");
  box.replaceChildren();
  const t = el("table", null, "grid");
  const head = el("tr");
  for (const h of ["trial", "rung", "state", "the speed-up (one definition)", "verdict", "p-value", "note"]) head.appendChild(el("th", h));
  t.appendChild(head);
  for (const r of s.rungs) {
    const tr = el("tr");
    const rung = r.purpose ? `${r.rung} (${r.purpose})` : r.rung;
    for (const v of [r.number, rung, r.state, r.speedup_text, r.verdict, r.pvalue === null ? "" : r.pvalue.toPrecision(3), r.reason]) tr.appendChild(el("td", v));
    t.appendChild(tr);
  }
  box.appendChild(t);
  if (s.pvalue !== null) box.appendChild(el("p", `confirm (trial ${s.confirm_trial}): paired one-sided t-test of the gain over the search's confirm pairs, p = ${s.pvalue.toPrecision(3)}`));
  const k = s.cost;
  box.appendChild(el("p", `cost: LLM ${k.llm_input_tokens} input + ${k.llm_output_tokens} output tokens, $${k.llm_dollars.toFixed(4)}; ` +
    `GPU-seconds ${k.gpu_seconds.toFixed(1)} (every run of this candidate, base runs beside it included)`));
}

function renderPlot() {
  const curves = cand.curves;
  const fids = Object.keys(curves).sort((a, b) => ["smoke", "short", "full"].indexOf(a) - ["smoke", "short", "full"].indexOf(b));
  if (!fidelity || !curves[fidelity]) fidelity = fids[fids.length - 1] || null;
  const bar = $("fids");
  bar.replaceChildren();
  for (const f of fids) {
    const b = el("button", `${f} (${curves[f].series.length} runs)`, f === fidelity ? "on" : "");
    b.addEventListener("click", () => { fidelity = f; renderPlot(); });
    bar.appendChild(b);
  }
  if (!fidelity) { Plotly.purge("plot"); $("plot").textContent = "no curves recorded"; return; }
  const x = document.querySelector("input[name=xaxis]:checked").value;
  const entry = curves[fidelity];
  const traces = [];
  if (entry.band.length) {
    const bx = entry.band.map((p) => (x === "ms" ? p.ms : p.step));
    traces.push({ x: bx, y: entry.band.map((p) => p.low), mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false, name: "base min" });
    traces.push({ x: bx, y: entry.band.map((p) => p.high), mode: "lines", line: { width: 0 }, fill: "tonexty",
                  fillcolor: "rgba(120,120,120,0.25)", name: `base min to max (${entry.base_runs} runs)` });
    traces.push({ x: bx, y: entry.band.map((p) => p.mean), mode: "lines", line: { color: "gray" }, name: "base mean" });
  }
  for (const s of entry.series) {
    traces.push({ x: x === "ms" ? s.ms : s.step, y: s.loss, mode: "lines+markers", name: s.name + (s.status === "ok" ? "" : ` ${s.status}`) });
  }
  Plotly.react("plot", traces, {
    margin: { t: 10, r: 10 }, xaxis: { title: { text: x === "ms" ? "training time (ms)" : "step" } },
    yaxis: { title: { text: "validation loss" } }, legend: { orientation: "h" },
  }, { responsive: true, displaylogo: false });
}

async function review(body) {
  $("rmsg").textContent = "saving...";
  try {
    const out = await api("/api/review", { commit: cand.commit, ...body });
    $("rmsg").textContent = out.message;
    $("note").dataset.dirty = "";
    await poll();
    await loadCandidate(cand.commit, cand.against);
  } catch (e) {
    $("rmsg").textContent = `error: ${e.message}`;
  }
}

// ---- routing and polling --------------------------------------------------------------------

async function route() {
  takeToken();
  if (!token) return show("needtoken");
  const m = location.hash.match(/^#\/c\/([0-9a-f]+)/);
  if (m) {
    want = m[1];
    show("candview");
    fidelity = null;
    $("note").dataset.dirty = "";
    $("rmsg").textContent = "";
    try { await loadCandidate(m[1], "parent"); } catch (e) { $("ctitle").textContent = `error: ${e.message}`; }
  } else {
    want = null;
    show("tableview");
    renderTable();
  }
}

async function poll() {
  if (!token) return;
  try {
    const fresh = await api("/api/trials");
    $("longruns").textContent = (fresh.long_runs || []).join("\n");  // changes every poll: kept out of the compare
    const text = JSON.stringify({...fresh, long_runs: null});
    $("live").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (text === dataText) return;
    data = fresh;
    dataText = text;
    $("where").textContent = data.dir;
    if (!$("tableview").hidden) renderTable();
    if (!$("candview").hidden && cand && want && signature(cand.commit) !== candSig) await loadCandidate(cand.commit, cand.against);
  } catch (e) {
    $("live").textContent = `not updated: ${e.message}`;
  }
}

function init() {
  document.querySelectorAll("#trials th").forEach((th) => th.addEventListener("click", () => {
    sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : 1 };
    renderTable();
  }));
  for (const id of ["filter", "fproposer", "fstate", "hidebase"]) $(id).addEventListener("input", renderTable);
  document.querySelectorAll("input[name=xaxis]").forEach((i) => i.addEventListener("change", renderPlot));
  document.querySelectorAll("input[name=against]").forEach((i) => i.addEventListener("change", () => loadCandidate(cand.commit, i.value)));
  $("approve").addEventListener("click", () => review({ decision: "approve" }));
  $("reject").addEventListener("click", () => review({ decision: "reject" }));
  $("clear").addEventListener("click", () => review({ decision: null }));
  $("savenote").addEventListener("click", () => review({ note: $("note").value }));
  $("note").addEventListener("input", () => { $("note").dataset.dirty = "1"; });
  $("tokenbtn").addEventListener("click", () => { location.hash = `#token=${encodeURIComponent($("tokeninput").value.trim())}`; });
  window.addEventListener("hashchange", route);
  route().then(poll);
  setInterval(poll, POLL_MS);
}

init();
