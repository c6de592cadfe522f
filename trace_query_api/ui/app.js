// The dashboards page (/ui/) and the embed page (/ui/embed/<id>) of the Trace query service.
// Plain ES module, no build step. Charts: window.vegaEmbed from /ui/static/vega.js (loaded
// before this module). Every value from the server is written with textContent, never as HTML.

const EMBED = document.body.dataset.mode === "embed";
const TOKEN_KEY = "trace.token";
const TABLE_ROWS = 200;
const $ = (id) => document.getElementById(id);

let token = EMBED ? embedToken() : sessionStorage.getItem(TOKEN_KEY);
let lastResult = null; // the editor's last result
let draft = { id: null, panels: [] }; // the dashboard being built
let current = null; // the dashboard shown: {id, version, spec}
let saved = []; // the organisation's saved queries
const drills = {}; // panel id -> {parameter: value} set by a click

function embedToken() {
  // the token travels in the fragment (never sent to a server); drop it from the address bar
  const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  const found = match ? decodeURIComponent(match[1]) : null;
  if (found) history.replaceState(null, "", window.location.pathname);
  return found;
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  if (text !== null) node.textContent = String(text);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new Error(`${error.code || response.status}: ${error.message || response.statusText}`);
  }
  return data;
}

async function guarded(action) {
  try {
    showError("");
    return await action();
  } catch (error) {
    showError(error.message);
    return undefined;
  }
}

// -- results: tables and charts -------------------------------------------------------------

function renderTable(container, result) {
  container.replaceChildren();
  const table = el("table");
  const head = el("tr");
  for (const column of result.columns) head.append(el("th", { title: column.type }, column.name));
  table.append(el("thead"), el("tbody"));
  table.tHead.append(head);
  for (const row of result.rows.slice(0, TABLE_ROWS)) {
    const tr = el("tr");
    for (const value of row) tr.append(el("td", {}, value === null ? "∅" : value));
    table.tBodies[0].append(tr);
  }
  container.append(table);
}

function fieldType(result, name) {
  const column = result.columns.find((c) => c.name === name);
  const type = column ? column.type.toUpperCase() : "";
  if (/DATE|TIME/.test(type)) return "temporal";
  if (/INT|DECIMAL|DOUBLE|FLOAT|REAL|NUMERIC/.test(type)) return "quantitative";
  return "nominal";
}

function isDate(result, name) {
  const column = result.columns.find((c) => c.name === name);
  return Boolean(column) && column.type.toUpperCase() === "DATE";
}

function isBlockAxis(name) {
  return /block/i.test(name);
}

function escapeField(name) {
  return name.replace(/[.[\]\\]/g, "\\$&");
}

function chartSpec(result, chart) {
  const names = result.columns.map((c) => c.name);
  const values = result.rows.map((row, index) => {
    const datum = { _row: index };
    names.forEach((name, i) => {
      datum[name] = row[i];
    });
    return datum;
  });
  let xType = fieldType(result, chart.x);
  // bars: one per block, day or key (a discrete axis), not thin marks on a continuous one
  if (chart.kind === "bar") xType = "ordinal";
  const x = { field: escapeField(chart.x), type: xType, title: chart.x };
  if (xType === "quantitative" && isBlockAxis(chart.x)) {
    x.axis = { format: "d" }; // block numbers: no thousands separators
    x.scale = { zero: false };
  }
  if (xType === "temporal") {
    // the service's times are UTC; a DATE column is one tick per day, labelled by date
    x.scale = { type: "utc" };
    x.axis = { labelOverlap: true };
    if (isDate(result, chart.x)) {
      x.timeUnit = "utcyearmonthdate";
      x.axis.format = "%Y-%m-%d";
      x.axis.tickCount = { interval: "day", step: 1 };
    }
  }
  const mark = { type: chart.kind === "scatter" ? "point" : chart.kind, tooltip: true };
  if (chart.kind === "line" || chart.kind === "area") mark.point = true; // clickable points
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v5.json",
    width: 520,
    height: 220,
    data: { values },
    mark,
    encoding: {
      x,
      y: { field: escapeField(chart.y), type: "quantitative", title: chart.y },
    },
  };
}

