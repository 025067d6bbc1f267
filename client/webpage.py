"""The search page that ``xmodal web`` serves: plain HTML, CSS and a little vanilla JS, no build step.

Kept as Python strings so they ship with the package like any module. The script builds every
result element with ``textContent``, never ``innerHTML``, so captions render as text whatever
they contain; the page's Content-Security-Policy (see web.py) allows no inline script either.
"""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xmodal search</title>
<link rel="stylesheet" href="/app.css">
</head>
<body>
<header>
  <h1>xmodal</h1>
  <p class="tagline">cross-modal search: find images for a text, or images like an image</p>
</header>
<section class="queries">
  <form id="text-form" role="search" autocomplete="off">
    <input id="q" name="q" type="search" placeholder="Describe an image, e.g. red heart" aria-label="query" required>
    <button id="search" type="submit">Search</button>
  </form>
  <form id="image-form" enctype="multipart/form-data">
    <label for="image">or by image</label>
    <input id="image" name="image" type="file" accept="image/*">
    <button id="search-image" type="submit">Search by image</button>
  </form>
  <div class="options">
    <label>style <select id="style" name="style"><option value="">all styles</option></select></label>
    <label>filter <input id="filter" name="filter" size="32" placeholder='e.g. folder == "2024/holidays" and width >= 1024'></label>
    <label>results <input id="k" name="k" type="number" min="1" max="100" value="12"></label>
  </div>
</section>
<p id="status" role="status"></p>
<p id="error" role="alert" hidden></p>
<main id="results" class="grid" data-state="idle" aria-live="polite"></main>
<script src="/app.js"></script>
</body>
</html>
"""

APP_CSS = """
:root { color-scheme: light; font-family: system-ui, sans-serif; }
body { margin: 0 auto; max-width: 1100px; padding: 1rem 1.5rem 3rem; color: #1d1d1f; background: #fafafa; }
header h1 { margin: 0; font-size: 1.6rem; }
.tagline { margin: .2rem 0 1rem; color: #555; }
.queries { display: grid; gap: .6rem; padding: .8rem; background: #fff; border: 1px solid #ddd; border-radius: 8px; }
form { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
#q { flex: 1; min-width: 16rem; font-size: 1.05rem; padding: .45rem .6rem; }
button { font-size: 1rem; padding: .4rem .9rem; cursor: pointer; }
.options { display: flex; gap: 1.2rem; flex-wrap: wrap; color: #333; font-size: .95rem; }
#k { width: 4.5rem; }
#status { color: #555; min-height: 1.2em; }
#error { color: #a00; background: #fff0f0; border: 1px solid #e0b0b0; padding: .5rem .7rem; border-radius: 6px; white-space: pre-wrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .8rem; align-items: start; }
.hit { margin: 0; padding: .5rem; background: #fff; border: 1px solid #ddd; border-radius: 8px; display: flex; flex-direction: column; gap: .35rem; }
.hit img { width: 100%; aspect-ratio: 1 / 1; object-fit: contain; background: #f3f3f3; border-radius: 4px; }
.hit figcaption { display: grid; gap: .15rem; font-size: .85rem; }
.hit .caption { font-weight: 600; overflow-wrap: anywhere; }
.hit .score { font-variant-numeric: tabular-nums; color: #0a5; }
.hit .meta { color: #777; font-size: .75rem; overflow-wrap: anywhere; }
"""

APP_JS = """"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const results = $("results");

  function options() {
    const params = new URLSearchParams();
    params.set("k", $("k").value || "12");
    if ($("style").value) params.set("style", $("style").value);
    const filter = $("filter").value.trim();
    if (filter) params.set("filter", filter);
    return params;
  }

  function setState(state, message) {
    results.dataset.state = state;
    $("status").textContent = message || "";
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;  // text, never markup
    return node;
  }

  function render(data) {
    const cells = data.hits.map((hit) => {
      const figure = element("figure", "hit");
      const image = element("img");
      image.src = hit.image_url;
      image.alt = hit.title;
      image.loading = "lazy";
      const caption = element("figcaption");
      caption.append(
        element("span", "caption", hit.title),
        element("span", "score", "score " + hit.score.toFixed(3)),
        element("span", "meta", [hit.style, hit.concept].filter(Boolean).join(" · ")),
        element("span", "meta", [hit.folder, hit.width ? hit.width + "×" + hit.height : ""].filter(Boolean).join(" · ")));
      figure.append(image, caption);
      return figure;
    });
    results.replaceChildren(...cells);
    const what = data.query !== undefined ? "“" + data.query + "”" : "the image";
    setState("done", data.hits.length + " results for " + what + (data.filter ? " where " + data.filter : ""));
  }

  async function run(request) {
    $("error").hidden = true;
    setState("loading", "Searching…");
    try {
      const response = await request();
      const data = await response.json();
      if (!response.ok) {
        results.replaceChildren();
        setState("error", "");
        showError(data.error || response.statusText);
        return;
      }
      render(data);
    } catch (err) {
      setState("error", "");
      showError(String(err));
    }
  }

  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = options();
    params.set("q", $("q").value);
    run(() => fetch("/api/search?" + params.toString()));
  });

  $("image-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("image").files[0];
    if (!file) {
      showError("Choose an image first.");
      return;
    }
    const body = new FormData();
    body.append("image", file);
    for (const [key, value] of options()) body.append(key, value);
    run(() => fetch("/api/search_image", { method: "POST", body }));
  });

  fetch("/api/styles")
    .then((response) => response.json())
    .then((data) => {
      for (const style of data.styles || []) {
        const option = element("option", "", style);
        option.value = style;
        $("style").append(option);
      }
    })
    .catch(() => {});
})();
"""
