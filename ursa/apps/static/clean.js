// ursa clean: the page. Plain DOM, no build step, no external URLs. File names come from the
// user's disk, so text is only ever set with textContent, never parsed as HTML.
"use strict";

const VIEWS = ["losses", "issues", "duplicates", "unreadable", "changes"];
const PAGE = 60;
const INTRO = {
  losses: "Every image, the ones the model gets most wrong first (loss = −log of the probability it gives the image's label). " +
    "Look at the worst: exclude pictures that belong to no class, relabel the mislabelled ones.",
  issues: "Likely label errors: images that confident learning (cleanlab) flags, or whose out-of-fold prediction disagrees with " +
    "their label. Each image is judged by a classifier on body embeddings that never saw it; most likely errors first " +
    "(lowest label quality = the probability that classifier gives the label). “suggested” is the class it prefers.",
  duplicates: "Pairs of images whose body embeddings are nearly identical (cosine similarity ≥ THRESHOLD), and byte-identical files. " +
    "Usually keep one and exclude the other; a pair across classes means one label is wrong.",
  unreadable: "Files that do not decode as images. Exclude them here, or run `ursa verify` to quarantine them.",
  changes: "Everything you excluded or relabelled so far (kept images are not listed).",
};
const EMPTY = {
  losses: "No readable images.",
  issues: "No likely label errors were found.",
  duplicates: "No duplicates or near-duplicates were found.",
  unreadable: "Every file decodes: nothing unreadable.",
  changes: "No images excluded or relabelled yet.",
};

