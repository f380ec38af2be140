// The page of `cfgdiff serve`: controls -> POST api/generate -> a stream of server-sent events
// (queued, started, preview, done | cancelled | error) drawn as they come, in a gallery that
// wraps. The boxes' labels and bounds are the request schema's (GET api/model, "fields"); a
// refusal names the field, whose box is marked. The settings and the last runs are kept in
// this browser (localStorage), per checkpoint. Nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 12;       // runs kept
const RETRIES = 5;        // tries of a request the server was too busy for (503)
let model = null;         // GET api/model
let selected = null;      // the class index picked (a class model)
let text = false;         // the model reads prompts: the prompt box stands for the class
let current = null;       // the request in flight: {controller, job, frames, stopped}
let shown = null;         // the run whose images and command are shown: {settings, ...}
let history = [];         // the last runs, newest first
// the box of each request field, for marking the one a refusal names
const BOXES = {
  class: "classes", prompt: "prompt", scale: "scale", mode: "mode", scales: "scales",
  sampler: "sampler", steps: "steps", seed: "seed", n: "n", negative_class: "negative",
  negative_prompt: "negative-prompt", interval: "interval-lo",
};
const KEPT = ["scale", "mode", "scales", "sampler", "steps", "seed", "n", "negative",
  "negative-prompt", "interval-lo", "interval-hi", "prompt"];

function fmt(v) {
  return Number.isInteger(v) ? v.toFixed(1) : String(Math.round(v * 100) / 100);
}

function setStatus(state, words) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = words;
  const busy = state === "queued" || state === "running" || state === "retrying";
  $("cancel").disabled = !busy;
}

function updateScale() {
  const s = Number($("scale").value);
  $("scale-label").textContent = `s = ${fmt(s)}`;
  $("w-label").textContent = `w = s − 1 = ${fmt(s - 1)}`;
}

function option(value, words) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = words;
  return o;
}

function key(what) {  // per checkpoint: another model's classes mean other things
  return `cfgdiff:${what}:${model.checkpoint}`;
}

function load(what, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key(what)));
    return v === null ? fallback : v;
  } catch (e) {
    return fallback;
  }
}

function save(what, value) {  // false when the browser would not keep it (full, or off)
  try {
    localStorage.setItem(key(what), JSON.stringify(value));
    return true;
  } catch (e) {
    return false;
  }
}

async function init() {
  const resp = await fetch("api/model");
  model = await resp.json();
  $("model-name").textContent =
    `${model.dataset} · ${model.classes.length} classes` +
    `${model.condition === "text" ? " · text prompts" : ""} · ` +
    `${model.image_size}×${model.image_size}` +
    ` · ${model.device}, ${model.precision} · ${model.checkpoint}`;
  text = model.condition === "text";
  for (const el of document.querySelectorAll(".name[data-field]")) {  // the schema's labels
    const f = model.fields[el.dataset.field];
    if (f) el.textContent = f.label;
  }
  if (text) {  // a prompt box; the classes' prompts as buttons that fill it
    $("classes-title").textContent = "Prompt";
    $("prompt-form").hidden = false;
    $("prompt").maxLength = model.max_prompt_chars;
    $("negative-prompt").maxLength = model.max_prompt_chars;
    $("negative-class-row").hidden = true;
    $("negative-prompt-row").hidden = false;
    $("classes").classList.add("prompts");
    $("prompt-form").addEventListener("submit", (e) => { e.preventDefault(); start(); });
    $("prompt").addEventListener("input", () => {  // a prompt of one's own: no button is it
      selected = null;
      highlight(null);
    });
  }
  const buttons = text ? model.examples : model.classes;
  buttons.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name;
    b.title = text ? `prompt: ${name}` : `class ${i}: ${name}`;
    b.dataset.class = String(i);
    b.addEventListener("click", () => pick(i));
    $("classes").appendChild(b);
  });
  for (const s of model.samplers) $("sampler").appendChild(option(s, s));
  $("sampler").value = model.sampler;
  $("negative").appendChild(option("", "none (the null label)"));
  model.classes.forEach((name, i) => $("negative").appendChild(option(String(i), name)));
  $("steps").max = model.max_steps;
  $("steps").value = String(model.steps); // the model's own, as for the sampler
  $("n").max = model.max_images;
  $("seed").max = model.max_seed;
  $("scale").max = model.max_scale;
  restore();
  updateScale();
  $("scale").addEventListener("input", updateScale);
  $("scale").addEventListener("change", () => { if (ready()) start(); });
  $("mode").addEventListener("change", modeChanged);
  modeChanged();
  $("generate").addEventListener("click", start);
  $("cancel").addEventListener("click", cancel);
  $("reseed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
    keep();
  });
  $("copy").addEventListener("click", copy);
  $("clear-history").addEventListener("click", () => {
    history = [];
    save("history", history);
    drawHistory();
  });
  for (const id of KEPT) {
    $(id).addEventListener("input", () => { $(id).removeAttribute("aria-invalid"); keep(); });
    $(id).addEventListener("change", keep);
  }
  history = load("history", []);
  drawHistory();
  if (history.length) show(history[0], false);
  setStatus("idle", text ? "type a prompt or pick one" : "pick a class");
}

