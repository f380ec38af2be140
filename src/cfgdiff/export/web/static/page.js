// The page of `cfgdiff export --format web`: loads model.json (what the export wrote about the
// model: its classes or captions, schedule, timesteps, defaults) and model.onnx, and samples
// with sampler.js, drawing each step. Everything it loads lies beside it (ort/ holds the
// runtime); docs/DESIGN.md, "The static page".
import * as ort from "./ort/ort.wasm.bundle.min.mjs";
import { sampleImage, toUint8 } from "./sampler.js";

const $ = (id) => document.getElementById(id);
const state = { record: null, session: null, busy: true }; // busy until the model is loaded

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

// Draws (C, H, W) values in [-1, 1] into a canvas of the image's own size.
function draw(canvas, x, [c, h, w]) {
  const px = toUint8(x);
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let k = 0; k < h * w; k++) {
    for (let ch = 0; ch < 3; ch++) img.data[4 * k + ch] = px[(c === 1 ? 0 : ch) * h * w + k];
    img.data[4 * k + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// The network f(x, t, c) as sampler.js calls it: `conds` one condition per row (a class index,
// or an embedding for a text model), all rows at timestep t.
async function net(x, t, conds) {
  const r = state.record;
  const b = conds.length;
  const feeds = { x: new ort.Tensor("float32", x, [b, ...r.shape]) };
  const tType = r.inputs.t;
  feeds.t = tType === "int64"
    ? new ort.Tensor("int64", BigInt64Array.from(conds, () => BigInt(t)), [b])
    : new ort.Tensor(tType, Float32Array.from(conds, () => t), [b]);
  if (r.condition === "text") {
    const c = new Float32Array(b * r.cond_dim);
    conds.forEach((e, i) => c.set(e, i * r.cond_dim));
    feeds.c = new ort.Tensor("float32", c, [b, r.cond_dim]);
  } else {
    feeds.c = new ort.Tensor("int64", BigInt64Array.from(conds, (y) => BigInt(y)), [b]);
  }
  const out = await state.session.run(feeds);
  return out[state.session.outputNames[0]].data;
}

function settings() {
  const r = state.record;
  const steps = Number($("steps").value);
  const seed = Number($("seed").value);
  if (!Number.isInteger(steps) || steps < 1 || steps > r.max_steps) {
    throw new Error(`steps must be a whole number in [1, ${r.max_steps}], got ${$("steps").value}`);
  }
  if (!Number.isInteger(seed) || seed < 0 || seed > 4294967295) {
    throw new Error(`seed must be a whole number in [0, 4294967295], got ${$("seed").value}`);
  }
  return { scale: Number($("scale").value), sampler: $("sampler").value, steps, seed };
}

async function run(cond, name) {
  if (state.busy) return;
  let s;
  try {
    s = settings();
  } catch (e) {
    setStatus(e.message, "error");
    return;
  }
  state.busy = true;
  document.querySelectorAll("#controls button, #controls select").forEach((b) => {
    b.disabled = true;
  });
  const r = state.record;
  const strip = $("steps-strip");
  strip.replaceChildren();
  const show = $("show").value;
  const started = performance.now();
  setStatus(`sampling ${name}: step 0 of ${s.steps}`, "running");
  try {
    const x = await sampleImage(net, r, {
      cond, ...s,
      onStep: async (i, t, xt, x0) => {
        const shown = show === "xt" ? xt : x0;
        draw($("image"), shown, r.shape);
        const fig = document.createElement("figure");
        const cv = document.createElement("canvas");
        draw(cv, shown, r.shape);
        const cap = document.createElement("figcaption");
        cap.textContent = `${i + 1}: t=${t}`;
        fig.append(cv, cap);
        strip.append(fig);
        const ms = (performance.now() - started) / (i + 1);
        setStatus(`sampling ${name}: step ${i + 1} of ${s.steps} (${ms.toFixed(0)} ms a step)`,
          "running");
        await new Promise((done) => requestAnimationFrame(() => done()));
      },
    });
    draw($("image"), x, r.shape);
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    $("caption").textContent = `${name}, s = ${s.scale} (w = ${s.scale - 1}), ${s.sampler}, ` +
      `${s.steps} steps, seed ${s.seed}`;
    $("image").dataset.sample = JSON.stringify({ ...s, cond: r.condition === "text" ? name : cond });
    setStatus(`done in ${secs} s`, "done");
  } catch (e) {
    setStatus(`sampling failed: ${e.message || e}`, "error");
  } finally {
    state.busy = false;
    document.querySelectorAll("#controls button, #controls select").forEach((b) => {
      b.disabled = false;
    });
  }
}

function selectButton(button) {
  document.querySelectorAll("#classes button").forEach((b) => b.classList.remove("selected"));
  button.classList.add("selected");
}

function showScale() {
  const s = Number($("scale").value);
  $("scale-label").textContent = `s = ${s.toFixed(1)}`;
  $("w-label").textContent = `w = s − 1 = ${(s - 1).toFixed(1)}`;
}

async function main() {
  const r = await (await fetch("model.json")).json();
  state.record = r;
  $("model-name").textContent = `${r.source}: ${r.shape.join(" × ")}, ` +
    (r.condition === "text" ? `${r.captions.length} prompts` : `${r.class_names.length} classes`);
  $("scale").value = r.defaults.scale;
  $("sampler").value = r.defaults.sampler;
  $("steps").value = r.defaults.steps;
  $("steps").max = r.max_steps;
  $("seed").value = r.defaults.seed;
  showScale();
  $("scale").addEventListener("input", showScale);
  $("reseed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 4294967296);
  });
  if (r.condition === "text") {
    $("classes-title").textContent = "Prompt (one of the model's captions)";
    $("prompt-row").hidden = false;
    r.captions.forEach((cap, i) => $("prompt").add(new Option(cap.prompt, String(i))));
    $("go").addEventListener("click", () => {
      const cap = r.captions[Number($("prompt").value)];
      run(cap.embedding, cap.prompt);
    });
  } else {
    r.class_names.forEach((name, label) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = name;
      b.dataset.class = String(label);
      b.title = `class ${label}`;
      b.addEventListener("click", () => {
        if (state.busy) return;
        selectButton(b);
        run(label, name);
      });
      $("classes").append(b);
    });
  }
  // single-threaded WebAssembly: no cross-origin isolation needed from the host
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  // the WebAssembly binary beside the page (the glue code is inside the bundle)
  ort.env.wasm.wasmPaths = {
    wasm: new URL("ort/ort-wasm-simd-threaded.wasm", document.baseURI).href,
  };
  state.session = await ort.InferenceSession.create("model.onnx", {
    executionProviders: ["wasm"],
  });
  state.busy = false;
  setStatus(r.condition === "text" ? "pick a prompt" : "pick a class", "ready");
}

main().catch((e) => setStatus(`cannot load the model: ${e.message || e}`, "error"));
