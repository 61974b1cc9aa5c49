// The evaluation page: metrics, AP per category, precision-recall curves and an image
// browser sorted by errors, all from the server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, names: {}, selected: null };

function iouType() {
  return $("iou-type").value;
}

function category() {
  return $("category").value;
}

function query(extra) {
  const params = new URLSearchParams({ iou_type: iouType(), ...extra });
  if (category()) params.set("category", category());
  return params.toString();
}

function fmt(value) {
  return value === null || value === undefined || value < 0 ? "–" : value.toFixed(1);
}

async function loadMetrics() {
  const metrics = await api("/api/metrics");
  const table = $("metrics");
  table.replaceChildren();
  const types = Object.keys(metrics);
  if (!types.length) return;
  const columns = Object.keys(metrics[types[0]]);
  const head = table.createTHead().insertRow();
  for (const text of ["", ...columns]) {
    const th = document.createElement("th");
    th.textContent = text;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const type of types) {
    const row = body.insertRow();
    row.insertCell().textContent = type;
    for (const c of columns) row.insertCell().textContent = fmt(metrics[type][c]);
  }
}

async function loadCategories() {
  const rows = await api(`/api/categories?iou_type=${iouType()}`);
  const body = $("categories").querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const row = body.insertRow();
    row.dataset.category = String(r.id);
    if (String(r.id) === category()) row.classList.add("selected");
    const cells = [r.name, fmt(r.AP), fmt(r.AP50), fmt(r.AP75), r.num_gt, r.num_dt];
    for (const text of cells) row.insertCell().textContent = String(text);
    row.cells[0].style.color = categoryTextColor(r.id);
    row.addEventListener("click", () => {
      $("category").value = category() === String(r.id) ? "" : String(r.id);
      refresh();
    });
  }
}

async function loadPr() {
  const pr = await api(`/api/pr?${query({})}`);
  const name = category() ? state.names[category()] : "all categories (mean)";
  $("pr-title").textContent = `(${iouType()}, ${name})`;
  drawPr($("pr"), pr);
}

// One curve per IoU threshold, blue (0.5) to red (0.95), axes 0..1.
function drawPr(canvas, pr) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const left = 44;
  const right = 96;
  const top = 10;
  const bottom = 34;
  const pw = W - left - right;
  const ph = H - top - bottom;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#ccc";
  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 10; i += 2) {
    const x = left + (pw * i) / 10;
    const y = top + ph - (ph * i) / 10;
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + ph);
    ctx.moveTo(left, y);
    ctx.lineTo(left + pw, y);
    ctx.stroke();
    ctx.fillText((i / 10).toFixed(1), x - 8, top + ph + 14);
    ctx.fillText((i / 10).toFixed(1), left - 28, y + 4);
  }
  ctx.fillText("recall", left + pw / 2 - 15, H - 4);
  ctx.save();
  ctx.translate(12, top + ph / 2 + 20);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText("precision", 0, 0);
  ctx.restore();
  pr.curves.forEach((curve, i) => {
    const t = pr.curves.length > 1 ? i / (pr.curves.length - 1) : 0;
    const color = `hsl(${240 - 240 * t}, 80%, 45%)`;
    ctx.strokeStyle = color;
    ctx.lineWidth = curve.iou === 0.5 || curve.iou === 0.75 ? 2.5 : 1.2;
    ctx.beginPath();
    let drawing = false;
    curve.precision.forEach((p, k) => {
      if (p === null) {
        drawing = false;
        return;
      }
      const x = left + pw * pr.recall[k];
      const y = top + ph - ph * p;
      if (drawing) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.fillText(`IoU ${curve.iou.toFixed(2)}`, left + pw + 10, top + 12 + 14 * i);
  });
}

async function loadImages() {
  const score = $("image-score").value || "0";
  const rows = await api(`/api/images?${query({ score_thr: score })}`);
  const body = $("images").querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const row = body.insertRow();
    row.dataset.image = String(r.id);
    if (r.id === state.selected) row.classList.add("selected");
    const cells = [r.file_name || `#${r.id}`, r.num_gt, r.num_dt, r.missed, r.false_positives];
    for (const text of cells) row.insertCell().textContent = String(text);
    row.addEventListener("click", () => showImage(r.id));
  }
  $("image-count").textContent = `${rows.length} images`;
  if (rows.length && !rows.some((r) => r.id === state.selected)) showImage(rows[0].id);
}

async function loadBitmap(imageId) {
  if (!state.info.evaluation.has_images) return null;
  try {
    const response = await fetch(`/api/images/${imageId}/file`);
    if (!response.ok) return null;
    return await createImageBitmap(await response.blob(), { imageOrientation: "none" });
  } catch (err) {
    return null;
  }
}

async function showImage(imageId) {
  state.selected = imageId;
  for (const row of $("images").querySelectorAll("tbody tr")) {
    row.classList.toggle("selected", row.dataset.image === String(imageId));
  }
  const [detail, bitmap] = await Promise.all([api(`/api/images/${imageId}`), loadBitmap(imageId)]);
  const { width, height, file_name } = detail.image;
  const score = Number($("image-score").value || 0);
  const only = (items) => (category() ? items.filter((a) => String(a.category_id) === category()) : items);
  const gt = only(detail.ground_truth);
  const dt = only(detail.predictions).filter((r) => r.score >= score);
  const masks = iouType() !== "bbox";
  const show = { masks, boxes: true, labels: true };
  drawInstances($("gt-canvas"), bitmap, width, height, gt, state.names, show);
  drawInstances($("dt-canvas"), bitmap, width, height, dt, state.names, show);
  $("gt-canvas").dataset.drawn = String(gt.length);
  $("dt-canvas").dataset.drawn = String(dt.length);
  $("viewer-title").textContent =
    `${file_name || "#" + imageId} (${width}×${height})` +
    (bitmap ? "" : " — image file not available: drawn on grey");
  $("viewer").hidden = false;
}

async function refresh() {
  try {
    for (const row of $("categories").querySelectorAll("tbody tr")) {
      row.classList.toggle("selected", row.dataset.category === category());
    }
    await Promise.all([loadCategories(), loadPr(), loadImages()]);
    showMessage($("message"), "", false);
  } catch (err) {
    showMessage($("message"), err.message, true);
  }
}

async function start() {
  state.info = await loadInfo();
  if (!state.info) return;
  const evaluation = state.info.evaluation;
  if (!evaluation) {
    showMessage(
      $("message"),
      "No evaluation is loaded: start `instseg serve` with --work-dir or --ann and --results.",
      true,
    );
    return;
  }
  for (const c of evaluation.categories) {
    state.names[c.id] = c.name;
    $("category").add(new Option(c.name, String(c.id)));
  }
  for (const t of evaluation.iou_types) $("iou-type").add(new Option(t, t));
  $("iou-type").value = evaluation.default_iou_type;
  $("summary").textContent =
    `${evaluation.num_images} images, ${evaluation.num_results} detections`;
  $("iou-type").addEventListener("change", refresh);
  $("category").addEventListener("change", refresh);
  $("image-score").addEventListener("change", () => loadImages().catch((err) =>
    showMessage($("message"), err.message, true)));
  try {
    await loadMetrics();
  } catch (err) {
    showMessage($("message"), err.message, true);
  }
  await refresh();
  document.body.dataset.ready = "1";
}

start();
