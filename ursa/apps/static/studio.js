// ursa studio: classes and images, webcam capture, training with live events, results, cleaning, live prediction, ship.
"use strict";

const $ = (id) => document.getElementById(id);
const S = { classes: [], run: null, results: null, cleaner: null, focus: 0, live: false, liveCount: 0, camera: null,
            filter: null, pageSize: 60 };

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

function showError(msg) { const box = $("error"); box.textContent = msg; box.hidden = !msg; }

async function api(path, body, type = "application/json") {
  const opt = body === undefined ? {} : { method: "POST", headers: { "Content-Type": type },
                                          body: type === "application/json" ? JSON.stringify(body) : body };
  const r = await fetch(path, opt);
  const data = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(data && data.error ? data.error : `${r.status}`);
  return data;
}

// A name that is not UTF-8 on disk arrives with lone surrogates, which encodeURIComponent throws on: sent as U+FFFD
// instead, the server answers "no such image" and the thumbnail shows as broken, the rest of the page unharmed.
const enc = (s) => encodeURIComponent(String(s).toWellFormed ? String(s).toWellFormed() : String(s));
const thumbUrl = (cls, name) => `/thumb?class=${enc(cls)}&name=${enc(name)}`;
const pct = (v) => (v == null ? "–" : `${(100 * v).toFixed(1)}%`);

// ---------------------------------------------------------------- classes and images
async function loadState() {
  const st = await api("/api/state");
  S.pageSize = st.page_size;
  $("project").textContent = st.project;
  $("totals").textContent = `${st.total} images in ${st.classes.length} classes · runs in ${st.runs}`;
  renderCards(st.classes);
  renderWarnings(st);
  if (st.job) showJob(st.job);
  if (st.job && st.job.state === "running") follow();
  if (st.run && st.run !== S.run) await loadResults();
  document.body.dataset.ready = "1";
}

function renderWarnings(st) {
  const w = $("warnings"); w.textContent = "";
  const small = st.classes.filter((c) => c.count < 10).map((c) => c.name);
  if (st.classes.length < 2) w.append(el("p", { text: "Add at least two classes to train." }));
  if (small.length) w.append(el("p", { text: `Few images in ${small.join(", ")}: aim for 10 or more per class.` }));
  for (const [a, b] of st.leakage) w.append(el("p", { class: "warn", text: `The same picture is in two classes: ${a} and ${b}.` }));
  if (st.problem) w.append(el("p", { class: "warn", text: st.problem }));
}

function renderCards(classes) {
  const cards = $("cards");
  const known = new Map([...cards.children].map((c) => [c.dataset.class, c]));
  const same = classes.length === known.size && classes.every((c, i) => cards.children[i].dataset.class === c.name);
  S.classes = classes.map((c) => c.name);
  const sel = $("url-class");
  if (sel.options.length !== classes.length || !same) {
    sel.textContent = "";
    for (const c of classes) sel.append(el("option", { value: c.name, text: c.name }));
  }
  if (!same) cards.textContent = "";  // rebuilt only when the classes changed: a card held down keeps its button
  for (const c of classes) {
    const card = known.get(c.name) || makeCard(c.name);
    card.querySelector(".count").textContent = `${c.count} image${c.count === 1 ? "" : "s"}`;
    card.dataset.count = c.count;
    if (!same) cards.append(card);
    if (!known.has(c.name)) loadPage(card, 0);
  }
}