async function renderChart(container, result, chart, onPick) {
  container.replaceChildren();
  if (!chart || chart.kind === "table") return;
  if (chart.kind === "number") {
    const index = result.columns.findIndex((c) => c.name === chart.y);
    const value = result.rows.length && index >= 0 ? result.rows[0][index] : "–";
    container.append(el("div", { className: "big-number" }, value));
    return;
  }
  const target = el("div", { className: "vega" });
  container.append(target);
  const embedded = await window.vegaEmbed(target, chartSpec(result, chart), {
    renderer: "svg",
    actions: false,
    ast: true, // Vega's expression interpreter: no eval, as the page's CSP requires
    // no injected <style> (the CSP allows this origin's stylesheets only): app.css styles both
    defaultStyle: false,
    tooltip: { disableDefaultStyle: true },
  });
  if (onPick) {
    embedded.view.addEventListener("click", (_event, item) => {
      if (item && item.datum && item.datum._row !== undefined) {
        const row = result.rows[item.datum._row];
        const picked = {};
        result.columns.forEach((c, i) => {
          picked[c.name] = row[i];
        });
        onPick(picked);
      }
    });
  }
  container.dataset.rendered = "true";
}

// -- the editor -------------------------------------------------------------------------------

function chartFromControls() {
  return { kind: $("chart-kind").value, x: $("chart-x").value || null, y: $("chart-y").value || null };
}

function fillAxes(result) {
  for (const id of ["chart-x", "chart-y"]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren();
    for (const column of result.columns) select.append(el("option", { value: column.name }, column.name));
    if (result.columns.some((c) => c.name === keep)) select.value = keep;
  }
  if (result.columns.length > 1 && $("chart-y").value === $("chart-x").value) {
    $("chart-y").value = result.columns[1].name;
  }
}

async function runEditor() {
  const result = await api("POST", "/v1/query", { sql: $("sql").value });
  lastResult = result;
  fillAxes(result);
  renderTable($("result"), result);
  $("result-meta").textContent = `${result.row_count} rows in ${result.elapsed_ms} ms`;
  await renderChart($("chart"), result, chartFromControls(), null);
}

async function draw() {
  if (!lastResult) await runEditor();
  else await renderChart($("chart"), lastResult, chartFromControls(), null);
}

// -- datasets ---------------------------------------------------------------------------------

async function loadDatasets() {
  const list = $("dataset-list");
  list.replaceChildren();
  const datasets = await api("GET", "/v1/datasets");
  for (const dataset of datasets.data) {
    const button = el("button", { type: "button", className: "dataset-name" }, dataset.name);
    button.addEventListener("click", () => guarded(() => showDataset(dataset.name)));
    const item = el("li", { "data-dataset": dataset.name });
    item.append(button, el("div", { className: "doc" }, dataset.description || ""));
    list.append(item);
  }
}

async function showDataset(name) {
  const info = await api("GET", `/v1/datasets/${encodeURIComponent(name)}`);
  const detail = $("dataset-detail");
  detail.replaceChildren(el("h3", {}, info.name), el("p", { className: "doc" }, info.description || ""));
  const table = el("table");
  table.append(el("tbody"));
  for (const column of info.columns) {
    const tr = el("tr");
    tr.append(el("td", {}, column.name), el("td", {}, column.type), el("td", { className: "doc" }, column.doc || ""));
    table.tBodies[0].append(tr);
  }
  detail.append(table);
}

// -- dashboards -------------------------------------------------------------------------------

async function loadDashboards() {
  const list = $("dashboard-list");
  list.replaceChildren();
  const dashboards = await api("GET", "/v1/dashboards");
  for (const dashboard of dashboards.data) {
    const button = el("button", { type: "button", className: "dataset-name" }, dashboard.name);
    button.addEventListener("click", () => guarded(() => openDashboard(dashboard.id)));
    const item = el("li", { "data-dashboard": dashboard.id });
    item.append(button, el("span", { className: "doc" }, ` v${dashboard.current_version}`));
    list.append(item);
  }
}

function renderDraft() {
  const list = $("draft-panels");
  list.replaceChildren();
  for (const panel of draft.panels) {
    const drill = panel.drill ? ` → drill ${panel.drill.panel}.${panel.drill.parameter}=${panel.drill.field}` : "";
    const source = panel.query_id ? " saved query" : "";
    list.append(el("li", {}, `${panel.id}: ${panel.title} (${panel.chart.kind}${source})${drill}`));
  }
}

