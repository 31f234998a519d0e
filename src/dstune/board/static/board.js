// dstune board: the form diff, launches, live curves (server-sent events from the run's events.jsonl), chat.
"use strict";
const TOKEN = document.querySelector('meta[name="board-token"]').content;
const $ = (sel) => document.querySelector(sel);

async function api(method, url, body) {
  const response = await fetch(url, {
    method, headers: {"Content-Type": "application/json", "X-Board-Token": TOKEN},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = {error: `HTTP ${response.status}`}; }
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

for (const select of document.querySelectorAll("select[data-submit]")) {
  select.addEventListener("change", () => select.form.submit());
}

// ---- recipe form ------------------------------------------------------------------------------------------------
function formValues() {
  const values = {};
  for (const input of document.querySelectorAll("#recipe [data-initial]")) {
    if (input.value !== input.dataset.initial) values[input.name] = input.value;
  }
  return values;
}

let checks = 0;
async function checkRecipe() {
  const root = $("#recipe");
  const asked = ++checks;
  const result = await api("POST", "/api/recipe/check", {base: root.dataset.base, values: formValues()});
  if (asked !== checks) return null;  // a later edit's answer is on its way (answers may arrive out of order)
  $("#cli").textContent = result.command;
  const check = $("#check");
  check.textContent = result.ok ? `valid: run ${result.run} in ${result.run_dir}` : result.error;
  check.className = result.ok ? "check ok" : "check error";
  for (const row of document.querySelectorAll("#recipe tr[data-key]")) {
    const input = row.querySelector("[data-initial]");
    row.classList.toggle("changed", input.value !== input.dataset.initial);
  }
  return result;
}

if ($("#recipe")) {
  let timer = null;
  $("#recipe").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(checkRecipe, 200); });
  $("#recipe").addEventListener("change", checkRecipe);
  checkRecipe();
  $("#expand-all").addEventListener("click", () => {
    for (const details of document.querySelectorAll("details.section")) details.open = true;
  });
  $("#copy-cli").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("#cli").textContent); $("#copy-cli").textContent = "Copied"; }
    catch (e) { $("#copy-cli").textContent = "Select the command above to copy it"; }
  });
  $("#launch").addEventListener("click", async () => {
    try {
      const started = await api("POST", "/api/runs/launch", {base: $("#recipe").dataset.base, values: formValues()});
      window.location = `/runs/${encodeURIComponent(started.run)}`;
    } catch (e) { $("#check").textContent = e.message; $("#check").className = "check error"; }
  });
  $("#save").addEventListener("click", async () => {
    try {
      const saved = await api("POST", "/api/recipe/save", {base: $("#recipe").dataset.base, values: formValues(),
        path: $("#save-path").value, overwrite: $("#save-overwrite").checked});
      $("#save-result").textContent = `saved ${saved.saved}`;
      $("#save-result").className = "ok";
    } catch (e) { $("#save-result").textContent = e.message; $("#save-result").className = "error"; }
  });
}

// ---- charts: one SVG polyline per series --------------------------------------------------------------------------
function drawChart(svg, points, color) {
  const W = 480, H = 240, L = 48, B = 24, T = 8, R = 8;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.appendChild(el);
    return el;
  };
  add("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "frame"});
  if (!points.length) { add("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis"}, svg.dataset.empty || "waiting for steps"); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const y of [y0, (y0 + y1) / 2, y1]) add("text", {x: L - 4, y: sy(y) + 4, "text-anchor": "end", class: "axis"}, y.toPrecision(3));
  add("text", {x: sx(x0), y: H - 6, "text-anchor": "start", class: "axis"}, `step ${x0}`);
  add("text", {x: sx(x1), y: H - 6, "text-anchor": "end", class: "axis"}, `step ${Math.max(...xs)}`);
  add("polyline", {points: points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), stroke: color, fill: "none", "stroke-width": 2,
    "data-points": points.length, class: "series"});
  for (const p of points.length <= 60 ? points : []) add("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color});
}

