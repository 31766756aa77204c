"""The report's page: HTML, style and script in one string (``{{title}}`` filled in by
:mod:`clearmaps.report`). The data come from data.js beside it (a script tag, since a page opened from disk
may not fetch files). Every text from the data is set with ``textContent``, never parsed as HTML."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
  :root { --fg: #1d1d1f; --muted: #666; --line: #ddd; --bad: #c62828; --good: #2e7d32; }
  * { box-sizing: border-box; }
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
         background: #fafafa; }
  header { background: #fff; border-bottom: 1px solid var(--line); padding: 14px 22px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 0 0 8px; }
  main { padding: 16px 22px; }
  .muted { color: var(--muted); }
  .panel > .muted { max-width: 44em; }
  .cards { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
  .panel { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; }
  .stat { font-size: 26px; font-weight: 600; }
  table.matrix { border-collapse: collapse; font-size: 12px; }
  table.matrix th, table.matrix td { border: 1px solid #eee; min-width: 34px; height: 26px; text-align: center;
                                     padding: 2px 4px; }
  table.matrix th { background: #f4f4f4; font-weight: 600; }
  table.matrix td.clickable { cursor: pointer; }
  table.matrix td.clickable:hover { outline: 2px solid #333; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 3px;
            vertical-align: middle; }
  #controls { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: center; margin: 8px 0 12px; }
  #controls label { font-size: 13px; }
  select, button { font: inherit; padding: 3px 6px; }
  #gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--card-w, 320px), 1fr)); gap: 10px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
  .card.wrong { border-color: #e9a0a0; }
  .tiles { display: flex; gap: 4px; }
  .tile { image-rendering: pixelated; background-repeat: no-repeat; border: 1px solid #eee; flex: none; }
  .cap { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
  .cap .file { font-family: ui-monospace, Menlo, monospace; font-size: 11px; color: var(--muted); }
  .tag-bad { color: var(--bad); font-weight: 600; }
  .tag-good { color: var(--good); font-weight: 600; }
  #pager { display: flex; gap: 8px; align-items: center; margin: 12px 0; }
  .legend span { margin-right: 10px; white-space: nowrap; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div id="subtitle" class="muted"></div>
</header>
<main>
  <section class="cards" id="summary"></section>
  <section class="cards" style="margin-top:16px">
    <div class="panel"><h2>Confusion matrix</h2>
      <div class="muted">rows: true class, columns: predicted; click a cell to see those images</div>
      <div id="confusion"></div></div>
    <div class="panel"><h2>CLEAR matrix</h2>
      <div class="muted" id="clear-note"></div>
      <div id="clearmatrix"></div></div>
  </section>
  <section class="panel" style="margin-top:16px">
    <h2>Gallery</h2>
    <div class="legend" id="legend"></div>
    <div id="controls">
      <label>true class <select id="f-true"></select></label>
      <label>predicted <select id="f-pred"></select></label>
      <label>show <select id="f-kind">
        <option value="all">all images</option><option value="wrong">misclassified</option>
        <option value="right">correctly classified</option><option value="bad">unreadable (skipped)</option>
      </select></label>
      <label>sort by <select id="f-sort">
        <option value="index">dataset order</option>
        <option value="prob-asc">confidence, lowest first</option>
        <option value="prob-desc">confidence, highest first</option>
        <option value="share-asc">true-class share, lowest first</option>
        <option value="share-desc">true-class share, highest first</option>
        <option value="strong-desc">strong-feature fraction, highest first</option>
      </select></label>
      <label><input type="checkbox" id="v-clear" checked> CLEAR map</label>
      <label><input type="checkbox" id="v-overlay" checked> overlay</label>
      <label><input type="checkbox" id="v-input" checked> input</label>
      <button id="reset">reset</button>
    </div>
    <div id="pager">
      <button id="first">&laquo;</button><button id="prev">&lsaquo; previous</button>
      <span id="pageinfo"></span>
      <button id="next">next &rsaquo;</button><button id="last">&raquo;</button>
    </div>
    <div id="gallery"></div>
  </section>
</main>
<script src="data.js"></script>
<script>
"use strict";
(function () {
  const D = window.CLEARMAPS_REPORT;
  const $ = (id) => document.getElementById(id);
  const el = (tag, props, text) => {
    const e = document.createElement(tag);
    if (props) for (const k in props) { if (k === "style") e.style.cssText = props[k]; else e.setAttribute(k, props[k]); }
    if (text !== undefined) e.textContent = String(text);
    return e;
  };
  if (!D) { document.body.textContent = "data.js is missing: rerun clearmaps report."; return; }
  const names = D.classNames, n = names.length, C = D.columns, N = C.index.length;
  const label = Int32Array.from(C.label), pred = Int32Array.from(C.predicted);
  const prob = Float64Array.from(C.prob), share = Float64Array.from(C.share), strong = Float64Array.from(C.strong);
  const pct = (v) => (100 * v).toFixed(1) + "%";

  // ---- header and summary
  $("title").textContent = D.title;
  $("subtitle").textContent = "dataset: " + D.settings.dataset + " · model " + D.settings.model + " · backend " +
    D.settings.backend + " · method " + D.settings.method + " · reduce " + D.settings.reduce + " · maps " +
    D.settings.size + (D.count < D.total ? " · " + D.count + " of " + D.total + " images done so far" : "");
  const stat = (title, value, note) => {
    const p = el("div", {class: "panel"});
    p.append(el("div", {class: "muted"}, title), el("div", {class: "stat"}, value));
    if (note) p.append(el("div", {class: "muted"}, note));
    $("summary").append(p);
  };
  stat("images", N.toLocaleString(), D.labelled.toLocaleString() + " labelled");
  stat("accuracy", D.accuracy === null ? "n/a" : pct(D.accuracy),
       D.accuracy === null ? "no labels" : D.correct.toLocaleString() + " of " + D.labelled.toLocaleString() + " correct");
  stat("misclassified", (D.labelled - D.correct).toLocaleString(), "");
  if (D.bad) stat("unreadable", D.bad.toLocaleString(), "skipped with --skip-bad");

  // ---- matrices
  // dark cells get white text, so that a full diagonal stays readable
  const shade = (alpha, rgb) => "background:rgba(" + rgb + "," + alpha.toFixed(3) + ")" +
    (alpha > 0.55 ? ";color:#fff" : "");
  const hexrgb = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)).join(",");
  function matrix(host, values, cellText, cellStyle, cellTitle, onClick) {
    const t = el("table", {class: "matrix"});
    const head = el("tr"); head.append(el("th", null, ""));
    names.forEach((name, j) => { const th = el("th"); th.append(el("span", {class: "swatch", style: "background:" + D.palette[j]}), document.createTextNode(name)); head.append(th); });
    t.append(head);
    values.forEach((row, i) => {
      const tr = el("tr"); tr.append(el("th", null, names[i]));
      row.forEach((v, j) => {
        const td = el("td", {style: cellStyle(v, i, j), title: cellTitle(v, i, j)}, cellText(v, i, j));
        if (onClick && v) { td.classList.add("clickable"); td.addEventListener("click", () => onClick(i, j)); }
        tr.append(td);
      });
      t.append(tr);
    });
    host.append(t);
  }
  const cmax = Math.max(1, ...D.confusion.flat());
  matrix($("confusion"), D.confusion, (v) => v || "",
         (v, i, j) => shade(v / cmax, i === j ? "46,125,50" : "198,40,40"),
         (v, i, j) => v + " image(s) of class " + names[i] + " predicted as " + names[j],
         (i, j) => { setFilters(String(i), String(j), "all"); $("gallery").scrollIntoView(); });
  $("clear-note").textContent = "rows: " + D.clearRowsBy + "; a cell: the mean share of a map's dominant response " +
    "that the column's class dominates (a row sums to 100%); hover for how often it leads";
  matrix($("clearmatrix"), D.clearMatrix, (v) => v >= 0.005 ? Math.round(100 * v) : "",
         (v, i, j) => shade(Math.min(1, v * 1.6), hexrgb(D.palette[j])),
         (v, i, j) => "maps of " + names[i] + " (" + D.clearCounts[i] + "): class " + names[j] + " dominates " +
           pct(v) + " of the response on average and leads in " + D.clearLeads[i][j] + " map(s)",
         (i, j) => { setFilters(String(i), "any", "all", "share-asc"); $("gallery").scrollIntoView(); });

  // ---- gallery
  const legend = $("legend");
  legend.append(el("span", {class: "muted"}, "CLEAR map colours: " + D.paletteNote + ":"));
  names.forEach((name, j) => { const s = el("span"); s.append(el("span", {class: "swatch", style: "background:" + D.palette[j]}), document.createTextNode(name)); legend.append(s); });
  for (const id of ["f-true", "f-pred"]) {
    const s = $(id);
    s.append(el("option", {value: "any"}, "any"));
    names.forEach((name, j) => s.append(el("option", {value: String(j)}, name)));
  }
  for (const v of ["overlay", "input"]) if (!D.views.includes(v)) { $("v-" + v).checked = false; $("v-" + v).disabled = true; }

  let order = new Int32Array(0), page = 0;
  const sorters = {
    "index": null,
    "prob-asc": (a, b) => prob[a] - prob[b] || a - b, "prob-desc": (a, b) => prob[b] - prob[a] || a - b,
    "share-asc": (a, b) => share[a] - share[b] || a - b, "share-desc": (a, b) => share[b] - share[a] || a - b,
    "strong-desc": (a, b) => strong[b] - strong[a] || a - b,
  };
  function select() {
    const t = $("f-true").value, p = $("f-pred").value, kind = $("f-kind").value, sort = $("f-sort").value;
    const ti = t === "any" ? -2 : +t, pi = p === "any" ? -2 : +p;
    const keep = new Int32Array(N);
    let m = 0;
    for (let i = 0; i < N; i++) {
      if (ti !== -2 && label[i] !== ti) continue;
      if (pi !== -2 && pred[i] !== pi) continue;
      if (kind === "wrong" && !(label[i] >= 0 && pred[i] >= 0 && label[i] !== pred[i])) continue;
      if (kind === "right" && !(label[i] >= 0 && label[i] === pred[i])) continue;
      if (kind === "bad" && pred[i] >= 0) continue;
      if (sort.startsWith("share") && share[i] < 0) continue;  // no label, no true-class share
      keep[m++] = i;
    }
    order = keep.slice(0, m);
    if (sorters[sort]) order.sort(sorters[sort]);
    page = 0;
    render();
  }
  function tile(view, i) {
    const row = C.index[i], chunk = Math.floor(row / D.chunkSize), k = row % D.chunkSize;
    const cols = Math.min(D.atlasColumns, D.chunkSize), [th, tw] = D.tile, scale = D.display / Math.max(th, tw);
    const w = Math.round(tw * scale), h = Math.round(th * scale);
    const d = el("div", {class: "tile", title: view});
    d.style.width = w + "px"; d.style.height = h + "px";
    d.style.backgroundImage = "url(atlas/" + view + "-" + String(chunk).padStart(5, "0") + ".png)";
    d.style.backgroundSize = (cols * tw * scale) + "px auto";
    d.style.backgroundPosition = (-(k % cols) * tw * scale) + "px " + (-Math.floor(k / cols) * th * scale) + "px";
    return d;
  }
  function card(i) {
    const wrong = label[i] >= 0 && pred[i] >= 0 && label[i] !== pred[i];
    const c = el("div", {class: "card" + (wrong ? " wrong" : ""), "data-index": String(C.index[i])});
    const tiles = el("div", {class: "tiles"});
    for (const v of ["clear", "overlay", "input"]) if ($("v-" + v).checked) tiles.append(tile(v, i));
    c.append(tiles);
    const cap = el("div", {class: "cap"});
    if (pred[i] < 0) {
      cap.append(el("span", {class: "tag-bad"}, "unreadable: "), document.createTextNode(C.error[i]));
    } else {
      if (label[i] >= 0) cap.append(el("span", {class: wrong ? "tag-bad" : "tag-good"}, (wrong ? "✗ " : "✓ ") + "true " + names[label[i]]), document.createTextNode(" · "));
      cap.append(el("span", {class: "pred"}, "predicted " + names[pred[i]] + " (p = " + prob[i].toFixed(3) + ")"));
      const extra = [];
      if (share[i] >= 0) extra.push("true-class share " + pct(share[i]));
      if (strong[i] >= 0) extra.push("strong features " + pct(strong[i]));
      if (extra.length) cap.append(el("div", {class: "muted"}, extra.join(" · ")));
    }
    cap.append(el("div", {class: "file"}, "#" + C.index[i] + " " + C.file[i]));
    c.append(cap);
    return c;
  }
  function render() {
    const pages = Math.max(1, Math.ceil(order.length / D.pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    const g = $("gallery"), frag = document.createDocumentFragment();
    const nviews = ["clear", "overlay", "input"].filter((v) => $("v-" + v).checked).length || 1;
    g.style.setProperty("--card-w", (nviews * (D.display + 6) + 14) + "px");
    for (let k = page * D.pageSize; k < Math.min(order.length, (page + 1) * D.pageSize); k++) frag.append(card(order[k]));
    g.replaceChildren(frag);
    $("pageinfo").textContent = order.length ? "page " + (page + 1) + " of " + pages + " · " +
      order.length.toLocaleString() + " image(s)" : "no image matches these filters";
    $("first").disabled = $("prev").disabled = page === 0;
    $("next").disabled = $("last").disabled = page >= pages - 1;
  }
  function setFilters(t, p, kind, sort) {
    $("f-true").value = t; $("f-pred").value = p; $("f-kind").value = kind;
    if (sort) $("f-sort").value = sort;
    select();
  }
  for (const id of ["f-true", "f-pred", "f-kind", "f-sort"]) $(id).addEventListener("change", select);
  for (const v of ["clear", "overlay", "input"]) $("v-" + v).addEventListener("change", render);
  $("first").addEventListener("click", () => { page = 0; render(); });
  $("prev").addEventListener("click", () => { page--; render(); });
  $("next").addEventListener("click", () => { page++; render(); });
  $("last").addEventListener("click", () => { page = 1e9; render(); });
  $("reset").addEventListener("click", () => setFilters("any", "any", "all", "index"));
  window.clearmapsReport = {shown: () => Array.from(document.querySelectorAll("#gallery .card"), (c) => +c.dataset.index),
                            matched: () => order.length};
  select();
})();
</script>
</body>
</html>
"""