function addPanel() {
  const panel = { id: $("panel-id").value.trim(), title: $("panel-title").value.trim() };
  const chosen = saved.find((q) => q.id === $("saved-query").value);
  if (chosen && chosen.sql === $("sql").value) panel.query_id = chosen.id;
  else panel.sql = $("sql").value;
  panel.chart = chartFromControls();
  if ($("drill-panel").value.trim()) {
    panel.drill = {
      panel: $("drill-panel").value.trim(),
      parameter: $("drill-parameter").value.trim(),
      field: $("drill-field").value.trim(),
    };
  }
  draft.panels = draft.panels.filter((p) => p.id !== panel.id).concat([panel]);
  renderDraft();
}

async function saveDashboard() {
  let parameters;
  try {
    parameters = JSON.parse($("dash-params").value || "[]");
  } catch (error) {
    throw new Error(`parameters: not JSON (${error.message}); e.g. [{"name": "day", "type": "date"}]`);
  }
  const spec = { name: $("dash-name").value.trim(), parameters, panels: draft.panels };
  const stored = draft.id
    ? await api("PUT", `/v1/dashboards/${draft.id}`, spec)
    : await api("POST", "/v1/dashboards", spec);
  draft = { id: stored.id, panels: stored.spec.panels.map(stripPanel) };
  renderDraft();
  await loadDashboards();
  await openDashboard(stored.id);
}

function stripPanel(panel) {
  const out = { id: panel.id, title: panel.title, chart: panel.chart };
  if (panel.query_id) out.query_id = panel.query_id;
  else out.sql = panel.sql;
  if (panel.drill) out.drill = panel.drill;
  return out;
}

function editDashboard() {
  if (!current) return;
  draft = { id: current.id, panels: current.spec.panels.map(stripPanel) };
  $("dash-name").value = current.spec.name;
  $("dash-params").value = JSON.stringify(current.spec.parameters || []);
  renderDraft();
}

async function openDashboard(id, version = null) {
  const query = version ? `?version=${version}` : "";
  const dashboard = await api("GET", `/v1/dashboards/${id}${query}`);
  const versions = await api("GET", `/v1/dashboards/${id}/versions`);
  const select = $("version");
  select.replaceChildren();
  for (const v of versions.data.slice().reverse()) {
    select.append(el("option", { value: String(v.version) }, `${v.version} (${v.created_by})`));
  }
  select.value = String(dashboard.version);
  await showDashboard({ id: dashboard.id, version: dashboard.version, spec: dashboard.spec });
}

// -- saved queries ------------------------------------------------------------------------------

async function loadSaved() {
  saved = (await api("GET", "/v1/saved-queries")).data;
  const select = $("saved-query");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "" }, "(none)"));
  for (const query of saved) select.append(el("option", { value: query.id }, query.name));
  if (saved.some((q) => q.id === keep)) select.value = keep;
}

function chooseSaved() {
  const chosen = saved.find((q) => q.id === $("saved-query").value);
  if (chosen) $("sql").value = chosen.sql;
}

async function saveQuery() {
  const created = await api("POST", "/v1/saved-queries", {
    name: $("query-name").value.trim(),
    sql: $("sql").value,
  });
  await loadSaved();
  $("saved-query").value = created.id;
}

async function showDashboard(dashboard) {
  current = dashboard;
  $("dashboard-view").hidden = false;
  $("dashboard-title").textContent = `${dashboard.spec.name} (version ${dashboard.version})`;
  const form = $("params");
  form.replaceChildren();
  for (const parameter of dashboard.spec.parameters || []) {
    const input = el("input", { name: parameter.name, id: `param-${parameter.name}` });
    input.placeholder = parameter.default === null || parameter.default === undefined ? parameter.type : String(parameter.default);
    const label = el("label", {}, `${parameter.label || parameter.name} `);
    label.append(input);
    form.append(label);
  }
  const container = $("panels");
  container.replaceChildren();
  for (const panel of dashboard.spec.panels) {
    const box = el("div", { className: "panel", "data-panel": panel.id });
    box.append(
      el("h3", {}, panel.title),
      el("div", { className: "filter" }),
      el("div", { className: "chart" }),
      el("div", { className: "table" }),
    );
    container.append(box);
  }
  await runAll();
}

