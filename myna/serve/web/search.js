"use strict";
// The Search tab: Top and Latest ask this server's POST /v1/search, Ask its POST /v1/ask (myna serve --index).
// Posts are untrusted text: every piece of them goes into the page through textContent, never as HTML.
// Shares app.js's globals: $, state (settings, health), headers(), errorText() and moderationNotes().

const search = { mode: "top", seq: 0 }; // seq: the newest request; answers to older ones are dropped

function showSearchError(message) {
  $("search-error").textContent = message;
  $("search-error").hidden = false;
}

function clearSearch(summary) {
  $("search-error").hidden = true;
  $("answer").hidden = true;
  $("results").replaceChildren();
  $("search-summary").textContent = summary;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// An element with a class and text, the way every piece of a post is put on the page.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The post's text with its matched terms in <mark>; the spans count Unicode code points, as Python does.
function markedText(text, spans) {
  const chars = Array.from(text);
  const out = el("div", "post-text");
  let at = 0;
  for (const [start, end] of spans) {
    out.append(chars.slice(at, start).join(""), el("mark", "", chars.slice(start, end).join("")));
    at = end;
  }
  out.append(chars.slice(at).join(""));
  return out;
}

function scoreParts(parts) {
  return Object.entries(parts)
    .map(([name, v]) => (v && typeof v === "object" ? `${name} #${v.rank} (${v.score})` : `${name} ${v}`))
    .join(" · ");
}

function postElement(p, cited) {
  const li = el("li", "post");
  li.dataset.id = p.id;
  const head = el("div", "post-head");
  if (p.n) {
    li.id = "post-" + p.n;
    head.append(el("span", "n", `[${p.n}]`));
  }
  head.append(el("span", "author", "@" + (p.author || "unknown")));
  const time = el("time", "", p.created_at ? p.created_at.slice(0, 16).replace("T", " ") + " UTC" : "undated");
  if (p.created_at) time.dateTime = p.created_at;
  head.append(time);
  if (cited) head.append(el("span", "cited", "cited"));
  const meta = el("div", "post-meta");
  meta.append(el("span", "likes", `♥ ${p.likes}`), el("span", "reposts", `⟳ ${p.reposts}`), el("span", "replies", `↩ ${p.replies}`));
  if (p.collapsed.length) meta.append(el("span", "", `${p.collapsed.length} repost(s) folded in`));
  li.append(head, markedText(p.text, p.highlights), meta);
  if (p.parts) li.append(el("div", "parts", `score ${p.score} = ` + scoreParts(p.parts)));
  return li;
}

// The answer's text with each [n] (or [n, m]) a link to the numbered post below it.
function answerText(text, count) {
  const out = $("answer-text");
  out.replaceChildren();
  let at = 0;
  for (const m of text.matchAll(/\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]/g)) {
    out.append(text.slice(at, m.index), "[");
    m[1].split(",").forEach((part, i) => {
      const n = Number(part.trim());
      out.append(i ? ", " : "", n >= 1 && n <= count ? citation(n) : String(n));
    });
    out.append("]");
    at = m.index + m[0].length;
  }
  out.append(text.slice(at));
}

function citation(n) {
  const link = el("a", "cite", String(n));
  link.href = "#post-" + n;
  link.addEventListener("click", (event) => {
    event.preventDefault();
    const post = $("post-" + n);
    post.scrollIntoView({ block: "nearest" });
    post.classList.add("flash");
    setTimeout(() => post.classList.remove("flash"), 1500);
  });
  return link;
}

async function postJSON(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function runSearch() {
  const text = $("query").value.trim();
  if (!text) return;
  const mine = ++search.seq;
  const asking = search.mode === "ask";
  clearSearch(asking ? "Asking…" : "Searching…");
  try {
    let shown;
    if (asking) {
      const body = { question: text };
      const maxTokens = String(state.settings.max_tokens).trim(); // the chat's setting, when given
      if (maxTokens) body.max_tokens = Number(maxTokens);
      shown = await postJSON("v1/ask", body);
    } else {
      shown = await postJSON("v1/search", { query: text, order: search.mode, limit: 20, explain: $("explain").checked });
    }
    if (mine !== search.seq) return;
    asking ? showAnswer(shown) : showResults(shown);
  } catch (e) {
    if (mine !== search.seq) return;
    $("search-summary").textContent = "";
    showSearchError(e.message);
  }
}

function showResults(results) {
  const how = results.retrievers.join(" + ");
  $("search-summary").textContent = results.data.length ? `${results.order}: ${plural(results.data.length, "post")} (${how})` : "No posts match.";
  $("results").replaceChildren(...results.data.map((p) => postElement(p, false)));
}

function showAnswer(a) {
  const cited = new Set(a.citations.map((c) => c.n));
  answerText(a.answer, a.posts.length);
  const notes = [];
  if (a.finish_reason === "length") notes.push("stopped at the max-tokens limit");
  if (a.removed_citations) notes.push(`${a.removed_citations} citation(s) of posts that were not found removed`);
  notes.push(...moderationNotes(a.myna?.moderation));
  $("answer-notes").replaceChildren(...notes.map((n) => el("li", "", n)));
  $("answer").hidden = false;
  $("search-summary").textContent = a.query ? `searched: ${a.query} · ${plural(a.posts.length, "post")}` : "no search: the question has no words to look for";
  $("results").replaceChildren(...a.posts.map((p) => postElement(p, cited.has(p.n))));
}

function setMode(mode) {
  search.mode = mode;
  for (const button of document.querySelectorAll(".mode")) button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
  $("search-go").textContent = mode === "ask" ? "Ask" : "Search";
  $("explain").disabled = mode === "ask";
  runSearch();
}

function searchTabOpened() {
  if (state.health && !state.health.search) {
    showSearchError("This server was started without --index: search needs an index (myna index build, then myna serve --index INDEX).");
  }
  $("query").focus();
}

function bindSearch() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  for (const button of document.querySelectorAll(".mode")) button.addEventListener("click", () => setMode(button.dataset.mode));
  $("explain").addEventListener("change", runSearch);
  document.querySelector('.tab[data-tab="search"]').addEventListener("click", searchTabOpened);
}

bindSearch();
