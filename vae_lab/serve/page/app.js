// The serve page. Every picture comes from a plain GET endpoint of vae_lab/serve.py,
// fetched here so that a refused request shows the server's one-line error.
"use strict";

const TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const $ = (id) => document.getElementById(id);

let current = null;  // GET /api/runs/<id> of the chosen run
let plane = null;    // the 2-D map: latents, bounds, clicked point

function runUrl(path, params) {
  const query = new URLSearchParams(params || {}).toString();
  return `/api/runs/${current.run_id}/${path}${query ? "?" + query : ""}`;
}

function showError(message) { $("status").textContent = message || ""; }

async function fetchJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// Put the PNG at `url` into `img` and return its X-Seed header. When requests for one image
// overlap (a dragged slider), only the latest one is shown.
async function showImage(img, url) {
  img.dataset.wanted = url;
  const response = await fetch(url);
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  const blob = await response.blob();
  if (img.dataset.wanted !== url) return null;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  return response.headers.get("X-Seed");
}

// Run an action from an event handler, showing its error (or clearing the last one).
function guarded(action) {
  return async (...args) => {
    try {
      showError("");
      await action(...args);
    } catch (error) {
      showError(error.message);
    }
  };
}

// ------------------------------------------------------------------ runs

function runLabel(run) {
  const name = run.run_name || run.run_id.slice(0, 8);
  // a study's trials are named by their swept values, often the model's name first: said once
  const parts = name.split(" · ")[0] === run.model ? [name] : [name, run.model];
  parts.push(`z=${run.latent_dim}`);
  if (run.kl_weight !== null) parts.push(`KL weight ${run.kl_weight}`);
  if (run.val_loss !== null) parts.push(`val/loss ${run.val_loss.toFixed(1)}`);
  if (run.test_loss !== null) parts.push(`test/loss ${run.test_loss.toFixed(1)}`);
  parts.push(run.study ? `${run.experiment} / ${run.study} #${run.trial}` : run.experiment);
  return parts.join(" · ");
}

async function loadRuns() {
  const listing = await fetchJson("/api/runs");
  const picker = $("run-picker");
  picker.replaceChildren(...listing.runs.map((run) => new Option(runLabel(run), run.run_id)));
  if (!listing.runs.length) throw new Error("no finished run with a model in this store");
  const asked = new URLSearchParams(location.search).get("run");
  picker.value = listing.runs.some((run) => run.run_id === asked) ? asked : listing.default;
  await chooseRun(picker.value);
}

async function chooseRun(runId) {
  current = await fetchJson(`/api/runs/${runId}`);
  history.replaceState(null, "", `?run=${runId}`);
  const kl = current.kl_weight === null ? "" : `, KL weight ${current.kl_weight}`;
  $("run-info").textContent = `${current.model}, latent size ${current.latent_dim}${kl}, ` +
    `${current.dataset}, ${current.test_count} test images`;

  const labels = $("label");
  const previous = labels.value;
  labels.replaceChildren(...current.class_names.map((name, index) =>
    new Option(name === String(index) ? name : `${index} · ${name}`, index)));
  if (previous !== "" && Number(previous) < current.class_names.length) labels.value = previous;

  const last = current.test_count - 1;
  for (const id of ["index-a", "index-b"]) {
    $(id).max = last;
    $(id).value = Math.min(Number($(id).value), last);
  }
  const twoD = current.latent_dim === 2;
  $("map-section").hidden = !twoD;
  $("interpolate-section").hidden = twoD;
  // every panel shows a picture on first paint: the generate panel draws its selected class
  await Promise.all([generate(), samplePrior(), twoD ? loadPlane() : interpolate()]);
}

// ------------------------------------------------------------------ generate and sample

async function generate() {
  const params = { label: $("label").value, count: $("count").value };
  if ($("seed").value !== "") params.seed = $("seed").value;
  const seed = await showImage($("generated"), runUrl("generate.png", params));
  const name = current.class_names[Number(params.label)];
  const how = current.variational ? "mean + std·ε of its posterior"
    : "its code (an autoencoder's posterior is a point, so they repeat)";
  $("generated-caption").textContent = `Class ${name}. Left of the rule: a test image; right: ` +
    `${params.count} samples decoded from ${how}. Seed ${seed}.`;
}

async function samplePrior() {
  const count = $("prior-count").value;
  const seed = await showImage($("prior"), runUrl("prior.png", { count }));
  $("prior-caption").textContent = `${count} decoded draws from the ${current.prior || "N(0, I)"} prior. Seed ${seed}.`;
}

// ------------------------------------------------------------------ the 2-D latent plane

