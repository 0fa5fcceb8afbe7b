// The operations console's one script: refreshes the overview, draws its charts, and sends the
// retry and sign-out requests with the session's CSRF token. Every value from the server goes
// into the page with textContent or setAttribute, never as markup.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function flash(message, kind) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.className = kind || "ok";
  }

  async function send(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? "{}" : JSON.stringify(body),
    });
    let json = null;
    try { json = await response.json(); } catch (_) { json = null; }
    if (!response.ok) {
      const message = json && json.message ? json.message : "HTTP " + response.status;
      throw new Error(message);
    }
    return json;
  }

  // Asks with the page's <dialog>; resolves true when the operator confirms.
  function confirmWith(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  const signOut = document.getElementById("sign-out");
  if (signOut) {
    signOut.addEventListener("click", async () => {
      await fetch("/console/session/end", {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      window.location.assign("/console");
    });
  }

  const retryOne = document.getElementById("retry-event");
  if (retryOne) {
    retryOne.addEventListener("click", async () => {
      const id = retryOne.dataset.retryEvent;
      if (!(await confirmWith("Retry 1 failed event (" + id + ")? It goes back to pending and is published again."))) return;
      try {
        const result = await send("/console/api/events/" + encodeURIComponent(id) + "/retry");
        flash("Re-queued " + result.requeued + " event.", "ok");
        setTimeout(() => window.location.reload(), 1500);
      } catch (error) {
        flash("Retry failed: " + error.message, "error");
      }
    });
  }

  const retryMatching = document.getElementById("retry-matching");
  if (retryMatching) {
    retryMatching.addEventListener("click", async () => {
      const d = retryMatching.dataset;
      const filter = {};
      if (d.eventType) filter.eventType = d.eventType;
      if (d.since) filter.since = d.since;
      if (d.until) filter.until = d.until;
      if (d.eventId) filter.eventId = d.eventId;
      if (d.contactId) filter.contactId = d.contactId;
      try {
        const dry = await send("/console/api/events/retry", Object.assign({ dryRun: true }, filter));
        if (dry.matched === 0) { flash("No failed event matches this filter.", "ok"); return; }
        const noun = dry.matched === 1 ? "failed event" : "failed events";
        if (!(await confirmWith("Retry " + dry.matched + " " + noun + " matching this filter?"))) return;
        const result = await send("/console/api/events/retry", filter);
        flash("Re-queued " + result.requeued + " of " + result.matched + " matching events.", "ok");
        setTimeout(() => window.location.reload(), 1500);
      } catch (error) {
        flash("Retry failed: " + error.message, "error");
      }
    });
  }

  // ---- overview ----
  const overview = document.getElementById("overview");
  if (!overview) return;

  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  // A line chart of `series` ({key, values}) over `times` into `svg` (600 x 180 user units).
  function drawChart(svg, times, series) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const left = 44, right = 590, top = 10, bottom = 160;
    let max = 0;
    for (const s of series) for (const v of s.values) max = Math.max(max, v);
    max = max <= 0 ? 1 : max * 1.1;
    svg.appendChild(svgEl("line", { x1: left, y1: bottom, x2: right, y2: bottom, class: "axis" }));
    for (const f of [0, 0.5, 1]) {
      const y = bottom - f * (bottom - top);
      svg.appendChild(svgEl("line", { x1: left, y1: y, x2: right, y2: y, class: "grid" }));
      const label = svgEl("text", { x: left - 6, y: y + 4, class: "tick", "text-anchor": "end" });
      label.textContent = (max * f).toFixed(max * f >= 10 ? 0 : 1);
      svg.appendChild(label);
    }
    if (times.length === 0) {
      const note = svgEl("text", { x: (left + right) / 2, y: 90, class: "tick", "text-anchor": "middle" });
      note.textContent = "collecting samples…";
      svg.appendChild(note);
      return;
    }
    const t0 = times[0], t1 = times[times.length - 1];
    const span = Math.max(t1 - t0, 1);
    const x = (t) => left + ((t - t0) / span) * (right - left);
    const y = (v) => bottom - (v / max) * (bottom - top);
    for (const s of series) {
      const points = s.values.map((v, i) => x(times[i]).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
      svg.appendChild(svgEl("polyline", { points: points, class: "line " + s.key }));
    }
    const ago = svgEl("text", { x: left, y: 176, class: "tick" });
    ago.textContent = "-" + Math.round(span / 1000) + " s";
    svg.appendChild(ago);
    const now = svgEl("text", { x: right, y: 176, class: "tick", "text-anchor": "end" });
    now.textContent = "now";
    svg.appendChild(now);
  }

  // Text from a webhook, as the server renders it: isolated in <bdi>, with invisible and
  // direction-changing characters shown as their \u escape.
  const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]/u;
  function shown(text) {
    const bdi = el("bdi", { class: "data" });
    for (const c of String(text)) {
      if (HIDDEN.test(c)) {
        bdi.appendChild(el("span", { class: "ctl", title: "invisible or direction control character" },
          "\\u" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")));
      } else if (bdi.lastChild && bdi.lastChild.nodeType === Node.TEXT_NODE) {
        bdi.lastChild.appendData(c);
      } else {
        bdi.appendChild(document.createTextNode(c));
      }
    }
    return bdi;
  }

  function setField(name, value) {
    for (const node of overview.querySelectorAll('[data-field="' + name + '"]')) node.textContent = value;
  }

  function render(o) {
    for (const key of ["received", "published", "processed", "failed", "unpublished", "unprocessed"]) {
      setField(key, String(o[key]));
    }
    setField("oldestUnpublishedAgeSecs", o.oldestUnpublishedAgeSecs.toFixed(1));
    setField("oldestUnprocessedAgeSecs", o.oldestUnprocessedAgeSecs.toFixed(1));
    setField("windowMinutes", Math.max(1, Math.round(o.windowSecs / 60)));
    const updated = document.getElementById("updated");
    updated.textContent = new Date(o.generatedAt).toLocaleTimeString();
    overview.dataset.generatedAt = o.generatedAt;
    overview.dataset.unprocessed = String(o.unprocessed);

    const times = o.rates.map((p) => Date.parse(p.at));
    const perSec = (key) => o.rates.map((p) => (p.intervalSecs > 0 ? p[key] / p.intervalSecs : 0));
    drawChart(document.getElementById("rate-chart"), times, [
      { key: "received", values: perSec("received") },
      { key: "published", values: perSec("published") },
      { key: "processed", values: perSec("processed") },
    ]);
    drawChart(document.getElementById("backlog-chart"), times, [
      { key: "unprocessed", values: o.rates.map((p) => p.unprocessed) },
      { key: "unpublished", values: o.rates.map((p) => p.unpublished) },
    ]);

    const alerts = document.getElementById("alerts");
    alerts.replaceChildren(...o.alerts.map((a) => {
      const row = el("tr", { class: a.firing ? "firing" : a.evaluated ? "quiet" : "elsewhere", "data-alert": a.name });
      row.appendChild(el("td", {}, a.name));
      row.appendChild(el("td", {}, a.severity));
      row.appendChild(el("td", { class: "state" }, a.firing ? "FIRING" : a.evaluated ? "ok" : "n/a"));
      row.appendChild(el("td", {}, a.detail));
      return row;
    }));

    const readiness = document.getElementById("readiness");
    const dependencies = o.readiness.dependencies.slice();
    if (o.consumerGroup && !dependencies.some((d) => d.name === "consumer")) dependencies.push(o.consumerGroup);
    readiness.replaceChildren(...dependencies.map((d) => {
      const item = el("li", { class: d.up ? "up" : "down", "data-dependency": d.name });
      item.appendChild(el("strong", {}, d.name));
      item.appendChild(document.createTextNode(d.up ? " up" : " down: " + (d.error || "")));
      return item;
    }));

    const failures = document.getElementById("recent-failures");
    failures.replaceChildren(...o.recentFailures.map((e) => {
      const row = el("tr", { "data-event-id": e.eventId });
      row.appendChild(el("td", { class: "time" }, new Date(e.receivedAt).toISOString()));
      const link = el("a", { href: "/console/events/" + encodeURIComponent(e.eventId), class: "event-link" });
      link.appendChild(shown(e.eventId));
      row.appendChild(el("td")).appendChild(link);
      row.appendChild(el("td", {}, e.eventType));
      const contact = el("a", { href: "/console/contacts/" + encodeURIComponent(e.contactId) });
      contact.appendChild(shown(e.contactId));
      row.appendChild(el("td")).appendChild(contact);
      row.appendChild(el("td", { class: "error" })).appendChild(shown(e.error || ""));
      return row;
    }));
    document.getElementById("no-failures").hidden = o.recentFailures.length > 0;
    document.getElementById("all-failures").hidden = o.recentFailures.length === 0;

    const partitions = document.getElementById("partitions");
    partitions.replaceChildren(...o.partitions.map((p) => {
      const row = el("tr", { class: p.owned ? "" : "unowned" });
      row.appendChild(el("td", {}, p.topic));
      row.appendChild(el("td", { class: "num" }, p.partition));
      row.appendChild(el("td", {}, p.owned ? p.owner || "?" : "none" + (p.owner ? " (was " + p.owner + ")" : "")));
      row.appendChild(el("td", { class: "num" }, p.nextOffset === null ? "—" : p.nextOffset));
      row.appendChild(el("td", { class: "num" }, p.lag === null ? "—" : p.lag));
      return row;
    }));
    document.getElementById("no-partitions").hidden = o.partitions.length > 0;
  }

  async function refresh() {
    try {
      const response = await fetch("/console/api/overview", { credentials: "same-origin" });
      if (response.status === 401) { window.location.assign("/console"); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
      flash("", "ok");
    } catch (error) {
      flash("Overview not refreshed: " + error.message, "error");
    }
  }
  refresh();
  setInterval(refresh, 2000);
})();