const S = {
  state: null,   // from /api/state
  view: "losses",
  entries: [],   // [{i, pair}] in the current view's order
  focus: 0,
  shown: PAGE,
  cards: new Map(),  // item index -> [card elements] (an image can be in several pairs)
  zoom: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmt(v, digits) {
  return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
}

async function loadState() {
  const r = await fetch("/api/state", { cache: "no-store" });
  if (!r.ok) throw new Error(`the cleaner answered ${r.status}`);
  S.state = await r.json();
}

function entriesFor(view) {
  const v = S.state.views;
  if (view === "duplicates") return v.duplicates.flatMap((p) => [{ i: p.a, pair: p }, { i: p.b, pair: p }]);
  if (view === "changes") {
    return S.state.items.map((it, i) => ({ i, it }))
      .filter(({ it }) => it.status === "exclude" || it.status === "relabel").map(({ i }) => ({ i }));
  }
  return v[view].map((i) => ({ i }));
}

function counts() {
  const v = S.state.views;
  const changed = S.state.items.filter((it) => it.status === "exclude" || it.status === "relabel").length;
  return { losses: v.losses.length, issues: v.issues.length, duplicates: v.duplicates.length,
           unreadable: v.unreadable.length, changes: changed };
}

function renderHeader() {
  const st = S.state, s = st.summary;
  $("data").textContent = `${st.data} · ${st.items.length} images · model ${st.model}`;
  const sum = $("summary");
  sum.replaceChildren();
  const parts = [["decided", s.decided], ["kept", s.kept], ["excluded", s.excluded], ["relabelled", s.relabelled]];
  parts.forEach(([k, n], j) => {
    if (j) sum.append(" · ");
    sum.append(el("b", null, n), ` ${k}`);
  });
  const c = counts();
  for (const b of document.querySelectorAll("#tabs button")) {
    const view = b.dataset.view;
    b.querySelector(".count").textContent = c[view] + (view === "duplicates" ? " pairs" : "");
    b.setAttribute("aria-selected", String(view === S.view));
    b.hidden = view === "unreadable" && c.unreadable === 0 && S.view !== "unreadable";
  }
  $("help-cleaned").textContent = st.files.cleaned;
  $("help-log").textContent = st.files.log;
  $("help-train").textContent = `ursa train ${st.data} --csv ${st.files.cleaned}`;
  const keys = $("keys-relabel");
  keys.replaceChildren();
  st.classes.slice(0, 9).forEach((c, k) => { keys.append(el("kbd", null, k + 1), ` ${c} `); });
  keys.append("relabel");
}

function setIntro() {
  let text = INTRO[S.view];
  if (S.view === "duplicates") text = text.replace("THRESHOLD", fmt(S.state.threshold, 2));
  if (S.view === "issues" && !S.state.method.startsWith("confident learning on out-of-fold")) text += ` (${S.state.method}.)`;
  $("intro").textContent = text;
}

function statusText(it) {
  if (it.status === "exclude") return "excluded";
  if (it.status === "relabel") return `→ ${it.new_label}`;
  if (it.status === "keep") return "kept";
  return "";
}

function card(pos, entry) {
  const i = entry.i, it = S.state.items[i];
  const c = el("div", "card");
  c.dataset.pos = pos;
  c.dataset.name = it.name;
  const thumb = el("div", "thumb");
  if (it.error) {
    thumb.append(el("div", "broken", `cannot show this file: ${it.error}`));
  } else {
    const img = el("img");
    img.loading = "lazy";
    img.alt = it.name;
    img.src = `/image?path=${encodeURIComponent(it.name)}`;
    thumb.append(img);
    thumb.addEventListener("click", () => { setFocus(pos); openZoom(); });
  }
  if (S.view !== "duplicates") thumb.append(el("span", "rank", `#${pos + 1}`));
  thumb.append(el("span", "badge"));
  c.append(thumb);

  const meta = el("div", "meta");
  const name = el("div", "name", it.name);
  name.title = it.name;
  meta.append(name);
  const lab = el("div", "row");
  lab.append("label ", el("span", "old"), el("span", "label-now"), el("span", "split", it.valid ? "valid" : "train"));
  meta.append(lab);
  if (!it.error) {
    const pr = el("div", "row");
    pr.append("predicted ", el("span", "pred", it.pred),
      el("span", "num", ` ${fmt(it.prob, 2)} · loss ${fmt(it.loss, 2)}`));
    meta.append(pr);
    if (S.view === "issues" || S.view === "changes") {
      const q = el("div", "row");
      q.append("suggested ", el("b", null, it.suggested), el("span", "num", ` · label quality ${fmt(it.quality, 3)}`));
      meta.append(q);
      if (S.view === "issues") {
        meta.append(el("div", "row why", it.confident ? "flagged by confident learning"
          : "out-of-fold prediction disagrees with the label"));
      }
    }
  }
  c.append(meta);

  const acts = el("div", "actions");
  const keep = el("button", "keep");
  keep.type = "button";
  keep.append(el("kbd", null, "k"), "keep");
  keep.addEventListener("click", () => { setFocus(pos); decide("keep"); });
  const excl = el("button", "exclude");
  excl.type = "button";
  excl.append(el("kbd", null, "x"), "exclude");
  excl.addEventListener("click", () => { setFocus(pos); decide("exclude"); });
  acts.append(keep, excl);
  S.state.classes.forEach((cls, k) => {
    const b = el("button", "relabel");
    b.type = "button";
    b.dataset.label = cls;
    if (k < 9) b.append(el("kbd", null, k + 1));
    b.append(cls);
    b.addEventListener("click", () => { setFocus(pos); decide("relabel", cls); });
    acts.append(b);
  });
  c.append(acts);
  paint(c, it);
  if (!S.cards.has(i)) S.cards.set(i, []);
  S.cards.get(i).push(c);
  return c;
}

function paint(c, it) {
  // Show one item's decision on one of its cards.
  c.classList.remove("status-keep", "status-exclude", "status-relabel");
  if (it.status) c.classList.add(`status-${it.status}`);
  c.querySelector(".badge").textContent = statusText(it);
  c.querySelector(".badge").hidden = !it.status;
  const relabelled = it.status === "relabel";
  c.querySelector(".old").textContent = relabelled ? `${it.label} ` : "";
  c.querySelector(".label-now").textContent = relabelled ? `→ ${it.new_label}` : it.label;
  const current = it.new_label || it.label;
  const pred = c.querySelector(".pred");
  if (pred) pred.className = `pred ${it.pred === current ? "right" : "wrong"}`;
  c.querySelector("button.keep").classList.toggle("on", it.status === "keep");
  c.querySelector("button.exclude").classList.toggle("on", it.status === "exclude");
  for (const b of c.querySelectorAll("button.relabel")) {
    b.classList.toggle("on", relabelled && b.dataset.label === it.new_label);
    b.classList.toggle("current", !relabelled && b.dataset.label === current);
    b.title = b.dataset.label === it.label ? "the original label (same as keep)" : `relabel as ${b.dataset.label}`;
  }
}

function pairBlock(p, pos, a, b) {
  const row = el("div", "pair");
  const info = el("div", "pair-info");
  info.append(el("div", "sim", fmt(p.similarity, 3)), el("div", "muted", "cosine similarity"));
  if (p.exact) info.append(el("span", "tag exact", "identical files"));
  const la = S.state.items[p.a].label, lb = S.state.items[p.b].label;
  info.append(la === lb ? el("span", "tag same", `both ${la}`) : el("span", "tag cross", `${la} vs ${lb}`));
  if (S.state.items[p.a].valid !== S.state.items[p.b].valid) {
    const leak = el("span", "tag cross", "train + valid");
    leak.title = "one is in the training set, the other in the validation set: the validation score is flattered";
    info.append(leak);
  }
  row.append(a, info, b);
  return row;
}

function render() {
  S.cards = new Map();
  const list = $("list");
  list.replaceChildren();
  const n = Math.min(S.shown, S.entries.length);
  if (!S.entries.length) list.append(el("p", "empty", EMPTY[S.view]));
  if (S.view === "duplicates") {
    for (let pos = 0; pos < n; pos += 2) {
      const e = S.entries[pos];
      list.append(pairBlock(e.pair, pos, card(pos, e), card(pos + 1, S.entries[pos + 1])));
    }
  } else {
    const grid = el("div", "grid");
    for (let pos = 0; pos < n; pos++) grid.append(card(pos, S.entries[pos]));
    list.append(grid);
  }
  const more = $("more");
  more.hidden = n >= S.entries.length;
  more.textContent = `Show more (${S.entries.length - n} left)`;
  renderHeader();
  setIntro();
  showFocus(false);
}

function cardAt(pos) {
  return document.querySelector(`.card[data-pos="${pos}"]`);
}

function showFocus(scroll) {
  for (const c of document.querySelectorAll(".card.focused")) c.classList.remove("focused");
  const c = cardAt(S.focus);
  if (c) {
    c.classList.add("focused");
    if (scroll) c.scrollIntoView({ block: "nearest", behavior: "auto" });
  }
  if (S.zoom) renderZoom();
  remember();
}

function setFocus(pos, scroll = true) {
  if (!S.entries.length) return;
  pos = Math.max(0, Math.min(S.entries.length - 1, pos));
  S.focus = pos;
  if (pos >= Math.min(S.shown, S.entries.length)) {
    S.shown = Math.ceil((pos + 1) / PAGE) * PAGE;
    render();
  }
  showFocus(scroll);
}

function columns() {
  // Cards per row in the grid as laid out now (a duplicate pair is a row of two).
  if (S.view === "duplicates") return 2;
  const cards = document.querySelectorAll(".grid .card");
  if (!cards.length) return 1;
  const top = cards[0].offsetTop;
  let k = 0;
  while (k < cards.length && cards[k].offsetTop === top) k++;
  return Math.max(1, k);
}

function remember() {
  const it = S.entries[S.focus] && S.state.items[S.entries[S.focus].i];
  const hash = `#view=${S.view}` + (it ? `&item=${encodeURIComponent(it.name)}` : "");
  if (location.hash !== hash) history.replaceState(null, "", hash);
  try { localStorage.setItem("ursa-clean-position", hash); } catch (e) { /* private mode: the hash still works */ }
}

function switchView(view, itemName) {
  S.view = view;
  S.entries = entriesFor(view);
  S.shown = PAGE;
  let pos = -1;
  if (itemName) pos = S.entries.findIndex((e) => S.state.items[e.i].name === itemName);
  if (pos < 0) pos = S.entries.findIndex((e) => !S.state.items[e.i].status);  // first undecided
  S.focus = Math.max(0, pos);
  if (S.focus >= S.shown) S.shown = Math.ceil((S.focus + 1) / PAGE) * PAGE;
  render();
  showFocus(true);
}

function flash(text, failed) {
  const s = $("saved");
  s.textContent = text;
  s.classList.toggle("failed", !!failed);
}

async function decide(action, label) {
  const entry = S.entries[S.focus];
  if (!entry) return;
  const i = entry.i, it = S.state.items[i];
  if (action === "relabel" && label === it.label) action = "keep";  // back to the original label
  const cards = S.cards.get(i) || [];
  cards.forEach((c) => c.classList.add("pending"));
  try {
    const r = await fetch("/api/decide", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: it.name, action, label: label || "" }),
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `the cleaner answered ${r.status}`);
    it.status = body.item.status;
    it.new_label = body.item.status === "relabel" ? body.item.label : null;
    S.state.summary = body.summary;
    (S.cards.get(i) || []).forEach((c) => paint(c, it));
    $("error").hidden = true;
    flash(`saved ${new Date().toLocaleTimeString()}: ${it.name} ${statusText(it) || "undecided"}`);
    renderHeader();
    if (S.zoom) renderZoom();
    if ($("advance").checked && action !== "undo" && S.entries[S.focus] === entry) setFocus(S.focus + 1);
  } catch (e) {
    flash("NOT saved", true);
    const err = $("error");
    err.textContent = `Not saved: ${e.message}. Is \`ursa clean\` still running? Your earlier decisions are safe on disk.`;
    err.hidden = false;
  } finally {
    cards.forEach((c) => c.classList.remove("pending"));
  }
}

