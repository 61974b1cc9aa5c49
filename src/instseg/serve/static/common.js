// Shared by both pages: the JSON API, COCO compressed RLE, and drawing instances on a canvas.
"use strict";

// GET or POST a JSON endpoint; a 4xx/5xx becomes an Error carrying the server's message.
async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${path}: HTTP ${response.status}, not a JSON answer`);
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `${path}: HTTP ${response.status}`);
  }
  return body;
}

// The run lengths of a COCO compressed RLE string (pycocotools' rleFrString): 5 bits per
// character with a continuation bit and a sign bit on the last; from the third count on,
// each is stored as the difference to the count two before.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let value = 0;
    let scale = 1;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      value += (c & 0x1f) * scale;
      scale *= 32;
      more = (c & 0x20) !== 0;
      p += 1;
      if (!more && (c & 0x10) !== 0) value -= scale;
    }
    if (counts.length > 2) value += counts[counts.length - 2];
    counts.push(value);
  }
  return counts;
}

// Calls visit(start, length) for each run of ones of a mask, in column-major pixel order
// (index = x * height + y), as COCO stores masks.
function forEachRun(segmentation, visit) {
  const counts =
    typeof segmentation.counts === "string" ? rleCounts(segmentation.counts) : segmentation.counts;
  let index = 0;
  for (let i = 0; i < counts.length; i++) {
    if (i % 2 === 1 && counts[i] > 0) visit(index, counts[i]);
    index += counts[i];
  }
}

// A fixed, well-separated colour per category id (golden-angle hues); a darker shade of it
// for text on white.
function categoryColor(categoryId, alpha) {
  const hue = (categoryId * 137.508) % 360;
  return alpha === undefined ? `hsl(${hue}, 85%, 50%)` : `hsla(${hue}, 85%, 50%, ${alpha})`;
}

function categoryTextColor(categoryId) {
  return `hsl(${(categoryId * 137.508) % 360}, 85%, 33%)`;
}

function categoryRgb(categoryId) {
  const h = ((categoryId * 137.508) % 360) / 360;
  const s = 0.85;
  const l = 0.5;
  const q = l < 0.5 ? l * (1 + s) : l + s - l * s;
  const p = 2 * l - q;
  const channel = (t) => {
    t = (t + 1) % 1;
    if (t < 1 / 6) return p + (q - p) * 6 * t;
    if (t < 1 / 2) return q;
    if (t < 2 / 3) return p + (q - p) * (2 / 3 - t) * 6;
    return p;
  };
  return [channel(h + 1 / 3), channel(h), channel(h - 1 / 3)].map((v) => Math.round(v * 255));
}

// Draws `image` (ImageBitmap, HTMLImageElement, or null for a grey background) at its own
// size and the instances over it: translucent masks, boxes, "name score" labels.
// instances: [{category_id, bbox: [x, y, w, h], score?, segmentation? (RLE)}];
// names: id -> name.
function drawInstances(canvas, image, width, height, instances, names, show) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  if (image) {
    ctx.drawImage(image, 0, 0, width, height);
  } else {
    ctx.fillStyle = "#3a3a3a";
    ctx.fillRect(0, 0, width, height);
  }
  if (show.masks) {
    const frame = ctx.getImageData(0, 0, width, height);
    const pixels = frame.data;
    for (const inst of instances) {
      const seg = inst.segmentation;
      if (!seg) continue;
      const [r, g, b] = categoryRgb(inst.category_id);
      const [h, w] = seg.size;
      if (h !== height || w !== width) continue; // a mask for another size: not drawable
      forEachRun(seg, (start, length) => {
        for (let k = start; k < start + length; k++) {
          const x = Math.floor(k / h);
          const y = k - x * h;
          const o = 4 * (y * width + x);
          pixels[o] = (pixels[o] + r) >> 1;
          pixels[o + 1] = (pixels[o + 1] + g) >> 1;
          pixels[o + 2] = (pixels[o + 2] + b) >> 1;
        }
      });
    }
    ctx.putImageData(frame, 0, 0);
  }
  const lineWidth = Math.max(1, Math.round(Math.min(width, height) / 300));
  const fontSize = Math.max(10, Math.round(Math.min(width, height) / 40));
  ctx.font = `${fontSize}px sans-serif`;
  ctx.textBaseline = "top";
  for (const inst of instances) {
    const [x, y, w, h] = inst.bbox;
    ctx.strokeStyle = categoryColor(inst.category_id);
    ctx.lineWidth = lineWidth;
    if (show.boxes) ctx.strokeRect(x, y, w, h);
    if (show.labels) {
      const name = names[inst.category_id] || String(inst.category_id);
      const text = inst.score === undefined ? name : `${name} ${inst.score.toFixed(2)}`;
      const tw = ctx.measureText(text).width + 4;
      const ty = y >= fontSize + 2 ? y - fontSize - 2 : y;
      ctx.fillStyle = categoryColor(inst.category_id, 0.85);
      ctx.fillRect(x, ty, tw, fontSize + 2);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x + 2, ty + 1);
    }
  }
}

// /api/info, with the nav bar's links to the pages this server has; null (and the error in
// #message) when the server cannot be reached.
async function loadInfo() {
  let info;
  try {
    info = await api("/api/info");
  } catch (err) {
    showMessage(document.getElementById("message"), err.message, true);
    return null;
  }
  const predictLink = document.getElementById("nav-predict");
  const evaluationLink = document.getElementById("nav-evaluation");
  if (predictLink && !info.predict) predictLink.classList.add("disabled");
  if (evaluationLink && !info.evaluation) evaluationLink.classList.add("disabled");
  return info;
}

function showMessage(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
  element.hidden = !text;
}