async function loadPlane() {
  const latents = await fetchJson(runUrl("latents.json"));
  const xs = latents.z.map((point) => point[0]);
  const ys = latents.z.map((point) => point[1]);
  const padded = (values) => {
    const low = Math.min(...values), high = Math.max(...values);
    const margin = Math.max(0.08 * (high - low), 0.5);
    return [low - margin, high + margin];
  };
  plane = { latents, x: padded(xs), y: padded(ys), clicked: null };
  $("legend").replaceChildren(...latents.class_names.map((name, index) => {
    const entry = document.createElement("span");
    entry.innerHTML = `<i style="background:${TAB10[index % 10]}"></i>`;
    entry.append(name);
    return entry;
  }));
  await decodeAt([0, 0]);  // the prior's centre, so the decoded panel is never empty
}

function toCanvas(canvas, z) {
  const [x0, x1] = plane.x, [y0, y1] = plane.y;
  return [(z[0] - x0) / (x1 - x0) * canvas.width, (1 - (z[1] - y0) / (y1 - y0)) * canvas.height];
}

function toLatent(canvas, px, py) {
  const [x0, x1] = plane.x, [y0, y1] = plane.y;
  return [x0 + px / canvas.width * (x1 - x0), y0 + (1 - py / canvas.height) * (y1 - y0)];
}

function drawPlane() {
  const canvas = $("latent-map");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const [originX, originY] = toCanvas(canvas, [0, 0]);
  context.strokeStyle = "#ddd";
  context.beginPath();
  context.moveTo(originX, 0); context.lineTo(originX, canvas.height);
  context.moveTo(0, originY); context.lineTo(canvas.width, originY);
  context.stroke();
  context.globalAlpha = 0.7;
  plane.latents.z.forEach((z, row) => {
    const [px, py] = toCanvas(canvas, z);
    context.fillStyle = TAB10[plane.latents.labels[row] % 10];
    context.beginPath();
    context.arc(px, py, 2.2, 0, 2 * Math.PI);
    context.fill();
  });
  context.globalAlpha = 1;
  context.fillStyle = "#666";
  context.font = "11px sans-serif";
  context.fillText(`z1 ∈ [${plane.x[0].toFixed(1)}, ${plane.x[1].toFixed(1)}]`, 6, canvas.height - 6);
  context.fillText(`z2 ∈ [${plane.y[0].toFixed(1)}, ${plane.y[1].toFixed(1)}]`, 6, 14);
  if (plane.clicked) {
    const [px, py] = toCanvas(canvas, plane.clicked);
    context.strokeStyle = "#000";
    context.lineWidth = 2;
    context.beginPath();
    context.moveTo(px - 7, py); context.lineTo(px + 7, py);
    context.moveTo(px, py - 7); context.lineTo(px, py + 7);
    context.stroke();
    context.lineWidth = 1;
  }
}

async function decodeClick(event) {
  const canvas = $("latent-map");
  const box = canvas.getBoundingClientRect();
  const px = (event.clientX - box.left) * canvas.width / box.width;
  const py = (event.clientY - box.top) * canvas.height / box.height;
  await decodeAt(toLatent(canvas, px, py));
}

async function decodeAt(point) {
  plane.clicked = point;
  drawPlane();
  const z = plane.clicked.map((value) => value.toFixed(3)).join(",");
  await showImage($("decoded"), runUrl("decode.png", { z }));
  $("decoded-z").textContent = `z = (${z})`;
}

// ------------------------------------------------------------------ interpolation

async function interpolate(withEnds = true) {
  const a = $("index-a").value, b = $("index-b").value, t = $("t").value;
  $("t-value").textContent = Number(t).toFixed(2);
  const shown = [showImage($("interpolated"), runUrl("interpolate.png", { a, b, t }))];
  if (withEnds) {
    shown.push(showImage($("image-a"), runUrl("test.png", { index: a })),
               showImage($("image-b"), runUrl("test.png", { index: b })));
  }
  await Promise.all(shown);
}

function randomPair() {
  for (const id of ["index-a", "index-b"]) {
    $(id).value = Math.floor(Math.random() * current.test_count);
  }
  return interpolate();
}

// ------------------------------------------------------------------ wiring

$("run-picker").addEventListener("change", guarded((event) => chooseRun(event.target.value)));
$("generate").addEventListener("click", guarded(generate));
$("sample-prior").addEventListener("click", guarded(samplePrior));
$("latent-map").addEventListener("click", guarded(decodeClick));
$("index-a").addEventListener("change", guarded(() => interpolate()));
$("index-b").addEventListener("change", guarded(() => interpolate()));
$("t").addEventListener("input", guarded(() => interpolate(false)));
$("random-pair").addEventListener("click", guarded(randomPair));
guarded(loadRuns)();
