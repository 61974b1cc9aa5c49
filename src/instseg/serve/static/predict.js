// The predict page: upload an image, get every detection above the server's lowest score
// once, then threshold, draw and download in the browser.
"use strict";

const state = { info: null, names: {}, bitmap: null, upload: null, threshold: 0.3 };
const $ = (id) => document.getElementById(id);

function visible() {
  if (!state.upload) return [];
  return state.upload.results.filter((r) => r.score >= state.threshold);
}

function render() {
  const canvas = $("overlay");
  if (!state.upload || !state.bitmap) return;
  const shown = visible();
  const show = {
    masks: $("show-masks").checked,
    boxes: $("show-boxes").checked,
    labels: $("show-labels").checked,
  };
  const { width, height } = state.upload.image;
  drawInstances(canvas, state.bitmap, width, height, shown, state.names, show);
  canvas.hidden = false;
  canvas.dataset.drawn = String(shown.length);
  $("count").textContent =
    `${shown.length} of ${state.upload.results.length} instances at score ≥ ` +
    `${state.threshold.toFixed(2)}`;
  const body = $("detections").querySelector("tbody");
  body.replaceChildren();
  shown.forEach((r, i) => {
    const row = body.insertRow();
    const cells = [
      String(i + 1),
      state.names[r.category_id] || String(r.category_id),
      r.score.toFixed(3),
      r.bbox.map((v) => v.toFixed(1)).join(", "),
    ];
    for (const text of cells) row.insertCell().textContent = text;
    row.cells[1].style.color = categoryTextColor(r.category_id);
  });
  $("detections").hidden = shown.length === 0;
  $("download").disabled = false;
}

async function predict(file) {
  const message = $("message");
  const limits = state.info.limits;
  if (file.size > limits.max_bytes) {
    showMessage(message, `${file.name} is ${file.size} bytes, more than the limit of ` +
      `${limits.max_bytes}`, true);
    return;
  }
  showMessage(message, `Predicting ${file.name} …`, false);
  document.body.classList.add("busy");
  try {
    const form = new FormData();
    form.append("image", file, file.name);
    const upload = await api(`/api/predict?score_thr=${state.info.min_score}`, {
      method: "POST",
      body: form,
    });
    // The server decodes without EXIF rotation; draw the pixels the same way.
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "none" });
    } catch (err) {
      bitmap = null; // a format the browser cannot show (e.g. TIFF): masks on grey
    }
    state.upload = upload;
    state.bitmap = bitmap || (await blankBitmap(upload.image.width, upload.image.height));
    showMessage(message, "", false);
    render();
  } catch (err) {
    state.upload = null;
    $("overlay").hidden = true;
    $("overlay").dataset.drawn = "0";
    $("detections").hidden = true;
    $("download").disabled = true;
    $("count").textContent = "";
    showMessage(message, err.message, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

async function blankBitmap(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#3a3a3a";
  ctx.fillRect(0, 0, width, height);
  return createImageBitmap(canvas);
}

function download() {
  const results = visible();
  const blob = new Blob([JSON.stringify(results)], { type: "application/json" });
  const link = document.createElement("a");
  const stem = state.upload.image.file_name.replace(/\.[^.]*$/, "");
  link.href = URL.createObjectURL(blob);
  link.download = `${stem}_results.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function setThreshold(value) {
  state.threshold = Number(value);
  $("threshold-value").textContent = state.threshold.toFixed(2);
  render();
}

async function start() {
  state.info = await loadInfo();
  if (!state.info) return;
  if (!state.info.predict) {
    showMessage($("message"), "No model is loaded: start `instseg serve` with --checkpoint.", true);
    $("drop").hidden = true;
    return;
  }
  for (const c of state.info.categories) state.names[c.id] = c.name;
  $("model").textContent = state.info.model;
  const limits = state.info.limits;
  $("limits").textContent =
    `${limits.formats.join(", ")}; up to ${(limits.max_bytes / 1048576).toFixed(0)} MB and ` +
    `${(limits.max_pixels / 1e6).toFixed(0)} megapixels`;
  const slider = $("threshold");
  slider.min = String(state.info.min_score);
  setThreshold(slider.value);
  slider.addEventListener("input", () => setThreshold(slider.value));
  for (const id of ["show-masks", "show-boxes", "show-labels"]) {
    $(id).addEventListener("change", render);
  }
  $("file").addEventListener("change", () => {
    if ($("file").files.length) predict($("file").files[0]);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
  });
  $("download").addEventListener("click", download);
}

start();
