// ursa serve's "why?": after a prediction, ask /explain for the heat map of the evidence for the
// predicted class and show it beside the answer. serve.js announces each answer with the event
// "ursa:predicted" ({file, body}); nothing here touches the prediction itself.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let current = null; // the file of the answer on show

  function reset() {
    $("why-figure").hidden = true;
    $("why-img").removeAttribute("src");
    $("why-note").textContent = "";
  }

  async function explain() {
    if (!current) return;
    const asked = current;
    const button = $("why");
    button.disabled = true;
    $("why-note").textContent = "drawing the evidence…";
    const form = new FormData();
    form.append("file", asked, asked.name || "upload");
    let response, body;
    try {
      response = await fetch("/explain", { method: "POST", body: form });
      body = await response.json();
    } catch (e) {
      body = { error: "Could not reach the server: " + e.message };
    }
    button.disabled = false;
    if (asked !== current) return; // another image was chosen meanwhile
    if (!response || !response.ok) {
      $("why-note").textContent = body && body.error ? body.error : `The server answered ${response.status}.`;
      return;
    }
    $("why-img").src = body.overlay;
    $("why-img").alt = `where the picture shows ${body.label}: brighter means more evidence`;
    $("why-caption").textContent = `evidence for ${body.label} (brighter: more)`;
    $("why-figure").hidden = false;
    $("why-note").textContent = "";
  }

  document.addEventListener("ursa:predicted", (e) => {
    current = e.detail.file;
    reset();
    $("why").hidden = false;
  });
  document.addEventListener("DOMContentLoaded", () => $("why").addEventListener("click", explain));
})();
