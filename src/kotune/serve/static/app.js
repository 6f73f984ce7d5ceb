// Chat page for `kotune serve`: plain JS, no build step, nothing loaded from outside this server.
// The conversation lives in `conversation` (page memory only) and is sent whole: the server answers the last question
// in the light of the earlier turns. "새 대화" empties it.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];
let modelId = null;
let grounded = false; // ungrounded runs: cited articles are only checked to exist, not to fit the answer
let busy = null; // AbortController of the answer being streamed

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addRow(role) {
  $("empty")?.remove();
  const row = el("div", `msg ${role}`);
  const bubble = el("div", "bubble");
  row.append(bubble);
  $("log").append(row);
  return { row, bubble };
}

function scrollDown() { $("log").lastElementChild?.scrollIntoView({ block: "end" }); }

function showDetail(aside, rec, chip) {
  aside.querySelectorAll(".chip").forEach((c) => c.setAttribute("aria-pressed", "false"));
  let box = aside.querySelector(".detail");
  if (box && box.dataset.cite === rec.cite) { box.remove(); return; } // a second click closes it
  if (!box) { box = el("div", "detail"); aside.append(box); }
  box.dataset.cite = rec.cite;
  box.replaceChildren(el("h3", "", `${rec.cite} (${rec.title})`), el("p", "", rec.summary));
  chip.setAttribute("aria-pressed", "true");
}

function chipGroup(aside, heading, records, cls) {
  if (!records.length) return;
  aside.append(el("h2", "", heading));
  const chips = el("div", "chips");
  for (const rec of records) {
    const chip = el("button", `chip ${cls}`, `${rec.cite} ${rec.title}`);
    chip.type = "button";
    chip.title = "눌러서 조문 요약 보기";
    chip.setAttribute("aria-pressed", "false");
    chip.addEventListener("click", () => showDetail(aside, rec, chip));
    chips.append(chip);
  }
  aside.append(chips);
}

function showCitations(row, final) {
  const aside = el("aside", "cites");
  chipGroup(aside, grounded ? "인용 조문" : "인용 조문 (있는 조문인지만 확인)", final.citations || [], "cited");
  if ((final.flagged_citations || []).length) {
    aside.append(el("h2", "", "확인되지 않은 인용"));
    const chips = el("div", "chips");
    for (const cite of final.flagged_citations) chips.append(el("span", "chip flagged", cite));
    aside.append(chips);
  }
  const cited = new Set((final.citations || []).map((r) => r.cite));
  chipGroup(aside, "참고한 조문", (final.retrieved || []).filter((r) => !cited.has(r.cite)), "retrieved");
  if (aside.childElementCount) row.append(aside);
}

function errorText(status, body) {
  const msg = body?.error?.message || `HTTP ${status}`;
  if (status === 401) return `API 키가 필요합니다: ${msg}`;
  if (status === 429) return `요청이 많아 대기열이 찼습니다. 잠시 후 다시 시도하세요. (${msg})`;
  return `오류: ${msg}`;
}

// Reads `data: …` events from a fetch body; chunks may end anywhere, even inside a UTF-8 character.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue; // keep-alive comments
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function ask(question) {
  conversation.push({ role: "user", content: question });
  addRow("user").bubble.textContent = question;
  const { row, bubble } = addRow("assistant");
  const status = el("span", "status", "대기 중…");
  bubble.append(status);
  scrollDown();
  busy = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let text = "";
  try {
    const headers = { "Content-Type": "application/json" };
    if ($("apikey").value) headers.Authorization = `Bearer ${$("apikey").value}`;
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal: busy.signal,
      body: JSON.stringify({ model: modelId, messages: conversation, stream: true }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => null);
      if (res.status === 401) $("keyrow").hidden = false;
      throw new Error(errorText(res.status, body));
    }
    for await (const ev of sseEvents(res.body)) {
      if (ev.error) throw new Error(errorText(500, ev));
      const choice = ev.choices?.[0];
      if (!choice) continue;
      if (choice.delta?.content) {
        text += choice.delta.content;
        bubble.textContent = text;
        scrollDown();
      }
      if (choice.finish_reason) {
        if (ev.checked_content !== undefined) text = ev.checked_content;
        bubble.textContent = text + (choice.finish_reason === "length" ? " …(길이 제한으로 중단)" : "");
        showCitations(row, ev);
        row.dataset.done = choice.finish_reason;
      }
    }
    conversation.push({ role: "assistant", content: text });
  } catch (err) {
    conversation.pop(); // an unanswered question is not kept in the conversation
    if (err.name === "AbortError") {
      bubble.textContent = text ? `${text} …(중지됨)` : "(중지됨)";
    } else {
      bubble.textContent = err.message;
      bubble.classList.add("error");
    }
  } finally {
    busy = null;
    $("send").disabled = false;
    $("stop").hidden = true;
    scrollDown();
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value.trim();
  if (!q || busy) return;
  $("question").value = "";
  ask(q);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => busy?.abort());
$("reset").addEventListener("click", () => {
  busy?.abort();
  conversation.length = 0;
  const empty = el("p", "empty", "새 대화입니다. 전세·임대차에 관해 궁금한 점을 물어보세요.");
  empty.id = "empty";
  $("log").replaceChildren(empty);
  $("question").focus();
});

(async () => {
  try {
    const h = await (await fetch("/health")).json();
    modelId = h.model;
    grounded = h.grounded;
    $("model").textContent = `모델: ${h.model}${h.grounded ? " · 조문 검색 사용" : ""}`;
    if (h.notice) { $("notice").textContent = `※ ${h.notice}`; $("notice").hidden = false; }
    if (h.auth) $("keyrow").hidden = false;
  } catch {
    $("model").textContent = "서버에 연결할 수 없습니다";
  }
})();
