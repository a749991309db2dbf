// The chat page: one prompt to 2-4 models at once, each reply streamed into its own pane.
// Each pane keeps its own conversation (the user turns are shared, the replies are each model's).
"use strict";

const MAX_PANES = 4;
const panes = [];
let models = []; // cards of /v1/models
let running = 0; // replies still streaming

const $ = (id) => document.getElementById(id);

function addPane(modelId) {
  if (panes.length >= MAX_PANES) return;
  const node = $("pane-template").content.firstElementChild.cloneNode(true);
  const pane = { node, select: node.querySelector(".model"), log: node.querySelector(".log"),
                 messages: [], controller: null };
  for (const card of models) pane.select.append(rtune.el("option", { value: card.id, textContent: card.id }));
  pane.select.value = modelId;
  pane.select.onchange = () => {
    showTemplate(pane);
    if (pane.messages.length) note(pane, `now answering: ${pane.select.value}`);
  };
  node.querySelector(".remove").onclick = () => removePane(pane);
  showTemplate(pane);
  panes.push(pane);
  $("panes").append(node);
  layout();
}

function removePane(pane) {
  if (panes.length <= 1) return;
  if (pane.controller) pane.controller.abort();
  panes.splice(panes.indexOf(pane), 1);
  pane.node.remove();
  layout();
}

function layout() {
  $("panes").style.setProperty("--panes", panes.length);
  $("add-pane").disabled = panes.length >= MAX_PANES;
  for (const p of panes) p.node.querySelector(".remove").disabled = panes.length <= 1;
}

function showTemplate(pane) {
  const card = models.find((m) => m.id === pane.select.value) || {};
  pane.node.querySelector(".template").textContent =
    card.rtune_endpoint ? "endpoint" : card.rtune_template ? `template: ${card.rtune_template}` : "";
}

function note(pane, text) {
  pane.log.append(rtune.el("div", { className: "note", textContent: text }));
}

function bubble(pane, role, text, who) {
  const body = rtune.el("div", { className: "text", textContent: text });
  const node = rtune.el("div", { className: `msg ${role}` }, rtune.el("div", { className: "who", textContent: who }), body);
  pane.log.append(node);
  return { node, body };
}

function scrollDown(pane) {
  pane.log.scrollTop = pane.log.scrollHeight;
}

function settings() {
  const temperature = Number($("temperature").value);
  const maxTokens = Math.round(Number($("max-tokens").value));
  return {
    temperature: Number.isFinite(temperature) ? Math.min(Math.max(temperature, 0), 2) : 0,
    max_tokens: Number.isFinite(maxTokens) && maxTokens >= 1 ? maxTokens : 256,
  };
}

// Reads server-sent events ("data: {...}" blocks ending in a blank line) and calls onData with each.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data && data !== "[DONE]") onData(JSON.parse(data));
      }
    }
  }
}

async function ask(pane) {
  const model = pane.select.value;
  const reply = bubble(pane, "assistant streaming", "", model);
  const status = rtune.el("div", { className: "status", textContent: "…" });
  reply.node.append(status);
  const controller = new AbortController();
  pane.controller = controller;
  const started = performance.now();
  let text = "";
  let finish = null;
  let tokens = null;
  try {
    const response = await rtune.api("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      body: { model, messages: pane.messages, stream: true, stream_options: { include_usage: true }, ...settings() },
    });
    if (!response.ok) throw new Error(await rtune.errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        reply.body.textContent = text; // as text: a reply holding <script> is shown, never run
        scrollDown(pane);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent = [tokens !== null ? `${tokens} tokens` : null, `${seconds} s`,
                          finish === "length" ? "cut at max tokens" : null].filter(Boolean).join(" · ");
  } catch (error) {
    const stopped = error.name === "AbortError";
    status.textContent = stopped ? "stopped" : `error: ${error.message}`;
    if (!stopped) reply.node.classList.add("error");
  } finally {
    reply.node.classList.remove("streaming");
    pane.messages.push({ role: "assistant", content: text }); // turns keep alternating, a stopped reply too
    pane.controller = null;
    scrollDown(pane);
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  const asked = panes.slice();
  running = asked.length;
  busy(true);
  await Promise.all(asked.map((pane) => {
    pane.messages.push({ role: "user", content: text });
    bubble(pane, "user", text, "you");
    scrollDown(pane);
    return ask(pane).finally(() => { running -= 1; });
  }));
  busy(false);
  $("prompt").focus();
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.classList.toggle("busy", on);
}

function stop() {
  for (const pane of panes) if (pane.controller) pane.controller.abort();
}

function reset() {
  stop();
  for (const pane of panes) {
    pane.messages = [];
    pane.log.replaceChildren();
  }
  $("prompt").focus();
}

async function start() {
  $("composer").onsubmit = send;
  $("stop").onclick = stop;
  $("reset").onclick = reset;
  $("add-pane").onclick = () => {
    const used = new Set(panes.map((p) => p.select.value));
    const next = models.find((m) => !used.has(m.id)) || models[0];
    addPane(next.id);
  };
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) $("composer").requestSubmit();
  });
  try {
    await rtune.nav();
    models = (await rtune.json("/v1/models")).data;
  } catch (error) {
    $("panes").append(rtune.el("p", { className: "note", textContent: `Cannot list the models: ${error.message}` }));
    return;
  }
  for (const card of models.slice(0, 2)) addPane(card.id); // two to start with; "+ Model" adds more
  $("prompt").focus();
  document.body.dataset.ready = "1"; // for tests and screenshots: the panes are there
}

start();
