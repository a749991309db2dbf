// The rating page: one item at a time, two answers as A and B (the server chose the sides and
// hides the names), a verdict and an acceptability mark per answer, saved as given.
"use strict";

const $ = (id) => document.getElementById(id);
const RATER = /^[A-Za-z0-9_-]{1,64}$/;
let setup = null; // /api/rate/setup
let session = null; // {rater, models, bench, items, index}
let current = null; // {acceptable: [A, B]} of the item shown
let saving = false;

function fill(select, values, chosen) {
  select.replaceChildren(...values.map(([value, label]) => rtune.el("option", { value, textContent: label })));
  if (chosen !== undefined) select.value = chosen;
}

function fillBenches() {
  const x = setup.benches[$("model-x").value] || [];
  const y = new Set(setup.benches[$("model-y").value] || []);
  fill($("bench"), [["", "all benchmarks"], ...x.filter((b) => y.has(b)).map((b) => [b, b])], "");
}

function showOnly(id) {
  for (const section of ["setup", "item", "done"]) $(section).hidden = section !== id;
  $("progress").hidden = id === "setup";
}

function progress() {
  const rated = session.items.filter((i) => i.rated).length;
  const total = session.items.length;
  $("progress-text").textContent = `${rated} / ${total} rated`;
  $("progress-who").textContent = session.rater;
  $("progress-fill").style.width = total ? `${(100 * rated) / total}%` : "0";
}

async function begin(event) {
  event.preventDefault();
  $("setup-error").textContent = "";
  const rater = $("rater").value.trim();
  const models = [$("model-x").value, $("model-y").value];
  if (!RATER.test(rater)) return void ($("setup-error").textContent = "A name is 1 to 64 letters, digits, _ or -.");
  if (models[0] === models[1]) return void ($("setup-error").textContent = "Choose two different models.");
  localStorage.setItem("rtune-rater", rater);
  const bench = $("bench").value || null;
  try {
    const listed = await rtune.json("/api/rate/items", { method: "POST", body: { rater, models, bench } });
    session = { rater, models, bench, items: listed.items, index: 0 };
  } catch (error) {
    return void ($("setup-error").textContent = error.message);
  }
  if (!session.items.length) return void ($("setup-error").textContent = "These two models share no item.");
  progress();
  const next = session.items.findIndex((i) => !i.rated); // resume where this rater stopped
  if (next < 0) return finished();
  await show(next);
}

function finished() {
  showOnly("done");
  $("done-text").textContent = `You rated all ${session.items.length} items of this pair. ` +
    "A new verdict on an item replaces your earlier one.";
}

async function show(index) {
  session.index = index;
  const { bench, id, rated } = session.items[index];
  const data = await rtune.json("/api/rate/item", {
    method: "POST", body: { rater: session.rater, models: session.models, bench, id },
  });
  showOnly("item");
  $("where").textContent = `Item ${index + 1} of ${session.items.length} · ${bench} · ${id}`;
  $("state").textContent = rated ? "rated" : "";
  $("prompt").textContent = data.prompt; // texts only: never parsed as HTML
  document.querySelectorAll(".answer").forEach((node, side) => {
    node.querySelector(".text").textContent = data.answers[side];
    node.scrollTop = 0;
  });
  const previous = data.previous;
  current = { acceptable: previous ? previous.acceptable.slice() : [null, null] };
  markAcceptable();
  document.querySelectorAll(".verdict button").forEach((b) => {
    b.classList.toggle("chosen", Boolean(previous) && b.dataset.choice === previous.choice);
  });
  $("hint").textContent = "";
  $("prev").disabled = index === 0;
  $("next").disabled = index === session.items.length - 1;
  window.scrollTo(0, 0);
}

function markAcceptable() {
  document.querySelectorAll(".answer").forEach((node, side) => {
    node.querySelectorAll(".accept button").forEach((b) => {
      b.classList.toggle("chosen", current.acceptable[side] === (b.dataset.ok === "1"));
    });
    node.classList.toggle("ok", current.acceptable[side] === true);
    node.classList.toggle("not-ok", current.acceptable[side] === false);
  });
}

function setAcceptable(side, ok) {
  if (!current) return;
  current.acceptable[side] = ok;
  markAcceptable();
  $("hint").textContent = "";
}

async function verdict(choice) {
  if (!current || saving) return;
  if (current.acceptable.includes(null)) {
    $("hint").textContent = "First mark each answer acceptable or not (keys 1-4).";
    return;
  }
  const item = session.items[session.index];
  saving = true;
  try {
    await rtune.json("/api/rate/rating", {
      method: "POST",
      body: { rater: session.rater, models: session.models, bench: item.bench, id: item.id, choice,
              acceptable: current.acceptable },
    });
  } catch (error) {
    $("hint").textContent = `Not saved: ${error.message}`;
    return;
  } finally {
    saving = false;
  }
  item.rated = true;
  progress();
  // The next item not rated yet, after this one (then from the start).
  const order = [...session.items.keys()].map((k) => (session.index + 1 + k) % session.items.length);
  const next = order.find((k) => !session.items[k].rated);
  if (next === undefined) return finished();
  await show(next);
}

function onKey(event) {
  if ($("item").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.matches("input, select, textarea")) return;
  const actions = {
    1: () => setAcceptable(0, true), 2: () => setAcceptable(0, false),
    3: () => setAcceptable(1, true), 4: () => setAcceptable(1, false),
    a: () => verdict("a"), b: () => verdict("b"), t: () => verdict("tie"),
    ArrowLeft: () => session.index > 0 && show(session.index - 1),
    ArrowRight: () => session.index < session.items.length - 1 && show(session.index + 1),
  };
  const action = actions[event.key.length === 1 ? event.key.toLowerCase() : event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

async function start() {
  $("setup").onsubmit = begin;
  $("model-x").onchange = fillBenches;
  $("model-y").onchange = fillBenches;
  $("prev").onclick = () => show(session.index - 1);
  $("next").onclick = () => show(session.index + 1);
  $("change").onclick = () => showOnly("setup");
  $("review").onclick = () => show(0);
  document.querySelectorAll(".answer").forEach((node, side) => {
    node.querySelectorAll(".accept button").forEach((b) => { b.onclick = () => setAcceptable(side, b.dataset.ok === "1"); });
  });
  document.querySelectorAll(".verdict button").forEach((b) => { b.onclick = () => verdict(b.dataset.choice); });
  document.addEventListener("keydown", onKey);
  try {
    await rtune.nav();
    setup = await rtune.json("/api/rate/setup");
  } catch (error) {
    $("setup-error").textContent = error.message;
    return;
  }
  const options = setup.models.map((m) => [m, m]);
  fill($("model-x"), options, setup.default_pair[0]);
  fill($("model-y"), options, setup.default_pair[1]);
  fillBenches();
  $("rater").value = localStorage.getItem("rtune-rater") || "";
  $("rater").focus();
  document.body.dataset.ready = "1";
}

start();
