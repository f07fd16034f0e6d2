/* The console's page script.
 *
 * Charts: every <canvas data-chart="ID"> is drawn with Chart.js from the JSON in the
 * element with that id (written by Django's json_script: no script is built from
 * strings). After htmx swaps in a fresh fragment, the same canvas is updated in place
 * from the fresh JSON. Amounts arrive as exact USD decimal strings; they become numbers
 * only to be drawn, and tooltips show the strings.
 *
 * Spend page: picking dates selects "Custom dates"; picking a preset clears the dates.
 */
(function () {
  "use strict";

  var PALETTE = ["#3d6fd8", "#e8833a", "#2f9e6e", "#b84fc0", "#d64550", "#8c6d1f", "#7a8699"];

  function datasets(series) {
    return series.datasets.map(function (set, i) {
      return {
        label: set.label,
        data: set.values.map(Number),
        usd: set.values,
        backgroundColor: PALETTE[i % PALETTE.length],
        stack: "spend",
      };
    });
  }

  function config(series) {
    return {
      type: "bar",
      data: { labels: series.labels, datasets: datasets(series) },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: { duration: 300 },
        scales: {
          x: { stacked: true, ticks: { maxRotation: 0, autoSkip: true, autoSkipPadding: 16 } },
          y: {
            stacked: true,
            beginAtZero: true,
            ticks: {
              callback: function (value, index, ticks) {
                return "USD " + Chart.Ticks.formatters.numeric.call(this, value, index, ticks);
              },
            },
          },
        },
        plugins: {
          legend: { position: "bottom" },
          tooltip: {
            callbacks: {
              label: function (item) {
                return item.dataset.label + ": USD " + item.dataset.usd[item.dataIndex];
              },
            },
          },
        },
      },
    };
  }

  function sameShape(chart, series) {
    var current = chart.data.datasets;
    return (
      current.length === series.datasets.length &&
      chart.data.labels.join("|") === series.labels.join("|") &&
      current.every(function (set, i) { return set.label === series.datasets[i].label; })
    );
  }

  function update(chart, series) {
    if (sameShape(chart, series)) {
      // Same bars: change the values only, so the chart moves instead of redrawing.
      chart.data.datasets.forEach(function (set, i) {
        set.data = series.datasets[i].values.map(Number);
        set.usd = series.datasets[i].values;
      });
    } else {
      chart.data.labels = series.labels;
      chart.data.datasets = datasets(series);
    }
    chart.update();
  }

  function drawCharts() {
    if (typeof Chart === "undefined") return;
    // Charts whose canvas a swap removed are released.
    Object.values(Chart.instances).forEach(function (chart) {
      if (!chart.canvas.isConnected) chart.destroy();
    });
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var source = document.getElementById(canvas.dataset.chart);
      if (!source) return;
      var series = JSON.parse(source.textContent);
      var chart = Chart.getChart(canvas);
      if (chart) update(chart, series);
      else new Chart(canvas, config(series));
    });
  }

  function spendForm() {
    var form = document.getElementById("spend-form");
    if (!form) return;
    var range = form.elements.range;
    ["from", "to"].forEach(function (name) {
      form.elements[name].addEventListener("change", function () { range.value = "custom"; });
    });
    range.addEventListener("change", function () {
      if (range.value !== "custom") {
        form.elements.from.value = "";
        form.elements.to.value = "";
      }
    });
  }

  // One refresh settles several swaps (the live part and its out-of-band parts): draw once.
  var pending = false;
  function drawSoon() {
    if (pending) return;
    pending = true;
    window.requestAnimationFrame(function () {
      pending = false;
      drawCharts();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    spendForm();
  });
  document.addEventListener("htmx:afterSettle", drawSoon);
})();
