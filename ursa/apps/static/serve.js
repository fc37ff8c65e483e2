// ursa serve's page: choose, drop or paste an image; show it, the predicted class and every
// class's probability as a bar. Plain JS, no build step, talks only to this server.
"use strict";

const $ = (id) => document.getElementById(id);
let classes = [];
let maxBytes = 0;
let previewUrl = null;

function percent(p) {
  if (p > 0.999 && p < 1) return ">99.9%";
  if (p < 0.001 && p > 0) return "<0.1%";
  return (p * 100).toFixed(p === 0 || p === 1 ? 0 : 1) + "%";
}

function humanBytes(n) {
  if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
  if (n >= 1024) return Math.round(n / 1024) + " KB";
  return n + " bytes";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("label").textContent = "—";
  $("label").classList.add("placeholder");
  $("confidence").textContent = "";
  $("bars").replaceChildren();
  $("timing").textContent = "";
}

function drawBars(probs, label) {
  const rows = Object.entries(probs).sort((a, b) => b[1] - a[1]);
  const items = rows.map(([name, p]) => {
    const li = document.createElement("li");
    li.className = "bar" + (name === label ? " top" : "");
    li.dataset.class = name;
    const title = document.createElement("span");
    title.className = "bar-name";
    title.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = Math.max(0.5, p * 100).toFixed(2) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(p);
    li.append(title, track, value);
    return li;
  });
  $("bars").replaceChildren(...items);
}

async function predict(file) {
  $("error").hidden = true;
  $("filename").textContent = file.name ? `${file.name} · ${humanBytes(file.size)}` : humanBytes(file.size);
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const img = $("preview");
  img.src = previewUrl;
  img.alt = file.name || "uploaded image";
  img.hidden = false;
  $("drop").classList.add("has-image");
  $("choose").textContent = "choose another image";
  if (maxBytes && file.size > maxBytes) {
    showError(`This file is ${humanBytes(file.size)}; the server accepts at most ${humanBytes(maxBytes)}.`);
    return;
  }
  $("label").textContent = "thinking…";
  $("label").classList.add("placeholder");
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  const t0 = performance.now();
  let response, body;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
    body = await response.json();
  } catch (e) {
    showError("Could not reach the server: " + e.message);
    return;
  }
  if (!response.ok) {
    showError(body && body.error ? body.error : `The server answered ${response.status}.`);
    return;
  }
  const ms = performance.now() - t0;
  const unknown = body.unknown === true;  // unlike the training images: "none of these"
  // a multi-label model answers a set of labels ("labels": each at or above its threshold), maybe none
  const words = body.labels ? (body.labels.map((l) => l.label).join(", ") || "no label") : body.label;
  $("label").textContent = unknown ? `none of these (closest: ${words})` : words;
  $("label").classList.remove("placeholder");
  $("label").classList.toggle("unknown", unknown);
  let said = body.labels
    ? `each label at or above its own threshold: ${body.labels.map((l) => `${l.label} ${percent(l.prob)}`).join(", ") || "none"}`
    : `probability ${percent(body.probs[body.label])}`;
  if (unknown) said = `unlike the training images (score ${body.unknown_score.toFixed(3)}, threshold ${body.unknown_threshold.toFixed(3)}) · ${said} for ${body.label}`;
  else if (body.unknown === null && body.note) said += " · this model cannot tell pictures of none of its classes";
  $("confidence").textContent = said;
  drawBars(body.probs, body.label);
  $("timing").textContent = `answered in ${ms.toFixed(0)} ms`;
  document.dispatchEvent(new CustomEvent("ursa:predicted", { detail: { file, body } })); // explain.js: "why?"
}

function firstImage(list) {
  for (const f of list || []) if (f.type.startsWith("image/") || !f.type) return f;
  return list && list.length ? list[0] : null;
}

async function loadModelInfo() {
  try {
    const m = await (await fetch("/model")).json();
    classes = m.classes || [];
    maxBytes = m.max_bytes || 0;
    const acc = m.metrics && typeof m.metrics.accuracy === "number" ? ` · validation accuracy ${percent(m.metrics.accuracy)}` : "";
    $("model-info").textContent =
      `${classes.length} classes: ${classes.join(", ")} · ${m.arch} at ${m.input_size} px · ${m.backend}${acc}`;
  } catch (e) {
    $("model-info").textContent = "model information unavailable";
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const f = firstImage(e.target.files);
    if (f) predict(f);
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("dragging"); });
  }
  drop.addEventListener("drop", (e) => {
    const f = firstImage(e.dataTransfer && e.dataTransfer.files);
    if (f) predict(f);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  document.addEventListener("paste", (e) => {
    const f = firstImage(e.clipboardData && e.clipboardData.files);
    if (f) predict(f);
  });
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", init);
