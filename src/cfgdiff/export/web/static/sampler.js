// cfgdiff's samplers in the browser: the seeded noise, classifier-free guidance and the DDIM
// (eta = 0) and DPM-Solver++(2M) steps, each written after its Python original (samplers.py,
// guidance.py, diffusion.py) with the same timesteps, which the export computes and writes into
// model.json. No DOM and no runtime here: the network is a function handed in, so that this
// module also runs under node. docs/DESIGN.md, "The static page", says what agrees with what.

// --- Seeded noise -------------------------------------------------------------------------
// A counter-based generator that cfgdiff.export.web.seed_noise repeats in Python: element k of
// the initial noise of seed s is Box-Muller of two 32-bit hashes,
//   u1 = (h(s, 2k) + 1) / 2^32 in (0, 1],  u2 = h(s, 2k + 1) / 2^32 in [0, 1),
//   z = sqrt(-2 ln u1) cos(2 pi u2), rounded to float32,
// with h(s, j) = mix(mix(j) ^ mix(s + 0x9e3779b9)) and mix Wellons' lowbias32 (all mod 2^32).

export function mix32(x) {
  x = x >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  x ^= x >>> 16;
  return x >>> 0;
}

export function seedNoise(seed, n) {
  const key = mix32((seed + 0x9e3779b9) >>> 0);
  const out = new Float32Array(n);
  for (let k = 0; k < n; k++) {
    const h1 = mix32(mix32((2 * k) >>> 0) ^ key);
    const h2 = mix32(mix32((2 * k + 1) >>> 0) ^ key);
    const u1 = (h1 + 1) / 4294967296;
    const u2 = h2 / 4294967296;
    out[k] = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
  }
  return out;
}

// --- Guidance -------------------------------------------------------------------------------
// guidance.guided_denoiser with plain CFG and static thresholding (the defaults of cfgdiff
// sample): one batched call over [x; x] with conditions [c; null],
//   pred = pred_null + s (pred_c - pred_null),
// only the conditional row at s = 1 and only the null row at s = 0; then (eps_hat, x0_hat) from
// the prediction (eps or v) in double precision, x0_hat clamped to [-1, 1] and eps_hat made
// consistent with it, both returned as float32.

export function guidedDenoiser(net, record, cond, scale) {
  const alphaBar = record.alpha_bar;
  const kind = record.prediction;
  return async function predict(x, t) {
    const n = x.length;
    let pred;
    if (scale === 1) {
      pred = await net(x, t, [cond]);
    } else if (scale === 0) {
      pred = await net(x, t, [record.null_condition]);
    } else {
      const both = new Float32Array(2 * n);
      both.set(x, 0);
      both.set(x, n);
      const out = await net(both, t, [cond, record.null_condition]);
      pred = new Float32Array(n);
      for (let k = 0; k < n; k++) {
        const c = out[k];
        const r = out[n + k];
        pred[k] = r + scale * (c - r);
      }
    }
    const ab = alphaBar[t];
    const a = Math.sqrt(ab);
    const s = Math.sqrt(1 - ab);
    const eps = new Float32Array(n);
    const x0 = new Float32Array(n);
    for (let k = 0; k < n; k++) {
      const xt = x[k];
      const p = pred[k];
      let z = kind === "v" ? a * xt - s * p : (xt - s * p) / a;
      z = Math.min(1, Math.max(-1, z));
      x0[k] = z;
      eps[k] = (xt - a * z) / s;
    }
    return [eps, x0];
  };
}

// --- Samplers -------------------------------------------------------------------------------
// sample(predict, xT, alphaBar, timesteps, onStep): timesteps are those of
// schedule.spaced_timesteps (T-1 first); onStep(i, t, x, x0) after every step, like the
// samplers' callback; alpha_bar of "t = -1" is 1 (the clean data).

function abAt(alphaBar, t) {
  return t < 0 ? 1 : alphaBar[t];
}

