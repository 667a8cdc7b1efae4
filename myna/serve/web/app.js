"use strict";
// Myna's web page. The chat tab talks to this server's own /v1/chat/completions (OpenAI's API), streamed as
// Server-Sent Events read from fetch(). Conversations and settings live in this browser's localStorage only.
// The Search tab is search.js, loaded after this file.

const STORE = "myna.chat.v1"; // {conversations: [...], current: id}
const MAX_TOOL_CALLS = 2; // searches in one reply, as in `myna chat`; after them the model answers with what it has
const SEARCH_POSTS = 3; // posts a search hands the model
// With a search index the chat offers the model its search tool (OpenAI's tools): the model decides to call it,
// the page runs the search on /v1/search and sends the posts back as the tool's message.
const SEARCH_TOOL = {
  type: "function",
  function: {
    name: "search",
    description: "search the posts",
    parameters: { type: "object", properties: { query: { type: "string" } }, required: ["query"] },
  },
};
const SETTINGS = "myna.settings.v1";
const DEFAULTS = { temperature: 0.8, top_p: 0.95, top_k: 50, repetition_penalty: 1.1, max_tokens: "", seed: "", api_key: "" };
const NUMBERS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"];

const $ = (id) => document.getElementById(id);
const state = { conversations: [], current: null, settings: { ...DEFAULTS }, model: null, health: null, streaming: null };

// ---- tabs: a button [data-tab=NAME] shows the section #tab-NAME -------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const selected = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(selected));
    $("tab-" + tab.dataset.tab).hidden = !selected;
  }
}

// ---- storage ----------------------------------------------------------------------------------------------------

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    state.conversations = Array.isArray(saved.conversations) ? saved.conversations : [];
    state.current = saved.current;
    state.settings = { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS) || "{}") };
  } catch (e) {
    showError("saved conversations could not be read and were reset: " + e.message);
    state.conversations = [];
  }
  if (!current()) newConversation();
}

function saveState() {
  localStorage.setItem(STORE, JSON.stringify({ conversations: state.conversations, current: state.current }));
  localStorage.setItem(SETTINGS, JSON.stringify(state.settings));
}

function current() {
  return state.conversations.find((c) => c.id === state.current);
}

function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  state.conversations.unshift({ id, title: "New chat", system: "", messages: [] });
  state.current = id;
  saveState();
}

// ---- rendering --------------------------------------------------------------------------------------------------

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const item = document.createElement("li");
    item.dataset.id = conv.id;
    item.classList.toggle("current", conv.id === state.current);
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = conv.title;
    title.title = conv.title;
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", (event) => {
      event.stopPropagation();
      deleteConversation(conv.id);
    });
    item.append(title, del);
    item.addEventListener("click", () => switchTo(conv.id));
    list.append(item);
  }
}

function messageElement(msg) {
  const el = document.createElement("div");
  el.className = "msg " + msg.role + (msg.error ? " failed" : "");
  el.dataset.state = msg.streaming ? "streaming" : "done";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = msg.content || "";
  const notes = document.createElement("ul");
  notes.className = "notes";
  for (const note of msg.notes || []) {
    const li = document.createElement("li");
    li.textContent = note;
    notes.append(li);
  }
  el.append(content, notes);
  return el;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren(...conv.messages.map(messageElement));
  if (!conv.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = state.model ? `Say something to ${state.model}.` : "Say something.";
    box.append(empty);
  }
  box.scrollTop = box.scrollHeight;
  $("system").value = conv.system || "";
}

// The reply being streamed is the last message of its conversation: redraw just that one.
function renderReply(conv, reply) {
  if (conv.id !== state.current) return;
  const box = $("messages");
  box.lastElementChild.replaceWith(messageElement(reply));
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderConversations();
  renderMessages();
}

function switchTo(id) {
  state.current = id;
  saveState();
  render();
}

function deleteConversation(id) {
  if (state.streaming && state.streaming.conv.id === id) state.streaming.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations[0]?.id;
  if (!current()) newConversation();
  saveState();
  render();
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function setStreaming(value) {
  state.streaming = value;
  $("send").disabled = Boolean(value);
  $("stop").hidden = !value;
}

// ---- settings ---------------------------------------------------------------------------------------------------

function bindSettings() {
  for (const name of Object.keys(DEFAULTS)) {
    const input = $(name);
    input.value = state.settings[name];
    input.addEventListener("input", () => {
      state.settings[name] = input.value.trim();
      saveState();
    });
  }
  $("system").addEventListener("input", () => {
    current().system = $("system").value;
    saveState();
  });
}

function samplingFields() {
  const out = {};
  for (const name of NUMBERS) {
    const raw = String(state.settings[name]).trim();
    if (raw !== "") out[name] = Number(raw);
  }
  return out;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.api_key) h.Authorization = "Bearer " + state.settings.api_key;
  return h;
}

// ---- talking to the server --------------------------------------------------------------------------------------

async function errorText(response) {
  const text = await response.text();
  try {
    return `${response.status}: ${JSON.parse(text).error.message}`;
  } catch {
    return `${response.status}: ${text || response.statusText}`;
  }
}

// Each SSE event's data, from a fetch() body (EventSource cannot POST).
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

