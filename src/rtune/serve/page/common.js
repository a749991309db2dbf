// What both pages share: API calls with the key, error texts, and building elements.
// Model output is only ever put into the page as text (textContent), never parsed as HTML.
"use strict";

const rtune = (() => {
  const KEY = "rtune-api-key";
  let key = sessionStorage.getItem(KEY) || "";
  let asking = null; // one key prompt at a time, however many requests were refused

  function askKey(message) {
    if (asking) return asking;
    const dialog = document.getElementById("key-dialog");
    const input = dialog.querySelector("input");
    dialog.querySelector(".key-message").textContent = message;
    input.value = "";
    asking = new Promise((resolve) => {
      dialog.querySelector("form").onsubmit = (event) => {
        event.preventDefault();
        key = input.value.trim();
        sessionStorage.setItem(KEY, key); // this tab only; never in a URL
        dialog.close();
        asking = null;
        resolve();
      };
    });
    dialog.showModal();
    input.focus();
    return asking;
  }

  // fetch() with the key as a Bearer header; a 401 asks for the key and tries again.
  async function api(path, { method = "GET", body, signal } = {}) {
    for (;;) {
      const headers = {};
      if (body !== undefined) headers["Content-Type"] = "application/json";
      if (key) headers["Authorization"] = "Bearer " + key;
      const response = await fetch(path, {
        method, headers, signal, cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status !== 401) return response;
      await askKey(key ? "That key was refused: try again." : "This server needs its API key.");
    }
  }

  async function errorText(response) {
    try {
      const data = await response.json();
      return (data.error && data.error.message) || `${response.status} ${response.statusText}`;
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function json(path, options) {
    const response = await api(path, options);
    if (!response.ok) throw new Error(await errorText(response));
    return response.json();
  }

  // el("div", {className: "x"}, "text", child): children are text or elements, never HTML.
  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    for (const child of children) node.append(child);
    return node;
  }

  // Show the link to the other page when this server has it.
  async function nav() {
    const info = await json("/api/page");
    for (const [name, on] of Object.entries(info)) {
      const link = document.querySelector(`nav a[data-page="${name}"]`);
      if (link) link.hidden = !on;
    }
    return info;
  }

  return { api, errorText, json, el, nav };
})();