function modeChanged() {
  const strip = $("mode").value === "strip";
  $("scales").disabled = !strip;
  $("scale").disabled = strip;
}

// The settings survive a reload: every box, and the class picked, per checkpoint.
function keep() {
  const boxes = {};
  for (const id of KEPT) boxes[id] = $(id).value;
  save("settings", {boxes, selected});
}

function restore() {
  const kept = load("settings", null);
  if (!kept || typeof kept.boxes !== "object") return;
  for (const id of KEPT) {
    const v = kept.boxes[id];
    if (typeof v !== "string") continue;
    if ($(id).tagName === "SELECT" && ![...$(id).options].some((o) => o.value === v)) continue;
    $(id).value = v;
  }
  const k = text ? model.examples.length : model.classes.length;
  if (Number.isInteger(kept.selected) && kept.selected >= 0 && kept.selected < k) {
    selected = kept.selected;
    highlight(selected);
  }
}

function ready() {  // whether there is something to ask for
  return text ? $("prompt").value.trim() !== "" : selected !== null;
}

function highlight(i) {
  for (const b of $("classes").children) {
    b.classList.toggle("selected", i !== null && b.dataset.class === String(i));
  }
}

function pick(i) {
  selected = i;
  if (text) $("prompt").value = model.examples[i];
  highlight(i);
  keep();
  start();
}

function number(id) {  // an empty box is null: the server says it is empty, naming the box
  const v = $(id).value.trim();
  return v === "" || !Number.isFinite(Number(v)) ? null : Number(v);
}

function settings() {
  const body = {
    scale: Number($("scale").value),
    sampler: $("sampler").value,
    steps: number("steps"),
    seed: number("seed"),
    n: number("n"),
    mode: $("mode").value,
  };
  if (body.mode === "strip") {
    body.scales = $("scales").value.split(",").filter((x) => x.trim() !== "").map(Number);
  }
  if (text) {
    body.prompt = $("prompt").value.trim();
    const neg = $("negative-prompt").value.trim();
    if (neg !== "") body.negative_prompt = neg;
  } else {
    body.class = selected;
    if ($("negative").value !== "") body.negative_class = Number($("negative").value);
  }
  const lo = $("interval-lo").value, hi = $("interval-hi").value;
  if (lo !== "" || hi !== "") body.interval = [number("interval-lo"), number("interval-hi")];
  return body;
}

async function postJSON(url, body, signal) {
  return fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
    signal,
  });
}

