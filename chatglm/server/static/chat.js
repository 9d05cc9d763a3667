// The chat page: streams replies from the server's own OpenAI route and renders them with its /web/markdown route.
"use strict";

const KEY_STORE = "chatglm.apiKey";
const RENDER_EVERY_MS = 150;  // Markdown requests while a reply streams: at most one per this interval

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), errorLine = $("error");

let conversation = [];  // [{role, content}]: the whole conversation goes with every request
let controller = null;  // aborts the reply being streamed
let epoch = 0;          // bumped by Clear, so a reply that ends afterwards leaves the new conversation alone

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// POST JSON; a refusal becomes an Error carrying the server's one-line message.
async function post(path, body, signal) {
  const response = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (response.ok) return response;
  if (response.status === 401) askForKey();
  throw new Error(await errorMessage(response));
}

// The data of each server-sent event, read with fetch's ReadableStream (EventSource cannot POST).
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream("utf-8")).getReader();
  let buffer = "", data = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const end = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;  // "\r\n" may be split
    const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(end);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line[5] === " " ? 6 : 5));
      }
    }
  }
}

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

function scrollToEnd() {
  log.scrollTop = log.scrollHeight;
}

function addMessage(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  log.appendChild(div);
  return div;
}

// An assistant reply: the model's reasoning when it sends some (reasoning_content, as GLM-Z1 and GLM-4.5 do),
// folded away once the answer starts; then the Markdown rendered so far and the raw text that arrived since.
function newReply() {
  const el = addMessage("assistant");
  el.setAttribute("aria-busy", "true");
  const thinking = el.appendChild(document.createElement("details"));
  thinking.className = "reasoning";
  thinking.hidden = true;
  thinking.open = true;
  thinking.appendChild(document.createElement("summary")).textContent = "Thinking";
  const thought = thinking.appendChild(document.createElement("div"));
  const md = el.appendChild(document.createElement("div"));
  md.className = "md";
  const tail = el.appendChild(document.createElement("div"));
  tail.className = "tail";
  return {el, thinking, thought, md, tail, text: "", reasoning: "", rendered: 0, timer: null, busy: false, dirty: false,
          done: false};
}

function showReasoning(turn, piece) {
  turn.reasoning += piece;
  turn.thinking.hidden = false;
  turn.thought.textContent = turn.reasoning;
  scrollToEnd();
}

// The answer has begun: the reasoning folds to one line, still there to open.
function foldReasoning(turn) {
  if (!turn.reasoning || turn.thinking.dataset.folded) return;
  turn.thinking.dataset.folded = "1";
  turn.thinking.open = false;
  turn.thinking.querySelector("summary").textContent = "Reasoning";
}

function showText(turn) {
  turn.tail.textContent = turn.text.slice(turn.rendered);
  scrollToEnd();
}

function finishIfRendered(turn) {
  if (turn.done && !turn.timer && !turn.busy && !turn.dirty) turn.el.removeAttribute("aria-busy");
}

function scheduleRender(turn) {
  if (turn.timer || turn.busy) {
    turn.dirty = true;
    return;
  }
  turn.timer = setTimeout(() => {
    turn.timer = null;
    renderNow(turn);
  }, RENDER_EVERY_MS);
}

async function renderNow(turn) {
  const text = turn.text;
  turn.busy = true;
  turn.dirty = false;
  try {
    const {html} = await (await post("/web/markdown", {text})).json();
    turn.md.innerHTML = html.trimEnd();  // the server escapes raw HTML; a trailing newline would show as a space
    for (const a of turn.md.querySelectorAll("a")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
    turn.rendered = text.length;
    showText(turn);
  } catch (e) {
    // the raw text stays on show
  } finally {
    turn.busy = false;
    if (turn.dirty) scheduleRender(turn);
    finishIfRendered(turn);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function number(id) {
  const value = $(id).valueAsNumber;
  return Number.isFinite(value) ? value : undefined;  // an empty field leaves the server's default
}

async function send() {
  const text = input.value;
  if (!text.trim() || controller) return;
  errorLine.hidden = true;
  input.value = "";
  fitInput();
  const mine = epoch;
  conversation.push({role: "user", content: text});
  const question = addMessage("user");
  question.textContent = text;
  const turn = newReply();
  controller = new AbortController();
  setBusy(true);
  let failure = null;
  try {
    const body = {messages: conversation, stream: true, temperature: number("temperature"), top_p: number("top_p"),
                  max_tokens: number("max_tokens")};
    const response = await post("/v1/chat/completions", body, controller.signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      if (delta.reasoning_content) showReasoning(turn, delta.reasoning_content);
      if (delta.content) {
        foldReasoning(turn);
        turn.text += delta.content;
        showText(turn);
        scheduleRender(turn);
      }
    }
  } catch (e) {
    if (e.name === "TypeError") failure = "the server cannot be reached (" + e.message + ")";
    else if (e.name !== "AbortError") failure = e.message || String(e);
  } finally {
    controller = null;
    setBusy(false);
  }
  if (mine !== epoch) return;
  turn.done = true;
  foldReasoning(turn);
  if (turn.text || turn.reasoning) {  // the reasoning stays on the page; the next request carries the answer only
    conversation.push({role: "assistant", content: turn.text});
    finishIfRendered(turn);
  } else {  // nothing came back: take the question back into the box to retry
    conversation.pop();
    question.remove();
    turn.el.remove();
    if (!input.value) input.value = text;
    fitInput();
  }
  if (failure) showError(failure);
  input.focus();
}

function clear() {
  epoch += 1;
  if (controller) controller.abort();
  conversation = [];
  log.replaceChildren();
  errorLine.hidden = true;
  input.focus();
}

function fitInput() {
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 240) + "px";
}

input.addEventListener("keydown", (e) => {
  // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition (CJK input) is not a send.
  if (e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
  e.preventDefault();
  send();
});
input.addEventListener("input", fitInput);
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", clear);
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key-form").hidden = true;
  errorLine.hidden = true;
  input.focus();
});

fetch("/health").then((r) => r.json()).then((body) => {
  $("model").textContent = body.model;
  document.title = body.model + " - chatglm";
}).catch(() => showError("the server does not answer /health"));