function makeCard(name) {
  const input = el("input", { type: "file", accept: "image/*", multiple: "", class: "upload", "aria-label": `add files to ${name}` });
  input.addEventListener("change", () => { addFiles(name, [...input.files]); input.value = ""; });
  const rec = el("button", { type: "button", class: "record", text: "Hold to record" });
  const thumbs = el("div", { class: "thumbs" });
  const card = el("div", { class: "card", "data-class": name },
    el("div", { class: "head" }, el("h3", { text: name }), el("span", { class: "count muted" }),
      el("button", { type: "button", class: "rename", text: "Rename", onclick: () => renameClass(name) }),
      el("button", { type: "button", class: "remove", text: "Remove", onclick: () => removeClass(name) })),
    el("div", { class: "bar" }, rec, el("label", { class: "drop" }, "Upload ", input), el("span", { class: "added muted" })),
    thumbs);
  holdToRecord(rec, name, card);
  for (const ev of ["pointerenter", "pointerdown", "focusin"]) card.addEventListener(ev, () => { S.pasteTo = name; });  // where Ctrl+V adds
  card.addEventListener("dragover", (e) => { e.preventDefault(); card.classList.add("over"); });
  card.addEventListener("dragleave", () => card.classList.remove("over"));
  card.addEventListener("drop", async (e) => {
    e.preventDefault(); card.classList.remove("over");
    addFiles(name, await droppedFiles(e.dataTransfer));
  });
  const more = new IntersectionObserver((entries) => {
    if (entries.some((x) => x.isIntersecting) && card.dataset.more === "1") loadPage(card, Number(card.dataset.shown));
  });
  card._observe = (sentinel) => { more.disconnect(); more.observe(sentinel); };
  return card;
}

async function loadPage(card, offset) {
  card.dataset.more = "0";
  const cls = card.dataset.class;
  const page = await api(`/api/images?class=${enc(cls)}&offset=${offset}`);
  const box = card.querySelector(".thumbs");
  if (offset === 0) box.textContent = "";
  for (const n of page.names) box.append(thumbImg(cls, n));
  card.dataset.shown = offset + page.names.length;
  if (offset + page.names.length < page.total) { card.dataset.more = "1"; card._observe(box.lastElementChild); }
}

function thumbImg(cls, name) {
  const img = el("img", { src: thumbUrl(cls, name), alt: `${cls}/${name}`, title: name, loading: "lazy", width: "72", height: "72" });
  img.addEventListener("error", () => img.classList.add("broken"));
  return img;
}

async function droppedFiles(dt) {
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...dt.files];
  const out = [];
  async function walk(entry) {
    if (entry.isFile) out.push(await new Promise((ok, bad) => entry.file(ok, bad)));
    else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  }
  for (const e of entries) await walk(e);
  return out;
}

async function addOne(cls, blob, name) {
  const q = `/api/add?class=${enc(cls)}` + (name ? `&name=${enc(name)}` : "");
  return api(q, blob, blob.type && blob.type.startsWith("image/") ? blob.type : "application/octet-stream");
}

async function addFiles(cls, files) {
  const card = document.querySelector(`.card[data-class="${CSS.escape(cls)}"]`);
  let ok = 0, bad = 0, dup = 0;
  for (const f of files) {
    try {
      const a = await addOne(cls, f, f.name);
      if (a.ok) { ok++; if (a.duplicate_of) dup++; } else bad++;
    } catch (e) { bad++; showError(`${f.name}: ${e.message}`); }
  }
  card.querySelector(".added").textContent = `added ${ok}` + (bad ? `, ${bad} quarantined (broken)` : "") +
    (dup ? `, ${dup} near-duplicate(s)` : "");
  await refreshClass(cls);
}

async function refreshClass(cls) {
  const st = await api("/api/state");
  renderCards(st.classes); renderWarnings(st);
  $("totals").textContent = `${st.total} images in ${st.classes.length} classes · runs in ${st.runs}`;
  const card = document.querySelector(`.card[data-class="${CSS.escape(cls)}"]`);
  if (card) await loadPage(card, 0);
}

async function changeClass(body) {
  try { await api("/api/classes", body); showError(""); await loadState(); } catch (e) { showError(e.message); }
}
function renameClass(name) { const n = prompt(`Rename ${name} to`, name); if (n && n !== name) changeClass({ action: "rename", name, new: n }); }
function removeClass(name) {
  if (confirm(`Remove ${name}? Its images move to _removed/ in the project (nothing is deleted).`)) changeClass({ action: "remove", name });
}

