// paraloop dashboard: polls /dashboard/api/* and draws with uPlot. No build step, no dependencies besides uPlot.
// The control token (when the run has one) lives in this tab's sessionStorage and travels only in the
// Authorization header: never in a URL, never logged.
"use strict";

(() => {
  const API = "/dashboard/api";
  const POLL_MS = { run: 2000, serve: 2000, files: 5000 };
  const HIDDEN_POLL_MS = 15000;
  const SERVE_POINTS = 900; // serve mode keeps the last 30 minutes of 2-second samples
  const PALETTE = ["#4f8cff", "#f0883e", "#3fb950", "#db61a2", "#a371f7", "#2dd4bf", "#e3b341", "#f85149"];
  const TOKEN_KEY = "paraloop.control-token";
  const AUTH = (document.querySelector('meta[name="paraloop-auth"]') || {}).content === "token";

  // Charts per step; `keys` are metrics.jsonl names, `match` picks keys by name (metrics other parts may add).
  const CHARTS = [
    { id: "reward", title: "Reward", keys: ["reward_mean"], spread: "reward_std", labels: { reward_mean: "mean (± std)" } },
    // held-out evaluations ([eval]), from /api/evals: one point per evaluated step, a series per task and metric
    { id: "eval", title: "Held-out evaluation", evals: true, match: (k) => /(^|· )(reward_mean|pass@\d+)$/.test(k),
      first: (k) => k.endsWith("reward_mean"), optional: true },
    { id: "loss", title: "Loss", keys: ["loss", "pg_loss"] },
    { id: "kl", title: "KL to reference", keys: ["kl"] },
    { id: "entropy", title: "Entropy", keys: ["entropy"] },
    { id: "clip", title: "Clip fraction", keys: ["clip_fraction"] },
    { id: "ratio", title: "Train / inference ratio", keys: ["ratio_mean"], band: ["ratio_min", "ratio_max"],
      labels: { ratio_mean: "mean (min–max)" } },
    // magnitudes (nats), counts and fractions each on a chart of their own: on one axis ~1e-6 nats read as 0
    // beside ~100 tokens
    { id: "mismatch", title: "Train / inference mismatch (nats)", keys: ["mismatch_abs_mean", "mismatch_abs_max"],
      labels: { mismatch_abs_mean: "mean |engine − learner|", mismatch_abs_max: "max" }, optional: true },
    { id: "mismatch-tokens", title: "Mismatch: tokens compared", keys: ["mismatch_tokens"],
      labels: { mismatch_tokens: "tokens at the learner's version" }, optional: true },
    { id: "rollout-outside", title: "Rollout ratios outside [0.8, 1.25]", keys: ["rollout_ratio_outside"],
      labels: { rollout_ratio_outside: "fraction of tokens" }, optional: true },
    { id: "distill", title: "Teacher − student KL (distillation, nats)", keys: ["distill_kl"],
      labels: { distill_kl: "mean student − teacher log-prob" }, optional: true },
    { id: "staleness", title: "Rollout staleness (adapter versions)", keys: ["staleness_mean", "staleness_max"],
      labels: { staleness_mean: "mean", staleness_max: "max" }, optional: true },
    { id: "throughput", title: "Tokens / s", keys: ["tokens_per_s", "generation_tokens_per_s"],
      labels: { tokens_per_s: "learner", generation_tokens_per_s: "generation" } },
    { id: "steptime", title: "Learner step time", keys: ["step_time_s"], unit: "s" },
    { id: "swap", title: "Swap pause", keys: ["swap_pause_ms"], unit: "ms" },
    { id: "queues", title: "Queue depths", match: (k) => k.startsWith("queue_") || k === "engine_requests" },
    { id: "memory", title: "Memory", keys: ["rss_bytes", "mlx_active_bytes", "mlx_peak_bytes"], unit: "bytes",
      labels: { rss_bytes: "process RSS", mlx_active_bytes: "MLX active", mlx_peak_bytes: "MLX peak" } },
    { id: "grad", title: "Gradient norm", keys: ["grad_norm"] },
  ];
  const SERVE_CHARTS = [
    { id: "s-tps", title: "Generation tokens / s", keys: ["tokens_per_s"], labels: { tokens_per_s: "tokens/s" } },
    { id: "s-queue", title: "Engine load", keys: ["queue_depth", "waiting_requests", "active_rows"],
      labels: { queue_depth: "admitted", waiting_requests: "waiting", active_rows: "decoding rows" } },
    { id: "s-mem", title: "Memory", keys: ["rss_bytes", "mlx_active_bytes"], unit: "bytes",
      labels: { rss_bytes: "process RSS", mlx_active_bytes: "MLX active" } },
  ];
  const NOT_PLOTTED = new Set(["step", "time", "skipped", "version", "serving_version"]);

  const S = {
    token: sessionStorage.getItem(TOKEN_KEY),
    info: null,
    mode: null,
    runs: [], // {id, name, rows: [], since, rev, note, rollouts: Map(step -> samples), rolloutSince}
    status: null,
    serveRows: [],
    charts: new Map(), // id -> chart view
    extraCharts: new Map(),
    timer: null,
    failures: 0,
    pendingAction: null,
    ready: false,
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  };

  // ---------- formatting ----------
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  function fmt(v, unit) {
    if (!isNum(v)) return "–";
    if (unit === "bytes") return fmtBytes(v);
    const a = Math.abs(v);
    let s;
    if (a === 0) s = "0";
    else if (Number.isInteger(v) && a < 1e4) s = String(v);
    else if (a >= 1e6) s = (v / 1e6).toFixed(a >= 1e7 ? 1 : 2) + "M";
    else if (a >= 1e4) s = (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
    else if (a >= 100) s = v.toFixed(0);
    else if (a >= 1) s = v.toFixed(2);
    else if (a >= 0.001) s = v.toPrecision(3);
    else s = v.toExponential(1);
    return unit && unit !== "bytes" ? `${s} ${unit}` : s;
  }
  const fmtRate = (v) => (isNum(v) && Math.abs(v) < 100 ? v.toFixed(1) : fmt(v));
  function fmtBytes(v) {
    if (!isNum(v)) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
  }
  function fmtDuration(s) {
    if (!isNum(s)) return "–";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
  }

  // ---------- HTTP ----------
  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(path, { method = "GET" } = {}) {
    const headers = { Accept: "application/json" };
    if (S.token) headers.Authorization = `Bearer ${S.token}`;
    const res = await fetch(path, { method, headers, cache: "no-store", credentials: "same-origin" });
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    if (!res.ok) {
      const message = (body && body.error && body.error.message) || `${res.status} ${res.statusText}`;
      throw new HttpError(res.status, message);
    }
    return body;
  }

  // ---------- token ----------
  let tokenWaiters = [];
  function askToken(message, isError) {
    const dialog = $("token-dialog");
    $("token-msg").textContent = message;
    $("token-msg").className = isError ? "error" : "";
    $("token-input").value = "";
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }
  function closeToken(value) {
    const dialog = $("token-dialog");
    if (dialog.open) dialog.close();
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach((w) => w(value));
  }
  function setToken(token) {
    S.token = token || null;
    if (S.token) sessionStorage.setItem(TOKEN_KEY, S.token);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  // ---------- toasts ----------
  function toast(message, kind = "") {
    const node = el("div", { class: `toast ${kind}`, text: message });
    $("toasts").append(node);
    setTimeout(() => node.remove(), kind === "error" ? 8000 : 4500);
  }

  // ---------- charts ----------
  // Tick labels with as many decimals as the tick spacing needs (0.9995, 1.0000, 1.0005 stay distinct).
  function tickLabels(vals, incr, unit) {
    if (unit === "bytes") return vals.map(fmtBytes);
    const big = Math.max(...vals.map((v) => Math.abs(v)));
    if (big >= 1e4) return vals.map((v) => fmt(v));
    const decimals = Math.max(0, Math.min(8, -Math.floor(Math.log10(incr || 1) + 1e-9)));
    return vals.map((v) => (decimals > 4 && big < 1e-3 ? v.toExponential(1) : v.toFixed(decimals)));
  }

  function axisOpts(unit) {
    const grid = { stroke: "#232833", width: 1 };
    const ticks = { stroke: "#2b3140", width: 1 };
    const font = "11px system-ui, sans-serif";
    return [
      // steps are whole numbers: no 2.5 ticks (uPlot picks the first increment that fits)
      { stroke: "#8b93a5", grid, ticks, font, incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6] },
      { stroke: "#8b93a5", grid, ticks, font,
        values: (u, vals, axis, space, incr) => tickLabels(vals, incr, unit),
        size: (u, values) => 18 + 6.6 * Math.max(3, ...(values || []).map((v) => String(v).length)) },
    ];
  }

  // A band (mean ± spread, or min..max) drawn under the lines, so it adds no legend entries.
  function bandHook(view) {
    return (u) => {
      if (!view.bands.length) return;
      const { ctx } = u;
      const { left, top, width, height } = u.bbox;
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top, width, height);
      ctx.clip();
      for (const band of view.bands) {
        const xs = u.data[0];
        const pts = [];
        for (let i = 0; i < xs.length; i++) {
          if (isNum(band.lo[i]) && isNum(band.hi[i])) pts.push(i);
        }
        if (pts.length < 2) continue;
        ctx.beginPath();
        pts.forEach((i, n) => {
          const x = u.valToPos(xs[i], "x", true), y = u.valToPos(band.hi[i], "y", true);
          n ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
        });
        for (let n = pts.length - 1; n >= 0; n--) {
          const i = pts[n];
          ctx.lineTo(u.valToPos(xs[i], "x", true), u.valToPos(band.lo[i], "y", true));
        }
        ctx.closePath();
        ctx.fillStyle = band.color;
        ctx.fill();
      }
      ctx.restore();
    };
  }

  function withAlpha(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }

  class ChartView {
    constructor(spec, container, { time = false } = {}) {
      this.spec = spec;
      this.time = time;
      this.signature = "";
      this.bands = [];
      this.points = 0;
      this.node = el("div", { class: "chart", "data-chart": spec.id, "data-points": "0" });
      this.lastNode = el("span", { class: "last" });
      this.node.append(el("div", { class: "chart-title" }, el("span", { class: "name", text: spec.title }), this.lastNode));
      this.body = el("div");
      this.node.append(this.body);
      this.empty = el("div", { class: "empty", text: "no data yet" });
      this.body.append(this.empty);
      container.append(this.node);
      this.plot = null;
    }

    width() { return Math.max(200, this.node.clientWidth - 20); }

    // series: [{label, color, values, dash?}], bands: [{lo, hi, color}], xs: x values
    update(xs, series, bands) {
      this.bands = bands;
      const signature = series.map((s) => `${s.label}|${s.color}`).join(";");
      const data = [xs, ...series.map((s) => s.values)];
      const points = xs.length;
      this.node.dataset.points = String(points);
      this.points = points;
      if (!series.length || !points) {
        this.empty.hidden = false;
        if (this.plot) { this.plot.destroy(); this.plot = null; this.signature = ""; }
        return;
      }
      this.empty.hidden = true;
      if (!this.plot || signature !== this.signature) {
        if (this.plot) this.plot.destroy();
        this.signature = signature;
        const all = () => [...series.flatMap((s) => s.values), ...bands.flatMap((b) => [...b.lo, ...b.hi])];
        this.allValues = all;
        const axes = axisOpts(this.spec.unit);
        if (this.time) delete axes[0].incrs;
        const opts = {
          width: this.width(),
          height: 190,
          legend: { show: true, live: true },
          cursor: { sync: { key: "paraloop" }, points: { size: 6 } },
          scales: {
            x: { time: this.time },
            y: { range: (u, min, max) => this.yRange(min, max) },
          },
          axes,
          series: [
            { label: this.time ? "time" : "step", value: (u, v) => (v == null ? "–" : this.time ? new Date(v * 1000).toLocaleTimeString() : v) },
            ...series.map((s) => ({
              label: s.label, stroke: s.color, width: 1.6, spanGaps: true, dash: s.dash,
              points: { show: points < 60, size: 4 },
              value: (u, v) => fmt(v, this.spec.unit),
            })),
          ],
          hooks: { drawAxes: [bandHook(this)] },
        };
        this.plot = new uPlot(opts, data, this.body);
      } else {
        this.plot.setData(data);
      }
      const first = series[0].values;
      let last = null;
      for (let i = first.length - 1; i >= 0; i--) if (isNum(first[i])) { last = first[i]; break; }
      // the newest value of the first series (one run's; with several runs the legend tells them apart)
      this.lastNode.textContent = last == null || series.length > 1 && S.runs.length > 1 ? "" : fmt(last, this.spec.unit);
    }

    yRange(min, max) {
      const vals = (this.allValues ? this.allValues() : []).filter(isNum);
      if (vals.length) {
        min = Math.min(...vals);
        max = Math.max(...vals);
      }
      if (!isNum(min) || !isNum(max)) return [0, 1];
      if (min === max) {
        const pad = Math.abs(min) * 0.1 || 1;
        return [min - pad, max + pad];
      }
      const pad = (max - min) * 0.08;
      const lo = min >= 0 && min - pad < 0 ? 0 : min - pad;
      return [lo, max + pad];
    }

    resize() { if (this.plot) this.plot.setSize({ width: this.width(), height: 190 }); }
  }

  // ---------- metrics -> series ----------
  function keysOf(spec, knownKeys) {
    if (spec.keys) return spec.keys.filter((k) => knownKeys.has(k));
    const first = spec.first || (() => false); // these keys lead (the chart's headline value is the first's)
    return [...knownKeys].filter(spec.match).sort((a, b) => first(b) - first(a) || (a < b ? -1 : a > b ? 1 : 0));
  }

  function columns(rows, xs, key) {
    const byStep = new Map(rows.map((r) => [r.step, r[key]]));
    return xs.map((x) => (isNum(byStep.get(x)) ? byStep.get(x) : null));
  }

  function unionSteps(runs) {
    const set = new Set();
    runs.forEach((r) => r.rows.forEach((row) => set.add(row.step)));
    return [...set].sort((a, b) => a - b);
  }

  function knownKeys(runs) {
    const keys = new Set();
    for (const run of runs) {
      for (const row of run.rows.slice(-50)) {
        for (const [k, v] of Object.entries(row)) if (isNum(v) && !NOT_PLOTTED.has(k)) keys.add(k);
      }
    }
    return keys;
  }

  function seriesFor(spec, runs, xs, keys) {
    const compare = runs.length > 1;
    const chosen = keysOf(spec, keys);
    const series = [], bands = [];
    runs.forEach((run, r) => {
      const runKeys = compare ? chosen.slice(0, spec.match ? chosen.length : 1) : chosen;
      runKeys.forEach((key, k) => {
        const color = compare ? PALETTE[r % PALETTE.length] : PALETTE[k % PALETTE.length];
        const label = compare
          ? (runKeys.length > 1 ? `${run.name} · ${key}` : run.name)
          : (spec.labels && spec.labels[key]) || key;
        const values = run.rows.length ? columns(run.rows, xs, key) : xs.map(() => null);
        series.push({ label, color, values, dash: compare && k > 0 ? [4, 3] : undefined });
        if (k === 0 && spec.spread && keys.has(spec.spread)) {
          const spread = columns(run.rows, xs, spec.spread);
          bands.push({
            lo: values.map((v, i) => (isNum(v) && isNum(spread[i]) ? v - spread[i] : null)),
            hi: values.map((v, i) => (isNum(v) && isNum(spread[i]) ? v + spread[i] : null)),
            color: withAlpha(color, compare ? 0.1 : 0.16),
          });
        }
        if (k === 0 && spec.band && spec.band.every((b) => keys.has(b))) {
          bands.push({ lo: columns(run.rows, xs, spec.band[0]), hi: columns(run.rows, xs, spec.band[1]),
                       color: withAlpha(color, compare ? 0.1 : 0.16) });
        }
      });
    });
    return { series, bands };
  }

  // A run's evaluations as step rows: {step, "reward_mean": .., "pass@1": ..}, keys prefixed "task · " when the
  // run evaluates more than one task.
  function evalRows(run) {
    const tasks = new Set(run.evals.map((e) => e.task));
    const byStep = new Map();
    for (const e of run.evals) {
      const row = byStep.get(e.step) || { step: e.step };
      for (const [k, v] of Object.entries(e)) {
        if (isNum(v) && !NOT_PLOTTED.has(k)) row[tasks.size > 1 ? `${e.task} · ${k}` : k] = v;
      }
      byStep.set(e.step, row);
    }
    return [...byStep.values()].sort((a, b) => a.step - b.step);
  }

  function drawStepCharts() {
    const runs = S.runs;
    const xs = unionSteps(runs);
    const keys = knownKeys(runs);
    const evalRuns = runs.map((run) => ({ ...run, rows: evalRows(run) }));
    const charted = new Set();
    for (const spec of CHARTS) {
      let view = S.charts.get(spec.id);
      if (!view) {
        view = new ChartView(spec, $("charts"));
        S.charts.set(spec.id, view);
      }
      if (spec.evals) {
        const evalXs = unionSteps(evalRuns);
        const { series } = seriesFor(spec, evalRuns, evalXs, knownKeys(evalRuns));
        view.node.hidden = !series.length;
        if (!view.node.hidden) view.update(evalXs, series, []);
        continue;
      }
      const { series, bands } = seriesFor(spec, runs, xs, keys);
      keysOf(spec, keys).forEach((k) => charted.add(k));
      if (spec.spread) charted.add(spec.spread);
      (spec.band || []).forEach((k) => charted.add(k));
      view.node.hidden = spec.optional && !series.length;
      if (!view.node.hidden) view.update(xs, series, bands);
    }
    // every other numeric metric, in the "All metrics" panel (drawn only while it is open)
    if (!$("more-panel").open) return;
    for (const key of [...keys].sort()) {
      if (charted.has(key)) continue;
      let view = S.extraCharts.get(key);
      if (!view) {
        view = new ChartView({ id: `m-${key}`, title: key, keys: [key], unit: key.endsWith("_bytes") ? "bytes" : undefined },
                             $("all-charts"));
        S.extraCharts.set(key, view);
      }
      const { series, bands } = seriesFor(view.spec, runs, xs, keys);
      view.update(xs, series, bands);
    }
  }

  function drawServeCharts() {
    const rows = S.serveRows;
    const xs = rows.map((r) => r.time);
    for (const spec of SERVE_CHARTS) {
      let view = S.charts.get(spec.id);
      if (!view) {
        view = new ChartView(spec, $("charts"), { time: true });
        S.charts.set(spec.id, view);
      }
      const keys = spec.keys.filter((k) => rows.some((r) => isNum(r[k])));
      const series = keys.map((k, i) => ({ label: spec.labels[k] || k, color: PALETTE[i], values: rows.map((r) => (isNum(r[k]) ? r[k] : null)) }));
      view.update(xs, series, []);
    }
  }

  // ---------- KPIs ----------
  function kpi(label, value, sub, id) {
    return el("div", { class: "kpi", "data-kpi": id || label },
      el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
      el("div", { class: "sub", text: sub || "\u00a0" }));
  }

  function lastRow(run) { return run && run.rows.length ? run.rows[run.rows.length - 1] : null; }

  function drawKpis() {
    const box = $("kpis");
    const cards = [];
    const st = S.status;
    if (S.mode === "run" && st) {
      const row = lastRow(S.runs[0]) || {};
      const m = st.last_metrics || {};
      const rows = S.runs[0] ? S.runs[0].rows : [];
      const times = rows.slice(-10).map((r) => r.step_time_s).filter(isNum);
      const avg = times.length ? times.reduce((a, b) => a + b, 0) / times.length : null;
      const left = st.total_steps - st.step;
      const eta = avg != null && left > 0 && st.state === "training" ? `about ${fmtDuration(avg * left)} left` : "";
      cards.push(kpi("Step", `${st.step} / ${st.total_steps}`, eta, "step"));
      cards.push(kpi("Reward", isNum(m.reward_mean) ? m.reward_mean.toFixed(3) : "–",
        isNum(m.reward_std) ? `± ${m.reward_std.toFixed(3)} std` : "", "reward"));
      cards.push(kpi("Adapter", `v${st.adapter_version}`, `serving v${st.serving_version}`, "adapter"));
      cards.push(kpi("Generation", `${fmtRate(st.tokens_per_s)} tok/s`, `${fmt((st.engine || {}).active_rows)} rows decoding`, "generation"));
      cards.push(kpi("Learner", `${fmtRate(m.tokens_per_s)} tok/s`, isNum(m.step_time_s) ? `${fmt(m.step_time_s)} s per step` : "", "learner"));
      const pause = st.swap_pause_ms || {};
      cards.push(kpi("Swap pause", isNum(pause.last) ? `${fmt(pause.last)} ms` : "–",
        isNum(pause.median) ? `median ${fmt(pause.median)} ms · ${pause.count} swaps` : "no swap yet", "swap"));
      const mem = st.memory || {};
      cards.push(kpi("Memory", fmtBytes(mem.rss_bytes ?? mem.peak_rss_bytes), isNum(mem.mlx_active_bytes) ? `MLX ${fmtBytes(mem.mlx_active_bytes)}` : "", "memory"));
      const q = st.queues || {};
      cards.push(kpi("Queues", Object.values(q).reduce((a, b) => a + b, 0).toString(),
        Object.entries(q).map(([k, v]) => `${k} ${v}`).join(" · "), "queues"));
      const ck = st.last_checkpoint ? st.last_checkpoint.split("/").pop() : null;
      const ckStep = ck && /^step_(\d+)$/.exec(ck);
      cards.push(kpi("Checkpoint", ckStep ? `step ${Number(ckStep[1])}` : ck || "none yet",
        `uptime ${fmtDuration(st.uptime_s)}`, "checkpoint"));
      const src = st.source || {};
      if (src.source === "sessions") {  // agent sessions (docs/agents.md): what waits, and what was dropped
        cards.push(kpi("Agent sessions", `${src.open_sessions} open`,
          `${src.unfinished_groups} unfinished · ${src.groups_waiting} groups waiting · ` +
          `${src.expired_sessions + src.expired_groups + src.dropped_oversize} dropped`, "sessions"));
      }
      if (st.skipped_steps || st.dropped_stale || st.rejected_groups) {
        cards.push(kpi("Skipped / stale / rejected", `${st.skipped_steps} / ${st.dropped_stale} / ${st.rejected_groups}`, "", "problems"));
      }
      void row;
      const pct = st.total_steps ? Math.min(100, (100 * st.step) / st.total_steps) : 0;
      $("progress-bar").style.width = `${pct}%`;
    } else if (S.mode === "serve" && st) {
      const e = st.engine || {};
      const mem = st.memory || {};
      cards.push(kpi("Serving", `v${st.serving_version}`, "adapter version", "serving"));
      cards.push(kpi("Generation", `${fmtRate(st.tokens_per_s)} tok/s`, `${fmt(e.generated_tokens)} tokens so far`, "generation"));
      cards.push(kpi("Requests", fmt(e.requests_served), `${fmt(e.queue_depth)} in the engine now`, "requests"));
      cards.push(kpi("Decoding rows", fmt(e.active_rows), `${fmt(e.waiting_requests)} waiting`, "rows"));
      cards.push(kpi("Memory", fmtBytes(mem.rss_bytes ?? mem.peak_rss_bytes), isNum(mem.mlx_active_bytes) ? `MLX ${fmtBytes(mem.mlx_active_bytes)}` : "", "memory"));
      cards.push(kpi("Uptime", fmtDuration(st.uptime_s), "", "uptime"));
    } else if (S.mode === "files") {
      cards.push(kpi("Runs", String(S.runs.length), "compared side by side", "runs"));
      const steps = S.runs.map((r) => (lastRow(r) || {}).step).filter(isNum);
      cards.push(kpi("Steps", steps.length ? String(Math.max(...steps)) : "–", "most steps of any run", "steps"));
    }
    box.replaceChildren(...cards);
  }

  function drawRunsTable() {
    if (S.mode !== "files") return;
    $("runs-panel").hidden = false;
    const head = el("tr", {}, ...["run", "steps", "last reward", "best reward", "last loss", "directory"].map((t) => el("th", { text: t })));
    const rows = S.runs.map((run, i) => {
      const rewards = run.rows.map((r) => r.reward_mean).filter(isNum);
      const last = lastRow(run) || {};
      return el("tr", {},
        el("td", {}, el("span", { class: "swatch" }), run.name),
        el("td", { text: String(run.rows.length) }),
        el("td", { text: isNum(last.reward_mean) ? last.reward_mean.toFixed(3) : "–" }),
        el("td", { text: rewards.length ? Math.max(...rewards).toFixed(3) : "–" }),
        el("td", { text: isNum(last.loss) ? last.loss.toPrecision(3) : "–" }),
        el("td", { class: "path", text: run.run_dir || "" }));
    });
    $("runs-table").replaceChildren(head, ...rows);
    // colours set through the CSSOM, never as style attributes
    $("runs-table").querySelectorAll(".swatch").forEach((node, i) => { node.style.background = PALETTE[i % PALETTE.length]; });
  }

  function drawNotes() {
    const notes = S.runs.filter((r) => r.note).map((r) => el("div", { class: "note", text: `${r.name}: ${r.note}` }));
    $("notes").replaceChildren(...notes);
  }

  function setState(state, label) {
    const badge = $("state-badge");
    badge.dataset.state = state;
    badge.textContent = label || state;
  }

  function drawControls() {
    const st = S.status;
    if (S.mode !== "run") return;
    $("controls").hidden = false;
    const state = st ? st.state : "disconnected";
    const enable = {
      pause: state === "training" || state === "finishing",
      resume: state === "paused" || state === "pausing",
      step: state === "paused" || state === "pausing",
      snapshot: state !== "stopping" && state !== "disconnected",
      stop: state !== "stopping" && state !== "disconnected",
    };
    for (const button of $("controls").querySelectorAll("button")) {
      if (!button.classList.contains("busy")) button.disabled = !enable[button.dataset.action];
    }
  }

  // ---------- rollouts ----------
  function tokenColor(lp) {
    const p = Math.exp(lp);
    if (p >= 0.9) return null;
    const surprise = Math.min(1, -lp / 4.6); // p = 0.01 is full colour
    const hue = 48 - 48 * surprise;
    return `hsla(${hue.toFixed(0)}, 92%, 56%, ${(0.18 + 0.6 * surprise).toFixed(2)})`;
  }

  function sampleCard(s) {
    const chips = [
      el("span", { class: `chip ${s.reward > 0 ? "pos" : s.reward < 0 ? "neg" : ""}`, text: `reward ${fmt(s.reward)}` }),
      el("span", { class: `chip ${s.advantage > 0 ? "pos" : s.advantage < 0 ? "neg" : ""}`, text: `adv ${s.advantage >= 0 ? "+" : ""}${fmt(s.advantage)}` }),
      el("span", { class: "chip", text: `group ${s.group}` }),
      el("span", { class: "chip", text: s.rollout_version != null ? `rollout v${s.rollout_version} → v${s.adapter_version}` : `trained into v${s.adapter_version}` }),
    ];
    // the summary shows the last turn of a chat prompt (special tokens and the role name dropped)
    const turns = s.prompt.split(/<\|[^|>]{1,40}\|>/).map((t) => t.replace(/^\s*(system|user|assistant)\b/, "").trim()).filter(Boolean);
    const promptTail = (turns.length ? turns[turns.length - 1] : s.prompt).replace(/\s+/g, " ").slice(-140);
    const prompt = el("details", { class: "prompt" },
      el("summary", { text: `Prompt: ${promptTail.length >= 140 ? "…" : ""}${promptTail}` }),
      el("pre", { text: (s.prompt_truncated ? "[…] " : "") + s.prompt }));
    const completion = el("div", { class: "completion" });
    const untrained = new Set(s.untrained || []);
    s.tokens.forEach((text, i) => {
      const lp = s.logprobs[i];
      const shown = text.replace(/\n/g, "↵\n");
      const span = el("span", { class: untrained.has(i) ? "tok untrained" : "tok", text: shown });
      if (lp != null) {
        const color = tokenColor(lp);
        if (color) span.style.background = color;
        span.title = `${JSON.stringify(text)}  logprob ${lp.toFixed(3)}  p ${Math.exp(lp).toFixed(3)}`;
      } else {
        span.title = `${JSON.stringify(text)}  ${untrained.has(i) ? "(not trained)" : "(no log-prob sent)"}`;
      }
      completion.append(span);
    });
    if (!s.tokens.length) completion.append(el("span", { class: "cut", text: "(empty completion)" }));
    if (s.completion_truncated) completion.append(el("span", { class: "cut", text: " […]" }));
    return el("div", { class: "sample", "data-step": String(s.step) }, el("div", { class: "sample-head" }, ...chips), prompt, completion);
  }

  function drawRollouts() {
    const runSelect = $("rollout-run");
    const stepSelect = $("rollout-step");
    runSelect.hidden = S.runs.length < 2;
    if (runSelect.options.length !== S.runs.length) {
      runSelect.replaceChildren(...S.runs.map((r, i) => el("option", { value: String(i), text: r.name })));
    }
    const run = S.runs[Number(runSelect.value || 0)];
    if (!run) return;
    const steps = [...run.rollouts.keys()].sort((a, b) => b - a);
    const current = stepSelect.value;
    const wanted = $("follow").checked || !steps.includes(Number(current)) ? String(steps[0] ?? "") : current;
    const optionSig = steps.join(",");
    if (stepSelect.dataset.sig !== optionSig) {
      stepSelect.replaceChildren(...steps.map((s) => el("option", { value: String(s), text: `step ${s}` })));
      stepSelect.dataset.sig = optionSig;
    }
    stepSelect.value = wanted;
    const box = $("rollouts");
    const key = `${runSelect.value}:${wanted}`;
    if (box.dataset.shown === key) return;
    box.dataset.shown = key;
    const samples = run.rollouts.get(Number(wanted));
    if (!samples || !samples.length) {
      box.replaceChildren(el("p", { class: "empty", text: "No rollouts yet: they appear after the first learner step." }));
      return;
    }
    box.replaceChildren(...samples.map(sampleCard));
  }

  // ---------- configuration ----------
  function tomlValue(v) {
    if (v === null || v === undefined) return null;
    if (typeof v === "string") return JSON.stringify(v);
    if (Array.isArray(v)) return `[${v.map((x) => tomlValue(x) ?? "null").join(", ")}]`;
    return String(v);
  }
  function drawConfig() {
    const box = $("config");
    const parts = [];
    for (const run of S.info.runs) {
      if (S.info.runs.length > 1) parts.push(el("h3", { text: run.name }));
      if (!run.config) { parts.push(el("p", { class: "empty", text: "no configuration found (it is saved with each checkpoint)" })); continue; }
      const pre = el("pre");
      const walk = (prefix, tree) => {
        const scalars = Object.entries(tree).filter(([, v]) => v === null || typeof v !== "object" || Array.isArray(v));
        const tables = Object.entries(tree).filter(([, v]) => v !== null && typeof v === "object" && !Array.isArray(v));
        if (prefix) pre.append(el("span", { class: "section", text: `\n[${prefix}]\n` }));
        for (const [k, v] of scalars) {
          const value = tomlValue(v);
          pre.append(el("span", { class: "key", text: k }), " = ",
            el("span", { class: value === null ? "unset" : "val", text: value === null ? "(unset)" : value }), "\n");
        }
        for (const [k, v] of tables) walk(prefix ? `${prefix}.${k}` : k, v);
      };
      walk("", run.config);
      parts.push(pre);
    }
    box.replaceChildren(...parts);
  }

  // ---------- polling ----------
  async function loadInfo() {
    S.info = await api(`${API}/info`);
    S.mode = S.info.mode;
    S.runs = S.info.runs.map((r) => ({ ...r, rows: [], since: -1, rev: null, note: null, evals: [], rollouts: new Map(), rolloutSince: -1 }));
    const title = S.mode === "files" ? S.runs.map((r) => r.name).join("  vs  ") : (S.runs[0].run_dir || S.runs[0].name);
    $("run-title").textContent = title;
    document.title = `paraloop · ${S.runs.map((r) => r.name).join(" vs ")}`;
    if (S.mode === "files") setState("compare", S.runs.length > 1 ? "compare" : "files");
    if (S.mode === "serve") { // no learner: no steps, no rollouts, no progress
      $("rollouts-panel").hidden = true;
      $("more-panel").hidden = true;
      $("progress").hidden = true;
    }
    drawConfig();
  }

  async function pollMetrics(run) {
    for (let guard = 0; guard < 50; guard++) { // a long history comes in bounded pieces
      const rev = run.rev == null ? "" : `&rev=${run.rev}`;
      const page = await api(`${API}/metrics?run=${run.id}&since=${run.since}${rev}`);
      if (page.reset) { run.rows = []; run.rollouts.clear(); run.rolloutSince = -1; }
      run.rev = page.rev;
      run.note = page.note;
      if (page.rows.length) {
        run.rows.push(...page.rows);
        run.since = page.rows[page.rows.length - 1].step;
      }
      if (!page.more) break;
    }
  }

  async function pollEvals(run) { // few (one per task every eval.every_steps): the whole list each time
    run.evals = (await api(`${API}/evals?run=${run.id}`)).evals;
  }

  async function pollRollouts(run) {
    const page = await api(`${API}/rollouts?run=${run.id}&since=${run.rolloutSince}`);
    for (const entry of page.steps) {
      run.rollouts.set(entry.step, entry.samples);
      run.rolloutSince = Math.max(run.rolloutSince, entry.step);
    }
    const keep = [...run.rollouts.keys()].sort((a, b) => b - a).slice(50);
    keep.forEach((s) => run.rollouts.delete(s)); // the page keeps as few as the server does
  }

  async function poll() {
    if (S.mode === "serve") {
      S.status = await api(`${API}/status`);
      const e = S.status.engine || {};
      S.serveRows.push({ time: S.status.time, ...e, ...(S.status.memory || {}) });
      if (S.serveRows.length > SERVE_POINTS) S.serveRows.splice(0, S.serveRows.length - SERVE_POINTS);
      setState("serving");
      drawServeCharts();
    } else {
      if (S.mode === "run") S.status = await api(`${API}/status`);
      for (const run of S.runs) {
        await pollMetrics(run);
        await pollEvals(run);
        await pollRollouts(run);
      }
      if (S.mode === "run") setState(S.status.state);
      drawStepCharts();
      drawRunsTable();
      drawRollouts();
      drawNotes();
    }
    drawKpis();
    drawControls();
  }

  function schedule() {
    clearTimeout(S.timer);
    const base = POLL_MS[S.mode] || 2000;
    const backoff = S.failures ? Math.min(30000, base * 2 ** Math.min(S.failures, 4)) : base;
    S.timer = setTimeout(tick, document.hidden ? Math.max(HIDDEN_POLL_MS, backoff) : backoff);
  }

  async function tick() {
    try {
      if (!S.info) await loadInfo();
      await poll();
      S.failures = 0;
      $("conn").dataset.ok = "1";
      $("conn").title = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) {
        const token = await askToken(S.token ? "The token was refused. Enter the run's control token." : "This run requires its control token (server.control_token).", !!S.token);
        if (token) setToken(token);
        else { setState("locked", "token needed"); return; }
        return tick();
      }
      S.failures++;
      $("conn").dataset.ok = "2";
      $("conn").title = `not reachable: ${err.message}`;
      if (S.mode !== "files") { setState("disconnected", S.mode === "run" ? "ended or unreachable" : "unreachable"); S.status = null; drawControls(); }
    }
    schedule();
  }

  // ---------- control actions ----------
  const ACTIONS = {
    pause: (r) => `Paused at step ${r.step}`,
    resume: (r) => `Resumed at step ${r.step}`,
    step: (r) => `Step ${r.step} done${r.skipped ? " (skipped: non-finite)" : ""}: reward ${fmt((r.metrics || {}).reward_mean)}`,
    snapshot: (r) => `Checkpoint written: ${r.path}`,
    stop: (r) => `Stopping after step ${r.step}: writing the final checkpoint`,
  };

  function confirmStop() {
    const dialog = $("confirm-dialog");
    dialog.showModal();
    return new Promise((resolve) => {
      const done = (value) => { dialog.close(); $("confirm-ok").onclick = null; $("confirm-cancel").onclick = null; resolve(value); };
      $("confirm-ok").onclick = () => done(true);
      $("confirm-cancel").onclick = () => done(false);
      dialog.oncancel = () => done(false);
    });
  }

  async function act(action, button) {
    if (action === "stop" && !(await confirmStop())) return;
    if (AUTH && !S.token) {
      const token = await askToken("Control actions need the run's control token (server.control_token).", false);
      if (!token) return;
      setToken(token);
    }
    button.classList.add("busy");
    button.disabled = true;
    try {
      for (let attempt = 0; attempt < 3; attempt++) {
        try {
          const result = await api(`/control/${action}`, { method: "POST" });
          toast(ACTIONS[action](result), "ok");
          break;
        } catch (err) {
          if (err instanceof HttpError && err.status === 401) {
            toast("The control token was refused", "error");
            const token = await askToken("The token was refused. Enter the run's control token.", true);
            if (!token) return;
            setToken(token);
            continue;
          }
          toast(`${action}: ${err.message}`, "error");
          break;
        }
      }
    } finally {
      button.classList.remove("busy");
      clearTimeout(S.timer);
      tick();
    }
  }

  // ---------- start ----------
  function start() {
    if (typeof uPlot === "undefined") {
      $("notes").append(el("div", { class: "note", text: "uPlot did not load: the charts cannot be drawn." }));
    }
    $("controls").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action]");
      if (button && !button.disabled) act(button.dataset.action, button);
    });
    $("token-ok").addEventListener("click", () => closeToken($("token-input").value.trim() || null));
    $("token-cancel").addEventListener("click", () => closeToken(null));
    $("token-dialog").addEventListener("cancel", (e) => { e.preventDefault(); closeToken(null); });
    $("token-input").addEventListener("keydown", (e) => { if (e.key === "Enter") $("token-ok").click(); });
    $("token-button").addEventListener("click", async () => {
      const token = await askToken("Enter the run's control token (kept in this tab only).", false);
      if (token) { setToken(token); clearTimeout(S.timer); tick(); }
    });
    $("follow").addEventListener("change", drawRollouts);
    $("rollout-step").addEventListener("change", () => { $("follow").checked = false; drawRollouts(); });
    $("rollout-run").addEventListener("change", () => { $("rollout-step").dataset.sig = ""; drawRollouts(); });
    $("more-panel").addEventListener("toggle", () => { if (S.info && S.mode !== "serve") drawStepCharts(); });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => [...S.charts.values(), ...S.extraCharts.values()].forEach((c) => c.resize()), 150);
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden && S.info) { clearTimeout(S.timer); tick(); } });
    $("token-button").hidden = !AUTH;
    if (AUTH && !S.token) {
      askToken("This run requires its control token (server.control_token).", false).then((token) => {
        if (!token) { setState("locked", "token needed"); return; }
        setToken(token);
        tick();
      });
    } else {
      tick();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
