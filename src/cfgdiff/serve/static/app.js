// The page of `cfgdiff serve`: controls -> POST api/generate -> a stream of server-sent events
// (queued, started, preview, done | cancelled | error) drawn as they come. Nothing is loaded
// from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;       // GET api/model
let selected = null;    // the class index picked (a class model)
let text = false;       // the model reads prompts: the prompt box stands for the class
let current = null;     // the request in flight: {controller, job, frames}

function fmt(v) {
  return Number.isInteger(v) ? v.toFixed(1) : String(Math.round(v * 100) / 100);
}

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
  const busy = state === "queued" || state === "running";
  $("cancel").disabled = !busy;
}

function updateScale() {
  const s = Number($("scale").value);
  $("scale-label").textContent = `s = ${fmt(s)}`;
  $("w-label").textContent = `w = s − 1 = ${fmt(s - 1)}`;
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
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
      for (const b of $("classes").children) b.classList.remove("selected");
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
  updateScale();
  $("scale").addEventListener("input", updateScale);
  $("scale").addEventListener("change", () => { if (ready()) start(); });
  $("mode").addEventListener("change", () => {
    const strip = $("mode").value === "strip";
    $("scales").disabled = !strip;
    $("scale").disabled = strip;
  });
  $("generate").addEventListener("click", start);
  $("cancel").addEventListener("click", cancel);
  $("reseed").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  });
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("command").textContent));
  $("final").addEventListener("load", () => zoom($("final")));
  $("preview").addEventListener("load", () => zoom($("preview")));
  setStatus("idle", text ? "type a prompt or pick one" : "pick a class");
}

function ready() {  // whether there is something to ask for
  return text ? $("prompt").value.trim() !== "" : selected !== null;
}

function zoom(img) {  // show small images at a whole multiple of their size, pixels kept sharp
  const k = Math.max(1, Math.min(4, Math.floor(400 / img.naturalWidth)));
  img.style.width = `${img.naturalWidth * k}px`;
}

function pick(i) {
  selected = i;
  if (text) $("prompt").value = model.examples[i];
  for (const b of $("classes").children) b.classList.toggle("selected", b.dataset.class === String(i));
  start();
}

function settings() {
  const body = {
    scale: Number($("scale").value),
    sampler: $("sampler").value,
    steps: Number($("steps").value),
    seed: Number($("seed").value),
    n: Number($("n").value),
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
  if (lo !== "" || hi !== "") body.interval = [Number(lo || 0), Number(hi || 0)];
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

// Stop the request in flight: the server cancels its job; its stream then says at which step.
async function cancel() {
  const req = current;
  if (!req) return;
  if (req.job) {
    await postJSON("api/cancel", {job: req.job}).catch(() => null);
  } else {
    req.controller.abort();  // not queued yet: leaving cancels it on the server
    if (current === req) { current = null; setStatus("cancelled", "cancelled"); }
  }
}

async function start() {
  if (!ready()) {
    setStatus("error", text ? "type a prompt first" : "pick a class first");
    return;
  }
  const old = current;
  if (old) {  // a new request replaces the one in flight
    current = null;
    if (old.job) postJSON("api/cancel", {job: old.job}).catch(() => null);
    old.controller.abort();
  }
  const req = {controller: new AbortController(), job: null, frames: 0};
  current = req;
  $("preview").dataset.frames = "0";
  $("frame-info").textContent = "";
  $("progress").value = 0;
  setStatus("queued", "sending…");
  let resp;
  try {
    resp = await postJSON("api/generate", settings(), req.controller.signal);
  } catch (e) {
    if (current === req) { current = null; setStatus("error", "the server cannot be reached"); }
    return;
  }
  if (!resp.ok) {
    const j = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
    if (current === req) { current = null; setStatus("error", j.error); }
    return;
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
  if (current === req) current = null;
}

function handle(req, ev) {
  if (ev.type === "queued") req.job = ev.job;
  if (req !== current) return;  // a replaced request's last events
  const png = (b64) => `data:image/png;base64,${b64}`;
  switch (ev.type) {
    case "queued":
      setStatus("queued", ev.ahead ? `waiting: ${ev.ahead} request(s) ahead` : "starting");
      break;
    case "started":
      setStatus("running", `sampling ${ev.images} image(s), ${ev.steps} steps`);
      break;
    case "preview":
      req.frames += 1;
      $("preview").src = png(ev.png);
      $("preview").dataset.frames = String(req.frames);
      $("frame-info").textContent = `step ${ev.step}/${ev.steps}, t = ${ev.t}`;
      $("progress").value = ev.step / ev.steps;
      break;
    case "done": {
      $("final").src = png(ev.png);
      $("progress").value = 1;
      const s = ev.settings;
      const a = $("download");
      a.href = png(ev.png);
      const what = s.mode === "strip" ? "strip" : `s${s.scale}`;
      const who = s.prompt !== null ? s.prompt.slice(0, 40) : model.classes[s.class];
      const name = `cfgdiff-${who}-${what}-seed${s.seed}`;
      a.download = `${name.replace(/[^A-Za-z0-9._-]+/g, "_")}.png`;
      a.hidden = false;
      $("command").textContent = ev.commands.join("\n");
      $("copy").disabled = false;
      setStatus("done", `done in ${ev.seconds.toFixed(2)} s (${ev.images_per_s} images/s)`);
      break;
    }
    case "cancelled":
      setStatus("cancelled", `cancelled at step ${ev.step}`);
      break;
    case "error":
      setStatus("error", ev.error);
      break;
  }
}

init().catch((e) => setStatus("error", `cannot load the model: ${e}`));