// ---- one run ----------------------------------------------------------------------------------------------------
if ($("#run")) {
  const name = $("#run").dataset.run;
  const loss = new Map(), dev = new Map();
  let metric = null;
  const redraw = () => {
    drawChart($("#chart-loss"), [...loss.entries()].sort((a, b) => a[0] - b[0]), "#1f77b4");
    drawChart($("#chart-dev"), [...dev.entries()].sort((a, b) => a[0] - b[0]), "#d62728");
  };
  redraw();
  const events = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  events.onmessage = (message) => {
    for (const event of JSON.parse(message.data)) {
      if (event.event === "stage" && event.status === "start" && !event.resumed_from) { loss.clear(); dev.clear(); }
      if (event.event === "step" && event.loss !== null && event.loss !== undefined) {
        loss.set(event.step, event.loss);
        $("#last-step").textContent = `${event.step} (loss ${event.loss.toFixed(4)})`;
        $("#last-step").dataset.step = event.step;
      }
      if (event.event === "eval") {
        const key = Object.keys(event).find((k) => k.startsWith("eval_") && !["eval_loss", "eval_runtime"].includes(k)) || "eval_loss";
        metric = key.replace(/^eval_/, "");
        if (event[key] !== null) dev.set(event.step, event[key]);
      }
    }
    if (metric) $("#dev-metric").textContent = metric;
    redraw();
  };
  const refresh = async () => {
    try {
      const status = await api("GET", `/api/runs/${encodeURIComponent(name)}/status`);
      $("#state").textContent = status.state;
      $("#state").dataset.state = status.state;
      $("#error").hidden = !status.error;
      $("#error").textContent = status.error || "";
      $("#log").textContent = status.log;
      $("#command").textContent = status.command || "";
      $("#stop").disabled = status.state !== "running";
      $("#resume").disabled = !status.resumable;
      const rows = status.exports.map((e) => {
        const r = e.record;
        const gate = r ? (r.passed ? "passed" : "FAILED") : (e.state === "running" ? "…" : (e.error || ""));
        return `<tr data-spec="${e.spec}" data-state="${e.state}"><td>${e.spec}</td><td>${e.state}</td>` +
          `<td>${r ? r.retention.toFixed(3) : ""}</td><td>${r ? (100 * r.size_ratio).toFixed(1) + "%" : ""}</td>` +
          `<td class="gate">${gate.replace(/</g, "&lt;")}</td></tr>`;
      });
      $("#exports").innerHTML = "<tr><th>export</th><th>state</th><th>retention</th><th>size</th><th>gate</th></tr>" + rows.join("");
    } catch (e) { $("#error").hidden = false; $("#error").textContent = e.message; }
  };
  refresh();
  setInterval(refresh, 1000);
  $("#stop").addEventListener("click", () => api("POST", `/api/runs/${encodeURIComponent(name)}/stop`).then(refresh, (e) => alert(e.message)));
  $("#resume").addEventListener("click", () => api("POST", `/api/runs/${encodeURIComponent(name)}/resume`).then(refresh, (e) => alert(e.message)));
  $("#export").addEventListener("click", () => api("POST", `/api/runs/${encodeURIComponent(name)}/export`, {spec: $("#export-spec").value}).then(refresh, (e) => alert(e.message)));
}

// ---- chat -------------------------------------------------------------------------------------------------------
if ($("#chat")) {
  const name = $("#chat").dataset.run;
  const url = `/api/chat/${encodeURIComponent(name)}`;
  const show = (state) => {
    $("#serve-state").textContent = state.state + (state.error ? `: ${state.error}` : "");
    $("#serve-state").dataset.state = state.state;
    $("#send").disabled = state.state !== "ready";
  };
  const poll = async () => { try { show(await api("GET", url)); } catch (e) { show({state: "error", error: e.message}); } };
  poll();
  setInterval(poll, 1000);
  $("#serve-start").addEventListener("click", () => api("POST", `${url}/start`).then(show, (e) => show({state: "error", error: e.message})));
  $("#serve-stop").addEventListener("click", () => api("POST", `${url}/stop`).then(poll, (e) => alert(e.message)));
  $("#send").addEventListener("click", async () => {
    $("#answers").textContent = "…";
    try {
      const result = await api("POST", url, {prompt: $("#prompt").value});
      $("#answers").replaceChildren(...result.answers.map((a) => {
        const box = document.createElement("div");
        box.className = "answer";
        box.dataset.model = a.model;
        const head = document.createElement("h3");
        head.textContent = a.model;
        const body = document.createElement("pre");
        body.textContent = a.error ? `error: ${a.error}` : a.content;
        box.append(head, body);
        return box;
      }));
    } catch (e) { $("#answers").textContent = e.message; }
  });
}