// samplers.sample_ddim at eta = 0: x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat
export async function sampleDdim(predict, xT, alphaBar, timesteps, onStep) {
  let x = Float32Array.from(xT);
  for (let i = 0; i < timesteps.length; i++) {
    const t = timesteps[i];
    const tPrev = i + 1 < timesteps.length ? timesteps[i + 1] : -1;
    const abPrev = abAt(alphaBar, tPrev);
    const [eps, x0] = await predict(x, t);
    const ca = Math.sqrt(abPrev);
    const cd = Math.sqrt(Math.max(1 - abPrev, 0));
    const next = new Float32Array(x.length);
    for (let k = 0; k < x.length; k++) next[k] = ca * x0[k] + cd * eps[k];
    x = next;
    if (onStep) await onStep(i, t, x, x0);
  }
  return x;
}

// samplers.sample_dpmpp_2m: with lambda = log(alpha / sigma) and h = lambda_next - lambda,
// x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D, D = (1 + 1/2r) x0_hat - 1/2r x0_prev
// (r = h_prev / h), D = x0_hat on the first step; the last step returns x0_hat.
export async function sampleDpmpp2m(predict, xT, alphaBar, timesteps, onStep) {
  let x = Float32Array.from(xT);
  let x0Prev = null;
  let hPrev = null;
  for (let i = 0; i < timesteps.length; i++) {
    const t = timesteps[i];
    const tNext = i + 1 < timesteps.length ? timesteps[i + 1] : -1;
    const ab = abAt(alphaBar, t);
    const abNext = abAt(alphaBar, tNext);
    const a = Math.sqrt(ab);
    const s = Math.sqrt(1 - ab);
    const [, x0] = await predict(x, t);
    if (tNext < 0) {
      x = Float32Array.from(x0);
    } else {
      const aN = Math.sqrt(abNext);
      const sN = Math.sqrt(1 - abNext);
      const h = Math.log(aN / sN) - Math.log(a / s);
      const next = new Float32Array(x.length);
      const cx = sN / s;
      const cd = -aN * Math.expm1(-h);
      if (x0Prev === null) {
        for (let k = 0; k < x.length; k++) next[k] = cx * x[k] + cd * x0[k];
      } else {
        const r = hPrev / h;
        const w1 = 1 + 1 / (2 * r);
        const w2 = 1 / (2 * r);
        for (let k = 0; k < x.length; k++) {
          next[k] = cx * x[k] + cd * (w1 * x0[k] - w2 * x0Prev[k]);
        }
      }
      x = next;
      x0Prev = x0;
      hPrev = h;
    }
    if (onStep) await onStep(i, t, x, x0);
  }
  return x;
}

export const SAMPLERS = { ddim: sampleDdim, "dpmpp-2m": sampleDpmpp2m };

// generate.to_uint8: clamp to [-1, 1], (x + 1) 127.5, rounded half to even like torch.round.
export function toUint8(x) {
  const out = new Uint8ClampedArray(x.length);
  for (let k = 0; k < x.length; k++) {
    const v = (Math.min(1, Math.max(-1, Math.fround(x[k]))) + 1) * 127.5;
    let r = Math.round(v);
    if (r - v === 0.5 && r % 2 !== 0) r -= 1;
    out[k] = r;
  }
  return out;
}

// One image: noise from the seed, guided by `scale` towards condition `cond` (a class index,
// or a caption's embedding for a text model), `steps` of sampler `name`.
export async function sampleImage(net, record, { cond, scale, sampler, steps, seed, onStep }) {
  const [c, h, w] = record.shape;
  const timesteps = record.timesteps[String(steps)];
  if (!timesteps) throw new Error(`steps must be in [1, ${record.max_steps}], got ${steps}`);
  const run = SAMPLERS[sampler];
  if (!run) throw new Error(`sampler must be one of ${Object.keys(SAMPLERS).join(", ")}`);
  const xT = seedNoise(seed, c * h * w);
  const predict = guidedDenoiser(net, record, cond, scale);
  return run(predict, xT, record.alpha_bar, timesteps, onStep);
}
