"use strict";
// The Ads tab: a context (a post, a query, a user's posts or a feed slot) sent to /v1/ads/match; the winning ad,
// the price it pays and every candidate with why it won, lost or was blocked. Uses app.js's helpers.

const ads = { seq: 0 };

function showAdsError(message) {
  $("ads-error").textContent = message;
  $("ads-error").hidden = false;
}

function adsRequest() {
  const kind = $("ads-kind").value;
  const lines = $("ads-text").value.split("\n").map((l) => l.trim()).filter(Boolean);
  const body = { kind, record: $("ads-record").checked };
  if (kind === "post" || kind === "query") body.text = $("ads-text").value.trim();
  else body.texts = lines;
  for (const [name, id] of [["user", "ads-user"], ["lang", "ads-lang"]]) {
    const value = $(id).value.trim();
    if (value) body[name] = value;
  }
  const slot = $("ads-slot").value.trim();
  if (slot !== "") body.slot = Number(slot);
  return body;
}

function money(x) {
  return x === null || x === undefined ? "" : Number(x).toFixed(4);
}

function showMatch(result) {
  const w = result.winner;
  const box = $("ads-winner");
  if (w) {
    box.replaceChildren(
      el("div", "ad-label", `Ad · ${w.advertiser}`),
      el("div", "ad-text", w.text),
      el("div", "ad-url", w.url),
      el("div", "ad-price", `pays ${money(result.price)} ${result.currency} ${result.price_unit} (${result.auction.kind}, reserve ${result.auction.reserve_cpm} CPM)`),
    );
    if (result.impression_id) box.append(el("div", "ad-impression", `impression ${result.impression_id} logged`));
  } else {
    box.replaceChildren(el("div", "ad-label", "No ad: no candidate passed its filters and the reserve."));
  }
  box.hidden = false;
  const records = result.brand_safety?.records || [];
  const tiers = records.map((r) => r.tier + (r.rule ? ` (${r.rule})` : "")).join(", ");
  $("ads-summary").textContent = `${plural(result.candidates.length, "candidate")} of ${plural(result.considered, "ad")}` + (tiers ? ` · brand safety of the context: ${tiers}` : "");
  const rows = result.candidates.map((c) => {
    const tr = document.createElement("tr");
    tr.className = c.outcome;
    tr.dataset.ad = c.ad;
    for (const text of [c.outcome, c.ad, c.advertiser, c.relevance.toFixed(3), `${c.bid} ${c.bid_type}`, c.score.toFixed(3), `${c.code}: ${c.reason}`]) {
      tr.append(el("td", "", String(text)));
    }
    return tr;
  });
  $("ads-candidates").querySelector("tbody").replaceChildren(...rows);
  $("ads-candidates").hidden = !rows.length;
}

async function runMatch() {
  const mine = ++ads.seq;
  $("ads-error").hidden = true;
  $("ads-summary").textContent = "Matching…";
  try {
    const result = await postJSON("v1/ads/match", adsRequest());
    if (mine === ads.seq) showMatch(result);
  } catch (e) {
    if (mine !== ads.seq) return;
    $("ads-summary").textContent = "";
    $("ads-winner").hidden = true;
    $("ads-candidates").hidden = true;
    showAdsError(e.message);
  }
}

function adsTabOpened() {
  if (state.health && !state.health.ads) {
    showAdsError("This server was started without --ads: matching needs an inventory (myna serve --ads INVENTORY.jsonl).");
  }
  $("ads-text").focus();
}

function bindAds() {
  $("ads-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runMatch();
  });
  document.querySelector('.tab[data-tab="ads"]').addEventListener("click", adsTabOpened);
}

bindAds();
