// The analysts' page: drop files, each is POSTed to /v1/score on its own (concurrently, so the
// service batches their frames), and its answer is drawn as a card. No external assets.
"use strict";

const results = [];  // every answer (or refusal), in the order the files were given
const $ = (sel, root = document) => root.querySelector(sel);
const fmt = (x, d = 3) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d);

function headers() {
  const t = sessionStorage.getItem("fmsd-token");
  return t ? { Authorization: "Bearer " + t } : {};
}

async function loadModel() {
  const el = $("#model");
  try {
    const r = await fetch("/v1/model", { headers: headers() });
    if (r.status === 401) { $("#token-row").hidden = false; el.textContent = "token required"; return; }
    if (r.status === 503) { el.textContent = "model loading…"; setTimeout(loadModel, 1000); return; }
    const j = await r.json();
    const m = j.model, op = j.operating_point.frame;
    const fp = Object.entries(m.data_fingerprint || {}).map(([k, v]) => `${k} ${String(v).slice(0, 12)}`);
    el.textContent = `model: ${m.workdir} · ${m.checkpoint} checkpoint, step ${m.step} · ` +
      `${m.regime} trained on ${m.train_dataset.join(", ")} · commit ` +
      `${m.commit ? m.commit.slice(0, 12) + (m.commit_dirty ? " (dirty)" : "") : "unknown"} · ` +
      `data ${fp.join(", ") || "unknown"} · config ${m.config_sha256 ? m.config_sha256.slice(0, 12) : "n/a"} · ` +
      `operating point ${op.name} (T = ${fmt(op.temperature, 2)})`;
    el.dataset.ready = "1";
  } catch (e) { el.textContent = "service unreachable: " + e; }
}

function drawPreview(canvas, file, answer) {
  const ctx = canvas.getContext("2d");
  const box = answer && answer.frames && answer.frames.length ? answer.frames[0].box : null;
  const draw = (src, w, h) => {
    const s = Math.min(canvas.width / w, canvas.height / h);
    const dx = (canvas.width - w * s) / 2, dy = (canvas.height - h * s) / 2;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(src, dx, dy, w * s, h * s);
    if (box && answer.faces.found) {
      ctx.strokeStyle = "#1a73e8"; ctx.lineWidth = 2;
      ctx.strokeRect(dx + box[0] * s, dy + box[1] * s, (box[2] - box[0]) * s, (box[3] - box[1]) * s);
    }
  };
  const url = URL.createObjectURL(file);
  if (file.type.startsWith("video")) {
    const v = document.createElement("video");
    v.muted = true; v.src = url;
    v.addEventListener("loadeddata", () => { v.currentTime = 0; });
    v.addEventListener("seeked", () => draw(v, v.videoWidth, v.videoHeight), { once: true });
  } else {
    const img = new Image();
    img.onload = () => draw(img, img.naturalWidth, img.naturalHeight);
    img.src = url;
  }
}

function drawBand(card, a) {
  const op = a.operating_point, [lo, hi] = op.uncertain_band;
  const z = card.querySelectorAll(".zone");
  z[0].style.width = (100 * lo) + "%"; z[1].style.width = (100 * (hi - lo)) + "%";
  z[2].style.width = (100 * (1 - hi)) + "%";
  $(".threshold", card).style.left = (100 * op.threshold) + "%";
  $(".marker", card).style.left = (100 * a.prob_fake) + "%";
  $(".op", card).textContent = `operating point ${op.name} (${op.level} level): label ${a.label}; ` +
    `${op.rule || "fake if P(fake) ≥ " + fmt(op.threshold)}; uncertain between ${fmt(lo)} and ${fmt(hi)}`;
}

function drawTimeline(card, a) {
  if (a.kind !== "video") return;
  const svg = $(".frames", card), n = a.frames.length, ns = "http://www.w3.org/2000/svg";
  $(".timeline", card).hidden = false;
  const [lo, hi] = a.operating_point.uncertain_band;
  const band = document.createElementNS(ns, "rect");
  band.setAttribute("x", 0); band.setAttribute("width", 300);
  band.setAttribute("y", 80 * (1 - hi)); band.setAttribute("height", 80 * (hi - lo));
  band.setAttribute("fill", "#e4e4e4"); svg.appendChild(band);
  const line = document.createElementNS(ns, "line"), ty = 80 * (1 - a.operating_point.threshold);
  line.setAttribute("x1", 0); line.setAttribute("x2", 300); line.setAttribute("y1", ty);
  line.setAttribute("y2", ty); line.setAttribute("stroke", "#555"); line.setAttribute("stroke-width", 0.6);
  a.frames.forEach((f, i) => {
    const r = document.createElementNS(ns, "rect"), w = 300 / n;
    r.setAttribute("x", i * w + w * 0.1); r.setAttribute("width", Math.max(w * 0.8, 0.5));
    r.setAttribute("y", 80 * (1 - f.prob_fake)); r.setAttribute("height", 80 * f.prob_fake);
    r.setAttribute("fill", f.prob_fake >= a.operating_point.threshold ? "#b3261e" : "#2f7d4f");
    r.setAttribute("class", "frame-bar");
    const t = document.createElementNS(ns, "title");
    t.textContent = `frame ${f.index}${f.time_s !== null ? " (" + fmt(f.time_s, 2) + " s)" : ""}: ` +
      `P(fake) ${fmt(f.prob_fake)}${f.face_found === false ? ", no face found" : ""}`;
    r.appendChild(t); svg.appendChild(r);
  });
  svg.appendChild(line);
}