// ---------------------------------------------------------------- webcam
async function startCamera() {
  if (S.camera) return S.camera;
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  const v = $("video"); v.srcObject = stream; v.hidden = false;
  await v.play();
  S.camera = v; $("cam-start").textContent = "Webcam on"; $("cam-start").disabled = true;
  $("live-btn").disabled = !S.run;
  return v;
}

function frameBlob(maxSide = 480) {
  const v = S.camera, scale = Math.min(1, maxSide / Math.max(v.videoWidth, v.videoHeight));
  const c = el("canvas"); c.width = Math.round(v.videoWidth * scale); c.height = Math.round(v.videoHeight * scale);
  c.getContext("2d").drawImage(v, 0, 0, c.width, c.height);
  return new Promise((ok) => c.toBlob(ok, "image/jpeg", 0.9));
}

function holdToRecord(button, cls, card) {
  let timer = null, held = false, sent = 0;
  const pending = new Set();
  const stop = async () => {
    held = false;
    if (!timer) return;
    clearInterval(timer); timer = null; button.classList.remove("on");
    await Promise.all([...pending]);  // the frames still on their way first, so the count includes them
    refreshClass(cls);
  };
  const grab = async () => {
    const blob = await frameBlob();
    try { await addOne(cls, blob, ""); sent++; card.querySelector(".added").textContent = `captured ${sent}`; }
    catch (e) { showError(e.message); }
  };
  button.addEventListener("pointerdown", async () => {
    held = true;
    try { await startCamera(); } catch (e) { showError(`webcam: ${e.message}`); return; }
    if (!held || timer) return;  // let go before the camera started: nothing to record
    button.classList.add("on"); sent = 0;
    const tick = () => { if (pending.size < 4) { const p = grab().finally(() => pending.delete(p)); pending.add(p); } };
    tick(); timer = setInterval(tick, 250);  // four frames a second while held (at most four on their way)
  });
  for (const ev of ["pointerup", "pointerleave", "pointercancel"]) button.addEventListener(ev, stop);
  window.addEventListener("pointerup", stop);
}

// ---------------------------------------------------------------- training
async function train() {
  const body = {};
  for (const k of ["epochs", "budget", "size", "balance"]) { const v = $(`opt-${k}`).value; if (v !== "") body[k] = v; }
  try { showJob(await api("/api/train", body)); follow(); showError(""); } catch (e) { showError(e.message); }
}

function follow() {
  if (S.events) S.events.close();
  const es = new EventSource("/api/events");
  S.events = es;
  es.onmessage = (m) => {
    const job = JSON.parse(m.data);
    showJob(job);
    if (job.state !== "running") { es.close(); S.events = null; if (job.state === "done") loadResults(); }
  };
  // The browser reconnects a dropped stream by itself; one it gave up on (an error answer) is replaced by polling.
  es.onerror = () => { if (es.readyState === EventSource.CLOSED && S.events === es) { S.events = null; poll(); } };
}

async function poll(failures = 0) {
  if (S.events) return;  // a new event stream (another Train) took over
  try {
    const job = (await api("/api/state")).job;
    showError("");
    showJob(job);
    if (job && job.state === "running") { setTimeout(() => poll(0), 1000); return; }
    if (job && job.state === "done") loadResults();
  } catch (e) {
    showError(e.message);
    if (failures < 10) setTimeout(() => poll(failures + 1), 1000 * 2 ** Math.min(failures, 4));  // then reload the page
  }
}

function showJob(job) {
  if (!job || job.state === "idle") return;
  const running = job.state === "running";
  $("job-state").textContent = `${job.kind} ${job.state} · ${job.elapsed} s · ${job.run}`;
  document.body.dataset.job = job.state;
  $("train-btn").disabled = running; $("cancel-btn").hidden = !running;
  $("console").textContent = job.console.join("\n");
  if (job.kind === "train") renderEpochs(job.epochs);
  if (job.kind === "int8" && !running) loadResults();
  if (job.kind === "download" && !running) loadState();
  if (job.kind === "preview" && job.state === "done") {
    $("preview-png").src = `/preview.png?t=${Date.now()}`; $("preview-png").hidden = false;
  }
}