async function runAll() {
  for (const key of Object.keys(drills)) delete drills[key];
  await Promise.all(current.spec.panels.map((panel) => runPanel(panel.id)));
}

function baseParameters() {
  const values = {};
  for (const input of $("params").querySelectorAll("input")) {
    if (input.value.trim() !== "") values[input.name] = input.value.trim();
  }
  return values;
}

async function runPanel(panelId) {
  const panel = current.spec.panels.find((p) => p.id === panelId);
  const box = document.querySelector(`.panel[data-panel="${panelId}"]`);
  if (!panel || !box) return;
  const parameters = { ...baseParameters(), ...(drills[panelId] || {}) };
  box.dataset.state = "running";
  const path = EMBED
    ? `/v1/embed/panels/${panelId}/run`
    : `/v1/dashboards/${current.id}/panels/${panelId}/run`;
  const body = EMBED ? { parameters } : { parameters, version: current.version };
  const result = await api("POST", path, body);
  renderFilter(box, panelId);
  renderTable(box.querySelector(".table"), result);
  const onPick = panel.drill ? (datum) => guarded(() => drill(panel, datum)) : null;
  await renderChart(box.querySelector(".chart"), result, panel.chart, onPick);
  box.dataset.state = "done";
}

function renderFilter(box, panelId) {
  const filter = box.querySelector(".filter");
  filter.replaceChildren();
  for (const [name, value] of Object.entries(drills[panelId] || {})) {
    filter.append(el("span", {}, `${name} = ${value}`));
    const reset = el("button", { type: "button" }, "clear");
    reset.addEventListener("click", () => {
      delete drills[panelId];
      guarded(() => runPanel(panelId));
    });
    filter.append(reset);
  }
}

async function drill(panel, datum) {
  const target = panel.drill.panel === "self" ? panel.id : panel.drill.panel;
  drills[target] = { [panel.drill.parameter]: datum[panel.drill.field] };
  await runPanel(target);
}

async function share() {
  const embed = await api("POST", `/v1/dashboards/${current.id}/embeds`, { ttl_s: 3600 });
  const field = $("share-url");
  field.value = new URL(embed.url, window.location.origin).href;
  field.hidden = false;
}

async function deleteDashboard() {
  await api("DELETE", `/v1/dashboards/${current.id}`);
  current = null;
  $("dashboard-view").hidden = true;
  await loadDashboards();
}

// -- start --------------------------------------------------------------------------------------

async function signedIn() {
  $("token-status").textContent = token ? "signed in" : "signed out";
  if (!token) return;
  await loadDatasets();
  await loadSaved();
  await loadDashboards();
}

function startApp() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token-input").value.trim();
    $("token-input").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    guarded(signedIn);
  });
  $("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    $("dataset-list").replaceChildren();
    $("dashboard-list").replaceChildren();
    $("token-status").textContent = "signed out";
  });
  $("run").addEventListener("click", () => guarded(runEditor));
  $("draw").addEventListener("click", () => guarded(draw));
  $("chart-kind").addEventListener("change", () => lastResult && guarded(draw));
  $("add-panel").addEventListener("click", addPanel);
  $("dash-new").addEventListener("click", () => {
    draft = { id: null, panels: [] };
    renderDraft();
  });
  $("save-dashboard").addEventListener("click", () => guarded(saveDashboard));
  $("apply-params").addEventListener("click", () => guarded(runAll));
  $("edit-dashboard").addEventListener("click", editDashboard);
  $("version").addEventListener("change", () => guarded(() => openDashboard(current.id, $("version").value)));
  $("saved-query").addEventListener("change", chooseSaved);
  $("save-query").addEventListener("click", () => guarded(saveQuery));
  $("share").addEventListener("click", () => guarded(share));
  $("delete-dashboard").addEventListener("click", () => guarded(deleteDashboard));
  guarded(signedIn);
}

async function startEmbed() {
  if (!token) {
    showError("this embed link has no token: open the full link, which ends in #token=...");
    return;
  }
  $("apply-params").addEventListener("click", () => guarded(runAll));
  const shared = await api("GET", "/v1/embed/dashboard");
  await showDashboard({ id: shared.dashboard_id, version: shared.version, spec: shared });
}

if (EMBED) guarded(startEmbed);
else startApp();
