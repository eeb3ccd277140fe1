// advguard guard dashboard. Every value from the server is put into the page as text
// (textContent, attributes set with setAttribute on known-safe values), never as HTML.
"use strict";

(function () {
  const KEY = "advguard-admin-key";
  const POLL_MS = 5000;
  const ACTIONS = ["allow", "fallback", "review", "reject", "block"];
  const COLORS = { allow: "#2f8f4e", fallback: "#3f6fd1", review: "#c98a00", reject: "#c23b3b", block: "#7b2cbf" };
  const ID_RE = /^[0-9a-f]{32}$/;
  const PNG_RE = /^data:image\/png;base64,[A-Za-z0-9+/]+=*$/;
  const history = [];
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function getKey() { return sessionStorage.getItem(KEY); }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.className = isError ? "error" : "";
  }

  class AuthError extends Error {}

  async function api(path, method, body) {
    const key = getKey();
    if (!key) throw new AuthError("no key");
    const opts = { method: method || "GET", headers: { "X-API-Key": key, "Accept": "application/json" },
      cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    if (r.status === 401 || r.status === 403) {
      let detail = "the key was refused";
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new AuthError(detail);
    }
    if (!r.ok) {
      let detail = "HTTP " + r.status;
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return r.json();
  }

  // -- counters from the metrics registry ---------------------------------------------------
  function family(summary, name) {
    return (summary.metrics || []).find((f) => f.name === name) || { samples: [] };
  }

  function total(summary, name, sampleName, keep) {
    let s = 0;
    for (const x of family(summary, name).samples) {
      if (x.name === sampleName && (!keep || keep(x.labels))) s += Number(x.value) || 0;
    }
    return s;
  }

  function byAction(summary) {
    const out = {};
    for (const a of ACTIONS) out[a] = 0;
    for (const x of family(summary, "advguard_guard_decisions").samples) {
      if (x.name !== "advguard_guard_decisions_total") continue;
      const a = String(x.labels.action);
      out[a] = (out[a] || 0) + (Number(x.value) || 0);
    }
    return out;
  }

  function latencyQuantile(summary, q) {
    const buckets = {};
    let count = 0;
    for (const x of family(summary, "advguard_guard_request_latency_seconds").samples) {
      if (x.name === "advguard_guard_request_latency_seconds_bucket") {
        const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
        buckets[le] = (buckets[le] || 0) + Number(x.value);
      } else if (x.name === "advguard_guard_request_latency_seconds_count") {
        count += Number(x.value);
      }
    }
    if (!count) return null;
    const bounds = Object.keys(buckets).map(Number).sort((a, b) => a - b);
    for (const b of bounds) if (buckets[b] >= q * count) return b;
    return null;
  }

  function fmt(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return Number.isInteger(n) ? String(n) : n.toFixed(3);
  }

  function tile(label, value, id) {
    const t = el("div", null, "tile");
    t.setAttribute("data-counter", id);
    t.appendChild(el("div", value, "value"));
    t.appendChild(el("div", label, "label"));
    return t;
  }

  function renderCounters(summary) {
    $("model").textContent = "model " + summary.model + " · version " + summary.version;
    const acts = byAction(summary);
    const decisions = Object.values(acts).reduce((a, b) => a + b, 0);
    const notAllowed = decisions - (acts.allow || 0);
    const requests = total(summary, "advguard_guard_requests", "advguard_guard_requests_total");
    const errors = total(summary, "advguard_guard_requests", "advguard_guard_requests_total",
      (l) => String(l.status).startsWith("5"));
    const p95 = latencyQuantile(summary, 0.95);
    const c = $("counters");
    c.replaceChildren(
      tile("requests", fmt(requests), "requests"),
      tile("decisions", fmt(decisions), "decisions"),
      tile("flagged share", decisions ? (100 * notAllowed / decisions).toFixed(1) + "%" : "–", "flagged-share"),
      tile("sent to review", fmt(acts.review || 0), "review"),
      tile("rejected or blocked", fmt((acts.reject || 0) + (acts.block || 0)), "rejected"),
      tile("5xx answers", fmt(errors), "errors"),
      tile("rate-limited", fmt(total(summary, "advguard_guard_rate_limited", "advguard_guard_rate_limited_total")), "rate-limited"),
      tile("auth failures", fmt(total(summary, "advguard_guard_auth_failures", "advguard_guard_auth_failures_total")), "auth-failures"),
      tile("latency p95 (bucket)", p95 === null ? "–" : (p95 === Infinity ? "> 10 s" : p95 * 1000 + " ms"), "latency"),
    );
    history.push({ t: Date.now() / 1000, acts: acts });
    if (history.length > 120) history.shift();
    drawRates();
    drawBars(acts);
  }

  // -- charts on canvas ----------------------------------------------------------------------
  function axes(ctx, w, h, pad, ymax, label) {
    ctx.strokeStyle = "#9aa3ad";
    ctx.fillStyle = "#66707c";
    ctx.font = "12px system-ui, sans-serif";
    ctx.beginPath();
    ctx.moveTo(pad, 8); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 8, h - pad);
    ctx.stroke();
    ctx.fillText(fmt(ymax) + (label || ""), 4, 16);
    ctx.fillText("0", pad - 14, h - pad);
  }

  function drawRates() {
    const cv = $("rate-chart");
    const ctx = cv.getContext("2d");
    const w = cv.width, h = cv.height, pad = 36;
    ctx.clearRect(0, 0, w, h);
    const pts = [];
    for (let i = 1; i < history.length; i++) {
      const dt = history[i].t - history[i - 1].t;
      const r = {};
      for (const a of ACTIONS) r[a] = dt > 0 ? Math.max(0, (history[i].acts[a] || 0) - (history[i - 1].acts[a] || 0)) / dt : 0;
      pts.push(r);
    }
    let ymax = 0;
    for (const r of pts) for (const a of ACTIONS) ymax = Math.max(ymax, r[a]);
    ymax = ymax > 0 ? ymax * 1.1 : 1;
    axes(ctx, w, h, pad, ymax, "/s");
    if (pts.length < 2) {
      ctx.fillText("collecting…", pad + 10, h / 2);
      return;
    }
    const x = (i) => pad + (i * (w - pad - 10)) / (pts.length - 1);
    const y = (v) => h - pad - (v / ymax) * (h - pad - 12);
    ACTIONS.forEach((a, k) => {
      ctx.strokeStyle = COLORS[a];
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach((r, i) => (i ? ctx.lineTo(x(i), y(r[a])) : ctx.moveTo(x(i), y(r[a]))));
      ctx.stroke();
      ctx.fillStyle = COLORS[a];
      ctx.fillText(a, pad + 10 + k * 70, h - 10);
    });
  }

  function drawBars(acts) {
    const cv = $("action-chart");
    const ctx = cv.getContext("2d");
    const w = cv.width, h = cv.height, pad = 36;
    ctx.clearRect(0, 0, w, h);
    const ymax = Math.max(1, ...ACTIONS.map((a) => acts[a] || 0));
    axes(ctx, w, h, pad, ymax);
    const bw = (w - pad - 20) / ACTIONS.length;
    ACTIONS.forEach((a, i) => {
      const v = acts[a] || 0;
      const bh = (v / ymax) * (h - pad - 16);
      ctx.fillStyle = COLORS[a];
      ctx.fillRect(pad + 8 + i * bw, h - pad - bh, bw - 12, bh);
      ctx.fillStyle = "#1d232b";
      ctx.fillText(a, pad + 8 + i * bw, h - 18);
      ctx.fillText(fmt(v), pad + 8 + i * bw, h - pad - bh - 4);
    });
  }

  // -- decisions -------------------------------------------------------------------------------
  function sampleNode(sample) {
    const box = el("div", null, "sample");
    if (sample.kind === "image") {
      for (const src of sample.images || []) {
        if (typeof src !== "string" || !PNG_RE.test(src)) continue;
        const img = document.createElement("img");
        img.setAttribute("alt", "flagged input");
        img.setAttribute("src", src);
        box.appendChild(img);
      }
    } else if (sample.kind === "text") {
      for (const row of sample.rows || []) box.appendChild(el("pre", row));
    } else {
      box.appendChild(el("div", "sha256 " + sample.fingerprint, "mono"));
      if (sample.note) box.appendChild(el("div", sample.note, "muted"));
    }
    if (sample.rows_total > (sample.images || sample.rows || []).length && sample.kind !== "fingerprint") {
      box.appendChild(el("div", "rows shown: " + (sample.images || sample.rows).length + " of " + sample.rows_total, "muted"));
    }
    return box;
  }

  function scoresText(scores) {
    const parts = [];
    for (const [name, v] of Object.entries(scores || {})) {
      const vals = Array.isArray(v) ? v : [v];
      parts.push(name + ": " + vals.map((x) => (x === null ? "–" : Number(x).toPrecision(4))).join(", "));
    }
    return parts.join("\n");
  }

  function actionBadge(action) {
    const a = ACTIONS.includes(action) ? action : "allow";
    return el("span", action, "action action-" + a);
  }

  function reasonsList(reasons) {
    const ul = el("ul", null, "reasons");
    for (const r of reasons || []) ul.appendChild(el("li", r));
    return ul;
  }

  function renderFlagged(list) {
    const box = $("flagged");
    box.replaceChildren();
    for (const d of list) {
      const card = el("article", null, "card flagged-card");
      if (ID_RE.test(d.id)) card.setAttribute("data-id", d.id);
      const h = el("h3");
      h.append(actionBadge(d.action), " ", el("span", d.ts.replace("T", " ").slice(0, 19)));
      card.appendChild(h);
      card.appendChild(el("div", d.model + " " + d.version + " · client " + d.key_id + " · " + d.id.slice(0, 12), "muted mono"));
      card.appendChild(sampleNode(d.sample));
      card.appendChild(el("pre", scoresText(d.scores), "mono scores"));
      card.appendChild(reasonsList(d.reasons));
      if (d.review_status) card.appendChild(el("div", "review: " + d.review_status, "review-status"));
      box.appendChild(card);
    }
    $("flagged-empty").hidden = list.length > 0;
  }

  function renderReview(list) {
    const body = $("review-body");
    body.replaceChildren();
    for (const d of list) {
      if (!ID_RE.test(d.id)) continue;
      const tr = document.createElement("tr");
      tr.setAttribute("data-id", d.id);
      tr.appendChild(el("td", d.ts.replace("T", " ").slice(0, 19)));
      const idCell = el("td", null, "mono");
      idCell.append(actionBadge(d.action), " ", el("span", d.id));
      tr.appendChild(idCell);
      const s = el("td");
      s.appendChild(sampleNode(d.sample));
      tr.appendChild(s);
      tr.appendChild(el("td", scoresText(d.scores), "mono"));
      const r = el("td");
      r.appendChild(reasonsList(d.reasons));
      tr.appendChild(r);
      const actions = el("td");
      for (const [verdict, label] of [["approve", "Approve"], ["reject", "Reject"]]) {
        const b = el("button", label, verdict);
        b.type = "button";
        b.setAttribute("data-id", d.id);
        b.addEventListener("click", () => review(d.id, verdict, b));
        actions.appendChild(b);
      }
      tr.appendChild(actions);
      body.appendChild(tr);
    }
    $("review-empty").hidden = list.length > 0;
    $("review-count").textContent = list.length ? String(list.length) : "";
  }

  async function review(id, verdict, button) {
    if (!ID_RE.test(id)) return;
    button.disabled = true;
    try {
      const r = await api("/v1/admin/review/" + encodeURIComponent(id) + "/" + verdict, "POST", {});
      $("notice").textContent = "decision " + id.slice(0, 12) + " " + r.review_status;
    } catch (e) {
      handleError(e);
    }
    await refresh();
  }

  // -- polling ---------------------------------------------------------------------------------
  function handleError(e) {
    if (e instanceof AuthError) {
      sessionStorage.removeItem(KEY);
      showLogin(e.message === "no key" ? "" : "Admin key refused: " + e.message);
    } else {
      setStatus("update failed: " + e.message, true);
    }
  }

  async function refresh() {
    try {
      const [summary, flagged, queue] = await Promise.all([
        api("/v1/admin/summary"),
        api("/v1/admin/flagged?limit=20"),
        api("/v1/admin/review?status=pending&limit=50"),
      ]);
      renderCounters(summary);
      renderFlagged(flagged.decisions || []);
      renderReview(queue.decisions || []);
      $("main").hidden = false;
      $("login").hidden = true;
      setStatus("updated " + new Date().toISOString().slice(11, 19) + " UTC");
    } catch (e) {
      handleError(e);
    }
  }

  function showLogin(message) {
    if (timer !== null) clearInterval(timer);
    timer = null;
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setStatus("");
  }

  function start() {
    history.length = 0;
    refresh();
    if (timer === null) timer = setInterval(refresh, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = $("admin-key").value.trim();
      $("admin-key").value = "";
      if (!v) return;
      sessionStorage.setItem(KEY, v);
      start();
    });
    $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
    $("refresh").addEventListener("click", refresh);
    if (getKey()) start(); else showLogin("");
  });
})();