function renderEpochs(rows) {
  const tb = $("epochs").querySelector("tbody"); tb.textContent = "";
  const f = (v) => (v == null ? "–" : Number(v).toFixed(4));
  for (const r of rows) tb.append(el("tr", {}, ...[r.epoch, r.stage, f(r.train_loss), f(r.valid_loss), pct(r.error_rate)].map((v) => el("td", { text: String(v) }))));
  drawCurves(rows);
}

function drawCurves(rows) {
  const svg = $("curves"); svg.textContent = "";
  if (!rows.length) return;
  const ns = "http://www.w3.org/2000/svg", W = 320, H = 160, P = 20;
  const series = [["train_loss", "#2563eb"], ["valid_loss", "#b45309"], ["error_rate", "#c02626"]];
  const top = Math.max(...rows.flatMap((r) => series.map(([k]) => Number(r[k]) || 0)), 1e-6);
  const x = (i) => P + (rows.length < 2 ? 0 : (i * (W - 2 * P)) / (rows.length - 1));
  const y = (v) => H - P - ((Number(v) || 0) / top) * (H - 2 * P);
  series.forEach(([k, color], j) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", rows.map((r, i) => `${x(i)},${y(r[k])}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2");
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String(P + j * 100)); label.setAttribute("y", "12"); label.setAttribute("fill", color);
    label.setAttribute("font-size", "11"); label.textContent = k.replace("_", " ");
    svg.append(line, label);
  });
}

// ---------------------------------------------------------------- results and cleaning
async function loadResults() {
  const r = await api("/api/results");
  if (!r.run) return;
  S.results = r; S.run = r.run;
  $("result-line").textContent = `Error ${pct(r.error_rate)} on ${r.n_valid} validation images (${r.run})` +
    (r.leakage ? ` · ${r.leakage} near-duplicate pair(s) straddle the split` : "");
  $("result-line").classList.remove("muted");
  renderMatrix(r); renderLosses();
  $("pictures").hidden = false;
  $("batch-png").src = `/run/batch.png?run=${enc(r.run)}`;
  $("losses-png").src = `/run/losses.png?run=${enc(r.run)}`;
  $("live-btn").disabled = false;
  for (const [id, f] of [["dl-model", "model.safetensors"], ["dl-onnx", "model.onnx"], ["dl-int8", "model.int8.onnx"]]) $(id).hidden = !r.files[f];
  $("int8-btn").hidden = r.files["model.int8.onnx"];
  $("int8-line").textContent = r.int8 ? `INT8 agrees with fp32 on ${pct(r.int8.agreement)} of the validation images` : "";
  $("commands").textContent = [`# serve it here`, r.ship.serve, ``, `# or in Docker (from the ursa source folder)`, ...r.ship.docker,
                               ``, `# the same training from a shell`, r.ship.retrain].join("\n");
  if (r.cleaner) showCleaner(r.cleaner);
  document.body.dataset.results = "1";
}

function renderMatrix(r) {
  const t = $("matrix"); t.textContent = "";
  t.append(el("tr", {}, el("th"), ...r.classes.map((c) => el("th", { text: c }))));
  r.confusion_matrix.forEach((row, i) => {
    t.append(el("tr", {}, el("th", { text: r.classes[i] }), ...row.map((n, j) => el("td", {
      class: (i === j ? "diag" : n ? "off" : "") + (S.filter && S.filter[0] === i && S.filter[1] === j ? " picked" : ""),
      text: String(n), "data-actual": r.classes[i], "data-pred": r.classes[j],
      onclick: () => { S.filter = S.filter && S.filter[0] === i && S.filter[1] === j ? null : [i, j]; renderMatrix(r); renderLosses(); },
    }))));
  });
}

