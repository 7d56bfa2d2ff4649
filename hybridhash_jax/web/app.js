"use strict";
// The search page. It talks to the JSON API (README, "Search in the browser") and keeps a search by id
// in the URL (?id=N&k=K or ?id=N&radius=R), so a link reproduces it.

const $ = (id) => document.getElementById(id);
let info = null;
let last = null;  // the last query: {id} or {file}, rerun when k or radius change
let pending = 0;  // only the newest search renders

function limits() {
  const radius = $("radius").value.trim();
  return radius === "" ? {k: Number($("k").value)} : {radius: Number(radius)};
}

function setLimits(params) {
  if (params.has("k")) $("k").value = params.get("k");
  $("radius").value = params.get("radius") ?? "";
  dimK();
}

function dimK() {  // a radius search ignores k
  $("k").disabled = $("radius").value.trim() !== "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({detail: response.statusText}));
  if (!response.ok) throw new Error(`${response.status}: ${body.detail}`);
  return body;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function showInfo() {
  const model = info.model || {};
  const fields = [["items", info.size.toLocaleString("en")], ["bits", info.bits],
                  ["model", ["img_size", "embed_dims", "depths"].filter((f) => f in model)
                              .map((f) => `${f} ${[].concat(model[f]).join("/")}`).join(", ") || "?"],
                  ["step", info.step ?? "?"]];
  $("info").replaceChildren(...fields.map(([name, value]) => {
    const pair = document.createElement("div"), dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value;
    pair.append(dt, dd);
    return pair;
  }));
  $("info").title = info.checkpoint || "";
}

const thumb = (id) => `api/items/${id}/image`;

function sharpIfTiny(img) {  // an 8 x 8 digit or a 32 x 32 CIFAR image, enlarged: keep its pixels crisp
  img.addEventListener("load", () => img.classList.toggle("tiny", img.naturalWidth < 64));
}

function link(id) {
  return "?" + new URLSearchParams({id, ...limits()});
}

function hitCard(hit) {
  const li = document.createElement("li");
  li.className = "hit";
  Object.assign(li.dataset, {id: hit.id, rank: hit.rank, distance: hit.distance});
  const a = document.createElement("a");
  a.href = link(hit.id);
  a.title = `search from item ${hit.id}`;
  a.addEventListener("click", (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;  // new tab: let it
    event.preventDefault();
    searchId(hit.id);
  });
  const img = document.createElement("img");
  img.src = thumb(hit.id);
  img.alt = hit.path;
  img.loading = "lazy";
  sharpIfTiny(img);
  const caption = document.createElement("span");
  caption.className = "caption";
  const head = document.createElement("b");
  head.textContent = `#${hit.rank} · d ${hit.distance}`;
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = hit.path;
  caption.append(head, path);
  if (hit.label !== null && hit.label !== undefined) {
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label;
    caption.append(label);
  }
  a.append(img, caption);
  li.append(a);
  return li;
}

function render(result, imageSrc) {
  $("query").hidden = false;
  $("query-image").src = imageSrc;
  $("query-name").textContent = result.query.id === null
    ? `upload: ${result.query.name}` : `item ${result.query.id}: ${result.query.name}`;
  $("query-code").textContent = result.query.code.match(/.{1,8}/g).join(" ");
  $("hits").replaceChildren(...result.hits.map(hitCard));
  const shown = result.hits.length < result.total ? `${result.hits.length} of ${result.total}` : `${result.total}`;
  say("radius" in result ? `${shown} hits within radius ${result.radius}` : `top ${shown} hits`);
}

async function run(query, request, imageSrc) {
  const mine = ++pending;
  last = query;
  say("searching…");
  try {
    const result = await api("api/search", {method: "POST", ...request});
    if (mine === pending) render(result, imageSrc);
  } catch (error) {
    if (mine === pending) say(error.message, true);
  }
}

function searchId(id, push = true) {
  if (push) history.pushState(null, "", link(id));
  return run({id}, {headers: {"Content-Type": "application/json"}, body: JSON.stringify({id, ...limits()})},
             thumb(id));
}

function searchFile(file) {
  if (info && file.size > info.max_upload_mb * 2 ** 20) {
    say(`${file.name} is over the upload limit of ${info.max_upload_mb} MB`, true);
    return;
  }
  history.pushState(null, "", location.pathname);  // an upload cannot be linked
  const form = new FormData();
  form.append("image", file);
  for (const [key, value] of Object.entries(limits())) form.append(key, value);
  if (last && last.url) URL.revokeObjectURL(last.url);
  const url = URL.createObjectURL(file);
  return run({file, url}, {body: form}, url);
}

function rerun() {
  if (last?.file) {
    searchFile(last.file);
  } else if (last) {
    history.replaceState(null, "", link(last.id));
    searchId(last.id, false);
  }
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  setLimits(params);
  if (params.has("id")) searchId(Number(params.get("id")), false);
}

function wire() {
  $("file").addEventListener("change", () => $("file").files[0] && searchFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) searchFile(event.dataTransfer.files[0]);
  });
  $("random").addEventListener("click", () => searchId(Math.floor(Math.random() * info.size)));
  $("k").addEventListener("change", rerun);
  $("radius").addEventListener("change", () => { dimK(); rerun(); });
  window.addEventListener("popstate", fromUrl);
}

async function main() {
  wire();
  sharpIfTiny($("query-image"));
  try {
    info = await api("api/info");
  } catch (error) {
    say(`cannot reach the server: ${error.message}`, true);
    return;
  }
  $("k").max = info.max_k;
  $("radius").max = info.bits;
  showInfo();
  fromUrl();
}

main();