function openZoom() {
  S.zoom = true;
  $("zoom").hidden = false;
  renderZoom();
}

function closeZoom() {
  S.zoom = false;
  $("zoom").hidden = true;
  $("zoom-card").replaceChildren();
}

function renderZoom() {
  const entry = S.entries[S.focus];
  if (!entry) return closeZoom();
  const it = S.state.items[entry.i];
  const img = $("zoom-img");
  img.hidden = !!it.error;
  if (!it.error) img.src = `/image?path=${encodeURIComponent(it.name)}`;
  img.alt = it.name;
  // A second card for the same item, kept in sync by paint() like the others.
  const holder = $("zoom-card");
  const list = S.cards.get(entry.i) || [];
  S.cards.set(entry.i, list.filter((c) => !holder.contains(c)));
  holder.replaceChildren(card(S.focus, entry));
  holder.querySelector(".card").classList.add("focused");
  holder.querySelector(".card").removeAttribute("data-pos");
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.target instanceof HTMLInputElement) return;
  const k = ev.key;
  const help = $("help");
  if (k === "Escape") {
    if (!help.hidden) help.hidden = true;
    else if (S.zoom) closeZoom();
    return;
  }
  if (k === "?") { help.hidden = !help.hidden; ev.preventDefault(); return; }
  if (!help.hidden) return;
  let handled = true;
  if (k === "k" || k === "K") decide("keep");
  else if (k === "x" || k === "X" || k === "Delete" || k === "Backspace") decide("exclude");
  else if (k === "u" || k === "U") decide("undo");
  else if (/^[1-9]$/.test(k)) {
    const cls = S.state.classes[Number(k) - 1];
    if (cls !== undefined) decide("relabel", cls); else handled = false;
  } else if (k === "ArrowRight" || k === "j" || k === "n") setFocus(S.focus + 1);
  else if (k === "ArrowLeft" || k === "p") setFocus(S.focus - 1);
  else if (k === "ArrowDown") setFocus(S.focus + (S.zoom ? 1 : columns()));
  else if (k === "ArrowUp") setFocus(S.focus - (S.zoom ? 1 : columns()));
  else if (k === "Enter" || k === "z") { if (S.zoom) closeZoom(); else openZoom(); }
  else if (k === "]" || k === "[") {
    const visible = VIEWS.filter((v) => v !== "unreadable" || S.state.views.unreadable.length);
    const j = visible.indexOf(S.view) + (k === "]" ? 1 : -1);
    switchView(visible[(j + visible.length) % visible.length]);
  } else handled = false;
  if (handled) ev.preventDefault();
}

function startPosition() {
  let hash = location.hash;
  if (!hash) { try { hash = localStorage.getItem("ursa-clean-position") || ""; } catch (e) { hash = ""; } }
  const q = new URLSearchParams(hash.replace(/^#/, ""));
  const view = VIEWS.includes(q.get("view")) ? q.get("view") : "losses";
  return [view, q.get("item")];
}

async function main() {
  try {
    await loadState();
  } catch (e) {
    const err = $("error");
    err.textContent = `Cannot load the cleaner's data: ${e.message}. Is \`ursa clean\` running?`;
    err.hidden = false;
    return;
  }
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => switchView(b.dataset.view));
  $("more").addEventListener("click", () => { S.shown += PAGE; render(); });
  $("zoom").addEventListener("click", (ev) => { if (ev.target === $("zoom")) closeZoom(); });
  $("help").addEventListener("click", (ev) => { if (ev.target === $("help")) $("help").hidden = true; });
  document.addEventListener("keydown", onKey);
  const [view, item] = startPosition();
  switchView(view, item);
  document.body.dataset.ready = "1";  // for tests: the page has drawn its first view
}

main();