function renderLosses() {
  const r = S.results, box = $("losses"); box.textContent = "";
  const f = S.filter ? [r.classes[S.filter[0]], r.classes[S.filter[1]]] : null;
  $("loss-filter").textContent = f ? `(actual ${f[0]}, predicted ${f[1]})` : "";
  for (const [name, actual, pred, loss, prob] of r.top_losses) {
    if (f && (actual !== f[0] || pred !== f[1])) continue;
    const [cls, file] = [name.slice(0, name.indexOf("/")), name.slice(name.indexOf("/") + 1)];
    const img = thumbImg(cls, file);
    img.title = "click: the model's evidence (heat map)";
    img.addEventListener("click", () => {  // the heat map of what the model looked at, and back
      const heat = `/heat?class=${enc(cls)}&name=${enc(file)}`;
      img.src = img.src.includes("/heat?") ? thumbUrl(cls, file) : heat;
    });
    box.append(el("figure", { class: "loss" }, img,
      el("figcaption", { text: `${pred} / ${actual} · ${Number(loss).toFixed(2)} / ${Number(prob).toFixed(2)}` })));
  }
}

async function openCleaner() {
  $("clean-open").disabled = true; $("clean-summary").textContent = "the cleaner's model pass and rankings…";
  try { showCleaner(await api("/api/clean/open", {})); } catch (e) { showError(e.message); }
  $("clean-open").disabled = false;
}

function showCleaner(c) {
  if (c.error) { showError(c.error); return; }
  S.cleaner = c; $("clean-help").hidden = false; $("clean-apply").hidden = false;
  const box = $("cleaner"); box.textContent = "";
  const seen = new Set();
  const items = [...c.issues, ...c.losses].filter((it) => !seen.has(it.name) && seen.add(it.name));
  S.items = items;
  items.forEach((it, k) => {
    const [cls, file] = [it.name.slice(0, it.name.indexOf("/")), it.name.slice(it.name.indexOf("/") + 1)];
    box.append(el("figure", { class: `item status-${it.status || "none"}${k === S.focus ? " focused" : ""}`, "data-name": it.name,
                              onclick: () => { S.focus = k; showCleaner(S.cleaner); } },
      thumbImg(cls, file), el("figcaption", { text: `${it.label} → model says ${it.pred} (${pct(it.prob)})` }),
      el("span", { class: "badge", text: it.status === "relabel" ? `→ ${it.new_label}` : (it.status || "") })));
  });
  showSummary(c.summary);
}

function showSummary(s) { $("clean-summary").textContent = `${s.decided} decided (${s.kept} kept, ${s.excluded} excluded, ${s.relabelled} relabelled) of ${s.total}`; }

async function decide(action, label = "") {
  const it = S.items && S.items[S.focus];
  if (!it) return;
  try {
    const r = await api("/api/clean/decide", { name: it.name, action, label });
    it.status = r.item.status; it.new_label = r.item.label;
    S.cleaner.summary = r.summary;
    if (action !== "undo") S.focus = Math.min(S.focus + 1, S.items.length - 1);
    showCleaner(S.cleaner);
  } catch (e) { showError(e.message); }
}

function cleanerKeys(e) {  // ursa clean's keys
  if (!S.items || e.ctrlKey || e.metaKey || e.altKey || ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) return;
  const k = e.key, move = (d) => { S.focus = Math.max(0, Math.min(S.items.length - 1, S.focus + d)); showCleaner(S.cleaner); };
  if (k === "ArrowRight" || k === "j" || k === "n") move(1);
  else if (k === "ArrowLeft" || k === "p") move(-1);
  else if (k === "k" || k === "K") decide("keep");
  else if (k === "x" || k === "X" || k === "Delete" || k === "Backspace") decide("exclude");
  else if (k === "u" || k === "U") decide("undo");
  else if (/^[1-9]$/.test(k) && S.cleaner.classes[Number(k) - 1]) decide("relabel", S.cleaner.classes[Number(k) - 1]);
  else return;
  e.preventDefault();
}

