// fmforge playground: streaming chat, sampling controls, thumbs, edits, compare-two-answers.
// No framework and no build step. All text (model output, stored or typed) is inserted with
// textContent (never as HTML), so nothing a model or user writes can run as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], busy: false };

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model-name").textContent = "model list: " + (await apiError(response));
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model;
}

function requestBody(n) {
  const body = {
    model: state.model,
    messages: [],
    stream: true,
    n: n,
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10),
    store: $("store").checked,
  };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.history);
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// POST a chat completion with stream=true; call onDelta(index, text) per chunk; return the id.
async function streamChat(body, onDelta) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await apiError(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return id;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      id = chunk.id;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) onDelta(choice.index, choice.delta.content);
      }
    }
  }
  return id;
}

async function sendFeedback(generationId, kind, value, choiceIndex) {
  const body = {
    generation_id: generationId,
    kind: kind,
    value: value,
    choice_index: choiceIndex || 0,
    idempotency_key: newKey(),
  };
  // One retry with the same idempotency key: the server stores it at most once.
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const response = await fetch("/v1/feedback", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await apiError(response));
      setStatus("feedback saved (" + kind + ")");
      return true;
    } catch (e) {
      if (attempt === 1) setStatus("feedback failed: " + e.message, true);
    }
  }
  return false;
}

function addActions(bubble, generationId, choiceIndex, historyIndex) {
  const actions = el("div", "actions");
  const up = el("button", "thumb-up", "Good");
  up.title = "Good answer";
  const down = el("button", "thumb-down", "Bad");
  down.title = "Bad answer";
  const edit = el("button", "edit", "Edit");
  up.onclick = async () => {
    if (await sendFeedback(generationId, "thumbs", "up", choiceIndex)) up.classList.add("chosen");
  };
  down.onclick = async () => {
    if (await sendFeedback(generationId, "thumbs", "down", choiceIndex)) down.classList.add("chosen");
  };
  edit.onclick = () => {
    const text = bubble.querySelector(".text");
    const area = el("textarea");
    area.rows = 4;
    area.value = text.textContent;
    const save = el("button", "save-edit", "Save edit");
    save.onclick = async () => {
      if (!area.value.trim()) return;
      if (await sendFeedback(generationId, "edit", area.value, choiceIndex)) {
        text.textContent = area.value;
        if (historyIndex !== null) state.history[historyIndex].content = area.value;
        area.remove();
        save.remove();
      }
    };
    bubble.append(area, save);
  };
  actions.append(up, down, edit);
  bubble.append(actions);
}

function assistantBubble(parent) {
  const bubble = el("div", "msg assistant");
  bubble.append(el("div", "text", ""));
  parent.append(bubble);
  return bubble;
}

async function run(n) {
  const text = $("input").value;
  if (state.busy || !text.trim() || !state.model) return;
  state.busy = true;
  $("input").value = "";
  state.history.push({ role: "user", content: text });
  $("messages").append(el("div", "msg user", text));
  const row = n === 1 ? $("messages") : el("div", "pair");
  if (n > 1) $("messages").append(row);
  const bubbles = [];
  for (let i = 0; i < n; i++) bubbles.push(assistantBubble(row));
  const texts = new Array(n).fill("");
  setStatus("generating…");
  try {
    const id = await streamChat(requestBody(n), (index, delta) => {
      texts[index] += delta;
      bubbles[index].querySelector(".text").textContent = texts[index];
    });
    setStatus("");
    if (n === 1) {
      state.history.push({ role: "assistant", content: texts[0] });
      addActions(bubbles[0], id, 0, state.history.length - 1);
    } else {
      choosePair(bubbles, texts, id);
    }
  } catch (e) {
    setStatus("error: " + e.message, true);
    state.history.pop();
  } finally {
    state.busy = false;
  }
}

function choosePair(bubbles, texts, id) {
  bubbles.forEach((bubble, index) => {
    const pick = el("button", "prefer", "Prefer this answer");
    pick.onclick = async () => {
      const value = { chosen: index, rejected: 1 - index };
      if (await sendFeedback(id, "pairwise", value, index)) {
        bubbles.forEach((b) => b.querySelectorAll(".prefer").forEach((p) => p.remove()));
        pick.classList.add("chosen");
        bubbles[1 - index].style.opacity = 0.5;
        state.history.push({ role: "assistant", content: texts[index] });
        addActions(bubble, id, index, state.history.length - 1);
      }
    };
    bubble.append(pick);
  });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  run(1);
});
$("compare").addEventListener("click", () => run(2));
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    run(1);
  }
});
$("reset").addEventListener("click", () => {
  state.history = [];
  $("messages").textContent = "";
  setStatus("");
});
$("api_key").addEventListener("change", loadModel);
loadModel();