function unmark() {
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// A request that ended without images (cancelled, refused, failed): the class highlighted is
// again the one of the images shown, so that the buttons, the images and the command agree.
function settle(state, words, field) {
  setStatus(state, words);
  unmark();
  if (field && BOXES[field]) $(BOXES[field]).setAttribute("aria-invalid", "true");
  if (!text && shown) {
    selected = shown.settings.class;
    highlight(selected);
    keep();
  }
}

// Stop the request in flight: the server cancels its job; its stream then says at which step.
async function cancel() {
  const req = current;
  if (!req) return;
  req.stopped = true;
  if (req.job) {
    await postJSON("api/cancel", {job: req.job}).catch(() => null);
  } else {
    req.controller.abort();  // not queued yet (or waiting to retry): leaving cancels it
    if (current === req) { current = null; settle("cancelled", "cancelled"); }
  }
}

async function start() {
  if (!ready()) {
    setStatus("error", text ? "type a prompt first" : "pick a class first");
    return;
  }
  const old = current;
  if (old) {  // a new request replaces the one in flight: its queue slot is freed first
    current = null;
    old.stopped = true;
    if (old.job) await postJSON("api/cancel", {job: old.job}).catch(() => null);
    old.controller.abort();
  }
  const req = {controller: new AbortController(), job: null, frames: 0, stopped: false};
  current = req;
  unmark();
  $("gallery").dataset.frames = "0";
  $("frame-info").textContent = "";
  $("progress").value = 0;
  const body = settings();
  req.body = body;
  let resp;
  for (let attempt = 1; ; attempt++) {
    setStatus("queued", "sending…");
    try {
      resp = await postJSON("api/generate", body, req.controller.signal);
    } catch (e) {
      if (current === req) { current = null; settle("error", "the server cannot be reached"); }
      return;
    }
    if (resp.status === 503 && attempt < RETRIES && current === req) {
      // busy: try again when the server says, unless the request is replaced or cancelled
      const j = await resp.json().catch(() => ({error: "busy"}));
      const wait = Math.min(30, Number(resp.headers.get("Retry-After")) || 2);
      setStatus("retrying", `${j.error} (retrying in ${wait} s, try ${attempt + 1} of ${RETRIES})`);
      await new Promise((r) => setTimeout(r, wait * 1000));
      if (current !== req || req.stopped) return;
      continue;
    }
    if (!resp.ok) {
      const j = await resp.json().catch(() => ({error: `HTTP ${resp.status}`, field: null}));
      if (current === req) { current = null; settle("error", j.error, j.field); }
      return;
    }
    break;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, k);
        buf = buf.slice(k + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
        if (data.length) handle(req, JSON.parse(data.join("\n")));
      }
    }
  } catch (e) {
    // aborted: a newer request took over, or the page cancelled before the job had an id
  }
  if (current === req) {  // the stream ended without a last event: the server went away
    current = null;
    if ($("status").dataset.state === "queued" || $("status").dataset.state === "running") {
      settle("error", "the server closed the stream");
    }
  }
}

function gallery(images, columns, kind) {
  // images: base64 PNGs, one a cell; columns: the strip's scales, or null (a wrapping gallery)
  const g = $("gallery");
  const cells = [];
  if (columns) {
    g.classList.add("strip");
    g.style.setProperty("--cols", String(columns.length));
    for (const s of columns) {
      const h = document.createElement("div");
      h.className = "col";
      h.textContent = `s=${s}`;
      cells.push(h);
    }
  } else {
    g.classList.remove("strip");
  }
  images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = kind === "final" ? `image ${i + 1}` : `image ${i + 1}, denoising`;
    cells.push(img);
  });
  const size = model.image_size;
  g.style.setProperty("--cell", `${Math.max(56, Math.min(128, size * 3))}px`);
  g.replaceChildren(...cells);
  g.dataset.kind = kind;
}

function describe(s) {
  const who = s.prompt !== null ? `“${s.prompt}”` : model.classes[s.class];
  const what = s.mode === "strip" ? `strip ${s.scales.join(",")}` : `s=${s.scale}`;
  return `${who} · ${what} · ${s.sampler} ${s.steps} · seed ${s.seed} · ${s.n} image(s)`;
}

// Show a finished run: its images, download, command; `fresh`: just made (not from history).
function show(run, fresh) {
  shown = run;
  const s = run.settings;
  gallery(run.images, s.mode === "strip" ? s.scales : null, "final");
  $("gallery").dataset.frames = fresh ? $("gallery").dataset.frames : "0";
  $("gallery-title").textContent = describe(s);
  const a = $("download");
  a.href = `data:image/png;base64,${run.png}`;
  const what = s.mode === "strip" ? "strip" : `s${s.scale}`;
  const who = s.prompt !== null ? s.prompt.slice(0, 40) : model.classes[s.class];
  a.download = `${`cfgdiff-${who}-${what}-seed${s.seed}`.replace(/[^A-Za-z0-9._-]+/g, "_")}.png`;
  a.hidden = false;
  $("command").textContent = run.commands.join("\n");
  $("copy").disabled = false;
  $("copy").textContent = "copy command";
  if (!text && s.class !== null) { selected = s.class; highlight(selected); }
  for (const b of $("history").querySelectorAll("button")) {
    b.classList.toggle("shown", b.dataset.id === run.id);
  }
}