async function applyDecisions() {
  if (!confirm("Move the relabelled images to their new class folders and the excluded ones to _removed/?")) return;
  try {
    const m = await api("/api/clean/apply", {});
    $("clean-summary").textContent = `moved: ${m.relabelled} relabelled, ${m.excluded} excluded; train again to use them` +
      (m.skipped ? `; ${m.skipped} left as they are: the image or its new class was renamed, moved or removed since` : "");
    $("cleaner").textContent = ""; S.items = null; $("clean-apply").hidden = true;
    await loadState();
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- live prediction
function showPrediction(p) {
  const top = Object.entries(p.probs).sort((a, b) => b[1] - a[1]);
  $("verdict").textContent = p.unknown ? "none of these" : p.unsure ? `unsure (maybe ${p.label})` : p.label;
  $("verdict").className = "verdict" + (p.unknown || p.unsure ? " doubt" : "");
  $("verdict").dataset.label = p.label;
  const bars = $("bars"); bars.textContent = "";
  for (const [c, v] of top) {
    const fill = el("span", { class: "fill" }); fill.style.width = `${(100 * v).toFixed(1)}%`;
    bars.append(el("div", { class: "row", "data-class": c }, el("span", { class: "name", text: c }), el("span", { class: "track" }, fill),
      el("span", { class: "value", text: pct(v) })));
  }
}

async function liveLoop() {
  const t0 = performance.now(); let n = 0;
  while (S.live) {
    try {
      const p = await api("/api/predict", await frameBlob(320), "image/jpeg");
      showPrediction(p); n++; S.liveCount++; document.body.dataset.live = String(S.liveCount);
      $("live-rate").textContent = `${(n / ((performance.now() - t0) / 1000)).toFixed(1)} predictions/s (model ${p.ms} ms)`;
    } catch (e) { showError(e.message); S.live = false; }
  }
}

async function toggleLive() {
  if (S.live) { S.live = false; $("live-btn").textContent = "Predict the webcam live"; return; }
  try { await startCamera(); } catch (e) { showError(`webcam: ${e.message}`); return; }
  S.live = true; $("live-btn").textContent = "Stop"; liveLoop();
}

async function predictFile(f) {
  $("live-preview").src = URL.createObjectURL(f); $("live-preview").hidden = false;
  try { showPrediction(await api("/api/predict", f, f.type || "application/octet-stream")); } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- wiring
window.addEventListener("DOMContentLoaded", () => {
  $("new-class").addEventListener("submit", (e) => {
    e.preventDefault(); const n = $("class-name").value.trim();
    if (n) { changeClass({ action: "create", name: n }); $("class-name").value = ""; }
  });
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const urls = $("url-list").value.split("\n").map((u) => u.trim()).filter(Boolean);
    if (!urls.length || !$("url-class").value) return;
    api("/api/urls", { class: $("url-class").value, urls }).then((j) => { showJob(j); follow(); showError(""); })
      .catch((e) => showError(e.message));
  });
  $("preview-btn").addEventListener("click", () => api("/api/preview", {}).then((j) => { showJob(j); follow(); showError(""); })
    .catch((e) => showError(e.message)));
  $("cam-start").addEventListener("click", () => startCamera().catch((e) => showError(`webcam: ${e.message}`)));
  $("train-btn").addEventListener("click", train);
  $("cancel-btn").addEventListener("click", () => api("/api/cancel", {}).then(showJob).catch((e) => showError(e.message)));
  $("clean-open").addEventListener("click", openCleaner);
  $("clean-apply").addEventListener("click", applyDecisions);
  $("live-btn").addEventListener("click", toggleLive);
  $("live-file").addEventListener("change", () => { const f = $("live-file").files[0]; if (f) predictFile(f); });
  $("live-drop").addEventListener("dragover", (e) => e.preventDefault());
  $("live-drop").addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files[0]) predictFile(e.dataTransfer.files[0]); });
  $("int8-btn").addEventListener("click", () => api("/api/int8", {}).then((j) => { showJob(j); follow(); }).catch((e) => showError(e.message)));
  document.addEventListener("keydown", cleanerKeys);
  document.addEventListener("paste", (e) => {
    const files = [...e.clipboardData.files];
    const cls = S.classes.includes(S.pasteTo) ? S.pasteTo : S.classes[0];  // the card last pointed at, else the first
    if (files.length && cls) addFiles(cls, files);
  });
  loadState().catch((e) => showError(e.message));
});