function drawExplain(card, a) {
  const box = $(".explain", card), ex = a.explain;
  if (!ex || !$("#explain").checked) return;
  if (!ex.available) {
    box.innerHTML = `<h3>Explanation</h3><p class="why"></p>`;
    $(".why", box).textContent = "not available: " + ex.reason;
    return;
  }
  box.innerHTML = "<h3>Change in the fake logit when each artifact subspace is undone</h3>";
  if (!ex.subspaces) {
    const why = document.createElement("p"); why.className = "why";
    why.textContent = "no subspace numbers: " + ex.subspaces_reason; box.appendChild(why);
    ex.subspaces = [];
  }
  const top = Math.max(...ex.subspaces.map(s => Math.abs(s.delta_logit)), 1e-9);
  for (const s of ex.subspaces) {
    const row = document.createElement("div"); row.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill" + (s.delta_logit < 0 ? " neg" : "");
    fill.style.width = (120 * Math.abs(s.delta_logit) / top) + "px";
    row.append(`subspace ${s.k}`, fill, Number(s.delta_logit).toPrecision(3));
    box.appendChild(row);
  }
  if (ex.heatmap_png_base64) {
    $(".heat", card).src = "data:image/png;base64," + ex.heatmap_png_base64;
    $(".heat-fig", card).hidden = false;
  }
}

function render(card, file, a) {
  card.dataset.status = "done";
  card.dataset.prob = a.prob_fake; card.dataset.verdict = a.verdict;
  $(".state", card).textContent = `${a.kind} · ${a.media_type} · ${a.width}×${a.height}` +
    (a.kind === "video" ? ` · ${a.frames.length} of ${a.frame_count} frames scored` : "");
  const v = $(".verdict", card); v.textContent = a.verdict; v.className = "verdict " + a.verdict;
  $(".prob", card).textContent = "P(fake) " + fmt(a.prob_fake);
  drawBand(card, a);
  const face = $(".face", card);
  if (a.faces.no_face_found) {
    face.textContent = "No face found: the centre square was scored instead, so treat this score with care.";
    face.classList.add("none");
  } else if (a.faces.looked_for) {
    face.textContent = `face found in ${a.faces.found} of ${a.faces.frames} frame(s); ${a.processing}`;
  } else { face.textContent = a.processing; }
  $(".crop", card).src = "data:image/png;base64," + a.crop.png_base64;
  drawPreview($(".preview", card), file, a);
  drawTimeline(card, a);
  drawExplain(card, a);
  const t = a.timings_ms;
  $(".timing", card).textContent = `answered in ${fmt(t.total, 0)} ms (decode ${fmt(t.decode, 0)}, ` +
    `queue ${fmt(t.queue, 0)}, model ${fmt(t.model, 0)}) · request ${a.id}`;
}

async function scoreFile(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.dataset.status = "pending";
  $(".name", card).textContent = file.name;
  $(".state", card).textContent = "scoring…";
  $("#results").appendChild(card);
  const entry = { file: file.name, answer: null, error: null };
  results.push(entry);
  const form = new FormData(); form.append("file", file, file.name);
  const q = $("#explain").checked ? "?explain=true" : "";
  try {
    const r = await fetch("/v1/score" + q, { method: "POST", body: form, headers: headers() });
    const j = await r.json();
    if (r.status === 401) { $("#token-row").hidden = false; }
    if (!r.ok) throw new Error(`${r.status}: ${j.error || r.statusText}`);
    entry.answer = j; render(card, file, j);
  } catch (e) {
    entry.error = String(e.message || e);
    card.dataset.status = "error";
    const s = $(".state", card); s.textContent = "refused: " + entry.error; s.classList.add("error");
  }
  updateStatus();
}

function updateStatus() {
  const done = results.filter(r => r.answer || r.error).length;
  $("#status").textContent = `${done} of ${results.length} file(s) answered`;
  $("#export-csv").disabled = $("#export-json").disabled = done === 0;
}

function download(name, type, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type })); a.download = name; a.click();
}

function csv() {
  const cols = ["file", "kind", "prob_fake", "label", "verdict", "threshold", "frames",
    "faces_found", "frame_index", "frame_prob_fake", "model_step", "model_commit", "error"];
  const q = v => { const s = v === null || v === undefined ? "" : String(v);
    return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s; };
  const rows = [cols.join(",")];
  for (const r of results) {
    const a = r.answer;
    if (!a) { rows.push([r.file, "", "", "", "", "", "", "", "", "", "", "", r.error].map(q).join(",")); continue; }
    for (const f of a.frames) {
      rows.push([r.file, a.kind, a.prob_fake, a.label, a.verdict, a.operating_point.threshold,
        a.frames.length, a.faces.found, f.index, f.prob_fake, a.model.step, a.model.commit, ""].map(q).join(","));
    }
  }
  return rows.join("\n") + "\n";
}

function setup() {
  const drop = $("#drop");
  const take = files => { for (const f of files) scoreFile(f); };
  $("#files").addEventListener("change", e => { take(e.target.files); e.target.value = ""; });
  ["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", e => take(e.dataTransfer.files));
  $("#token").addEventListener("change", e => {
    sessionStorage.setItem("fmsd-token", e.target.value.trim()); loadModel(); });
  $("#export-json").addEventListener("click", () => download("fmsd_results.json", "application/json",
    JSON.stringify(results.map(r => ({ file: r.file, error: r.error, ...(r.answer || {}) })), null, 2)));
  $("#export-csv").addEventListener("click", () => download("fmsd_results.csv", "text/csv", csv()));
  loadModel();
}

window.fmsdExportCsv = csv;  // the browser test reads the export without a download dialog
setup();
