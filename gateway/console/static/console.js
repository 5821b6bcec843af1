// Draws the account page's usage chart (cost and calls per day) with the vendored uPlot, from
// the JSON the page carries (no inline script: the Content-Security-Policy admits none).
"use strict";
(function () {
  const source = document.getElementById("usage-by-day");
  const box = document.getElementById("usage-chart");
  if (!source || !box || typeof uPlot === "undefined") return;
  const rows = JSON.parse(source.textContent);
  const byDay = new Map(rows.map((r) => [r.day, r]));
  const span = Number(box.dataset.days || 30);
  const today = Math.floor(Date.now() / 86400000);
  const days = [], cost = [], calls = [];
  for (let d = today - span + 1; d <= today; d++) {
    const key = new Date(d * 86400000).toISOString().slice(0, 10);
    const row = byDay.get(key);
    days.push(d * 86400);
    cost.push(row ? Number(row.cost) : 0); // for drawing only: the table shows the exact amounts
    calls.push(row ? row.calls : 0);
  }
  const money = (u, splits) => splits.map((v) => v.toFixed(v !== 0 && v < 0.01 ? 6 : 2));
  const width = () => Math.max(280, Math.min(box.clientWidth || 600, 1100));
  const chart = new uPlot(
    {
      width: width(),
      height: 220,
      series: [
        {},
        { label: "cost", stroke: "#1c64f2", fill: "rgba(28,100,242,.12)", scale: "cost" },
        { label: "calls", stroke: "#9b1c1c", scale: "calls" },
      ],
      axes: [
        {},
        { scale: "cost", values: money, size: 84 },
        { scale: "calls", side: 1, grid: { show: false } },
      ],
      scales: { x: { time: true }, cost: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } },
    },
    [days, cost, calls],
    box,
  );
  box.dataset.points = String(rows.length); // the days that had calls
  window.addEventListener("resize", () => chart.setSize({ width: width(), height: 220 }));
})();

// The overview's chart: calls per second and errors per minute, from the page's JSON.
(function () {
  const source = document.getElementById("overview-data");
  const box = document.getElementById("overview-chart");
  if (!source || !box || typeof uPlot === "undefined") return;
  const series = JSON.parse(source.textContent);
  const width = () => Math.max(280, Math.min(box.clientWidth || 600, 1100));
  const chart = new uPlot(
    {
      width: width(),
      height: 220,
      series: [
        {},
        { label: "calls/s", stroke: "#1c64f2", scale: "rate" },
        { label: "errors/min", stroke: "#9b1c1c", scale: "errors" },
      ],
      axes: [{}, { scale: "rate" }, { scale: "errors", side: 1, grid: { show: false } }],
      scales: {
        x: { time: true, range: () => [Date.now() / 1000 - 3600, Date.now() / 1000] },
        rate: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] },
        errors: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] },
      },
    },
    [series.time, series.calls_per_s, series.errors_per_min],
    box,
  );
  box.dataset.points = String(series.time.length);
  window.addEventListener("resize", () => chart.setSize({ width: width(), height: 220 }));
})();

// The account page's cost by model, as bars (one per model, in the table's order).
(function () {
  const source = document.getElementById("usage-by-model");
  const box = document.getElementById("model-chart");
  if (!source || !box || typeof uPlot === "undefined") return;
  const rows = JSON.parse(source.textContent);
  const names = rows.map((r) => r.model || "(notifications)");
  const xs = rows.map((r, i) => i);
  const cost = rows.map((r) => Number(r.cost)); // for drawing only
  const money = (u, splits) => splits.map((v) => v.toFixed(v !== 0 && v < 0.01 ? 6 : 2));
  const width = () => Math.max(280, Math.min(box.clientWidth || 600, 1100));
  const chart = new uPlot(
    {
      width: width(),
      height: 200,
      series: [
        { label: "model", value: (u, i) => (i == null ? "--" : names[i] || "") },
        {
          label: "cost",
          stroke: "#1c64f2",
          fill: "rgba(28,100,242,.35)",
          paths: uPlot.paths.bars({ size: [0.6, 80] }),
          points: { show: false },
        },
      ],
      axes: [
        { values: (u, splits) => splits.map((i) => (Number.isInteger(i) ? names[i] || "" : "")) },
        { values: money, size: 84 },
      ],
      scales: {
        x: { time: false, range: () => [-0.5, rows.length - 0.5] },
        y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] },
      },
    },
    [xs, cost],
    box,
  );
  box.dataset.points = String(rows.length);
  window.addEventListener("resize", () => chart.setSize({ width: width(), height: 200 }));
})();