function contextNotes(context) {
  const notes = [];
  if (context.dropped_turns) notes.push(`context full: the oldest ${context.dropped_turns} message(s) were left out`);
  if (context.truncated) notes.push("context full: the start of the last message was cut");
  if (context.max_tokens_requested && context.max_tokens < context.max_tokens_requested) {
    notes.push(`max tokens clipped to ${context.max_tokens} (the room left in the context)`);
  }
  return notes;
}

function moderationNotes(report) {
  if (!report || report.action === "allow") return [];
  const names = (verdict) => (verdict ? verdict.categories.map((c) => `${c.category}: ${c.action}`).join(", ") : "");
  const parts = [names(report.input) && `your message (${names(report.input)})`, names(report.output) && `the reply (${names(report.output)})`];
  return [`moderation ${report.blocked ? "blocked" : "labelled"}: ` + parts.filter(Boolean).join("; ")];
}

// A message as the API takes it back: an assistant's tool calls and the id a tool's answer names ride along.
function apiMessage(m) {
  const out = { role: m.role, content: m.content || (m.tool_calls ? null : "") };
  if (m.tool_calls) out.tool_calls = m.tool_calls;
  if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
  return out;
}

async function send(text) {
  hideError();
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 48);
  const controller = new AbortController();
  setStreaming({ conv, controller });
  try {
    for (let calls = 0; ; calls++) {
      const reply = await streamReply(conv, controller, state.health?.search && calls < MAX_TOOL_CALLS);
      if (!reply?.tool_calls) break;
      await runTool(conv, reply.tool_calls[0], controller);
    }
  } finally {
    setStreaming(null);
    saveState();
    render();
  }
}

// One generation of the assistant's turn, streamed into a new message; it may end in a tool call.
async function streamReply(conv, controller, tools) {
  const history = conv.messages.filter((m) => !m.error).map(apiMessage);
  const messages = [...(conv.system ? [{ role: "system", content: conv.system }] : []), ...history];
  const reply = { role: "assistant", content: "", notes: [], streaming: true };
  conv.messages.push(reply);
  saveState();
  render();
  try {
    const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true }, ...samplingFields() };
    if (tools) body.tools = [SEARCH_TOOL];
    const response = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.myna?.context) reply.notes.push(...contextNotes(chunk.myna.context));
      if (chunk.myna?.moderation) reply.notes.push(...moderationNotes(chunk.myna.moderation));
      if (chunk.myna?.tool_call_error) reply.notes.push("the model's search call was not valid: " + chunk.myna.tool_call_error);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) reply.content += choice.delta.content;
      if (choice?.delta?.tool_calls) reply.tool_calls = choice.delta.tool_calls.map(({ index, ...call }) => call);
      if (choice?.finish_reason === "length") reply.notes.push("stopped at the max-tokens limit");
      if (chunk.usage) reply.usage = chunk.usage;
      renderReply(conv, reply);
    }
    return reply;
  } catch (e) {
    if (e.name === "AbortError") {
      reply.notes.push("stopped");
    } else {
      reply.error = true;
      reply.notes.push(e.message);
      showError(e.message);
    }
    return null;
  } finally {
    reply.streaming = false;
    renderReply(conv, reply);
  }
}

// The model's search call run on this server's index; the posts join the conversation as the tool's answer.
async function runTool(conv, call, controller) {
  const call_msg = conv.messages[conv.messages.length - 1];
  let query = "";
  try {
    query = JSON.parse(call.function.arguments).query;
  } catch {
    // the server checked the call's JSON; an unreadable one ends the reply before this
  }
  call_msg.notes.push(`searched: "${query}"`);
  const tool = { role: "tool", tool_call_id: call.id, content: "", notes: [] };
  conv.messages.push(tool);
  try {
    const response = await fetch("v1/search", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ query, limit: SEARCH_POSTS }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const results = await response.json();
    tool.content = results.tool_text || "no posts found";
    tool.notes.push(`${results.data.length} post(s) found`);
  } catch (e) {
    tool.content = "error: " + e.message;
    tool.notes.push(tool.content);
  }
  saveState();
  render();
}

async function checkHealth() {
  try {
    const response = await fetch("health");
    const health = await response.json();
    state.model = health.model;
    state.health = health; // search.js reads whether the server has a search index
    if (health.status === "loading") {
      $("status").textContent = `loading ${health.model}…`;
      setTimeout(checkHealth, 1000);
      return;
    }
    if (health.status !== "ready") {
      $("status").textContent = "model failed to load";
      showError(health.error || "the model failed to load");
      return;
    }
    $("status").textContent = `${health.model} · context ${health.context_length} tokens`;
    if (health.auth && !state.settings.api_key) showError("This server needs an API key: enter it under Settings.");
  } catch (e) {
    $("status").textContent = "server unreachable";
    showError("cannot reach the server: " + e.message);
    setTimeout(checkHealth, 2000);
  }
}

// ---- wiring -----------------------------------------------------------------------------------------------------

function main() {
  loadState();
  bindSettings();
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("new-chat").addEventListener("click", () => {
    newConversation();
    render();
    $("input").focus();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.streaming) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.streaming?.controller.abort());
  render();
  checkHealth();
}

main();
