// ursa suggest --label: the page. Plain DOM, no build step, no external URLs. File names come from the
// user's disk, so text is only ever set with textContent, never parsed as HTML.
"use strict";

const S = { state: null, focus: 0, busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(msg) {
  const box = $("error");
  box.textContent = msg;
  box.hidden = !msg;
}

function summary() {
  const s = S.state.summary;
  $("summary").textContent = `${s.filed} filed, ${s.left} of ${s.shown} left` +
    (S.state.unreadable ? ` · ${S.state.unreadable} unreadable picture(s) skipped` : "");
  const r = $("retrain");
  r.hidden = s.filed === 0;
  r.textContent = `retrain with: ${S.state.retrain}`;
}

function card(item, i) {
  const c = el("article", "card");
  c.dataset.name = item.file;
  c.dataset.i = String(i);
  const thumb = el("div", "thumb");
  const img = el("img");
  img.alt = item.file;
  img.loading = "lazy";
  img.src = "/image?path=" + encodeURIComponent(item.file);
  thumb.append(img, el("span", "rank", String(i + 1)));
  const body = el("div", "body");
  body.append(el("div", "name", item.file));
  const g = el("div", "guess");
  g.append("guess: ", el("b", "", item.guess), ` ${(100 * item.prob).toFixed(0)}%`);
  body.append(g, el("div", "why", item.why), el("div", "filed-as"));
  const buttons = el("div", "buttons");
  S.state.classes.forEach((name, k) => {
    const b = el("button", name === item.guess ? "guess-button" : "", `${k + 1} ${name}`);
    b.type = "button";
    b.addEventListener("click", () => { S.focus = i; fileAs(i, name); });
    buttons.append(b);
  });
  body.append(buttons);
  c.append(thumb, body);
  c.addEventListener("click", () => setFocus(i));
  paint(c, item);
  return c;
}

function paint(c, item) {
  c.classList.toggle("status-filed", item.status === "filed");
  c.querySelector(".filed-as").textContent = item.status === "filed" ? `→ ${item.label} (${item.dest})` : "";
}

function cards() { return $("list").children; }

function setFocus(i) {
  const all = cards();
  if (!all.length) return;
  S.focus = Math.max(0, Math.min(all.length - 1, i));
  for (const c of all) c.classList.remove("focused");
  all[S.focus].classList.add("focused");
  all[S.focus].scrollIntoView({ block: "nearest" });
}

function nextOpen(from) {
  const items = S.state.items;
  for (let k = from + 1; k < items.length; k++) if (items[k].status !== "filed") return k;
  return from;
}

async function fileAs(i, label) {
  const item = S.state.items[i];
  if (!item || S.busy) return;
  S.busy = true;
  try {
    const r = await fetch("/api/file", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: item.file, label }),
    });
    const ans = await r.json();
    if (!r.ok) throw new Error(ans.error || `HTTP ${r.status}`);
    S.state.items[i] = ans.item;
    S.state.summary = ans.summary;
    paint(cards()[i], ans.item);
    summary();
    $("saved").textContent = `filed ${ans.item.file} → ${ans.item.dest}`;
    $("saved").classList.remove("failed");
    showError("");
    setFocus(nextOpen(i));
  } catch (e) {
    $("saved").textContent = "not saved";
    $("saved").classList.add("failed");
    showError(`could not file ${item.file}: ${e.message}`);
  } finally {
    S.busy = false;
  }
}

function onKey(ev) {
  if (ev.altKey || ev.ctrlKey || ev.metaKey || !S.state) return;
  const k = ev.key;
  if (k === "Enter") {
    const item = S.state.items[S.focus];
    if (item && item.status !== "filed") fileAs(S.focus, item.guess);
  } else if (/^[1-9]$/.test(k)) {
    const name = S.state.classes[Number(k) - 1];
    if (name) fileAs(S.focus, name);
  } else if (k === "ArrowRight" || k === "j") {
    setFocus(S.focus + 1);
  } else if (k === "ArrowLeft" || k === "k") {
    setFocus(S.focus - 1);
  } else {
    return;
  }
  ev.preventDefault();
}

async function load() {
  const r = await fetch("/api/state");
  S.state = await r.json();
  $("pool").textContent = `${S.state.pool} → ${S.state.data}`;
  const list = $("list");
  list.replaceChildren(...S.state.items.map(card));
  summary();
  const first = S.state.items.findIndex((it) => it.status !== "filed");
  setFocus(first < 0 ? 0 : first);
  document.body.dataset.ready = "1";
}

document.addEventListener("keydown", onKey);
load().catch((e) => showError(`could not load: ${e.message}`));