// A run from the history: its images and command, and its settings back in the boxes.
function recall(run) {
  const s = run.settings;
  $("scale").value = String(s.scale);
  $("mode").value = s.mode;
  if (s.mode === "strip") $("scales").value = s.scales.join(",");
  $("sampler").value = s.sampler;
  $("steps").value = String(s.steps);
  $("seed").value = String(s.seed);
  $("n").value = String(s.n);
  if (text) {
    $("prompt").value = s.prompt;
    $("negative-prompt").value = s.negative_prompt || "";
  } else {
    $("negative").value = s.negative_class === null ? "" : String(s.negative_class);
  }
  $("interval-lo").value = s.interval ? String(s.interval[0]) : "";
  $("interval-hi").value = s.interval ? String(s.interval[1]) : "";
  modeChanged();
  updateScale();
  show(run, false);
  keep();
  setStatus("done", `from the history: ${describe(s)}`);
}

function remember(run) {
  history = [run, ...history.filter((r) => r.id !== run.id)].slice(0, HISTORY);
  while (history.length && !save("history", history)) history.pop();  // the browser is full
  drawHistory();
}

function drawHistory() {
  const items = history.map((run) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.id = run.id;
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${run.images[0]}`;
    img.alt = "";
    const words = document.createElement("span");
    words.textContent = describe(run.settings);
    b.append(img, words);
    b.classList.toggle("shown", shown !== null && shown.id === run.id);
    b.addEventListener("click", () => recall(run));
    li.appendChild(b);
    return li;
  });
  $("history").replaceChildren(...items);
  $("clear-history").hidden = history.length === 0;
}

async function copy() {
  const words = $("command").textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(words);
    ok = true;
  } catch (e) {  // no clipboard API (a page not on the loopback): select it for Ctrl-C
    const range = document.createRange();
    range.selectNodeContents($("command"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
  }
  $("copy").textContent = ok ? "copied ✓" : "selected: press Ctrl-C to copy";
  setTimeout(() => { $("copy").textContent = "copy command"; }, 2000);
}

function handle(req, ev) {
  if (ev.type === "queued") req.job = ev.job;
  if (req !== current) return;  // a replaced request's last events
  switch (ev.type) {
    case "queued":
      setStatus("queued", ev.ahead ? `waiting: ${ev.ahead} request(s) ahead` : "starting");
      break;
    case "started":
      setStatus("running", `sampling ${ev.images} image(s), ${ev.steps} steps`);
      break;
    case "preview": {
      req.frames += 1;
      const columns = req.body.mode === "strip" ? req.body.scales : null;
      gallery(ev.images, columns, "preview");
      $("gallery").dataset.frames = String(req.frames);
      $("frame-info").textContent = `step ${ev.step}/${ev.steps}, t = ${ev.t}`;
      $("progress").value = ev.step / ev.steps;
      break;
    }
    case "done": {
      const run = {id: ev.job, settings: ev.settings, images: ev.images, png: ev.png,
        commands: ev.commands, seconds: ev.seconds};
      $("progress").value = 1;
      $("frame-info").textContent = "";
      remember(run);
      show(run, true);
      setStatus("done", `done in ${ev.seconds.toFixed(2)} s (${ev.images_per_s} images/s)`);
      break;
    }
    case "cancelled":
      if (shown) show(shown, false); else $("gallery").replaceChildren();
      settle("cancelled", ev.reason ? `cancelled at step ${ev.step}: ${ev.reason}`
        : `cancelled at step ${ev.step}`);
      break;
    case "error":
      if (shown) show(shown, false);
      settle("error", ev.error);
      break;
  }
}

init().catch((e) => setStatus("error", `cannot load the model: ${e}`));
