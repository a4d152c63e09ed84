// Parley's chat page: one WebSocket (protocol parley.v1), a thread list over the HTTP API, and a
// live timeline for each run. Every run event carries a per-thread `seq`: the page remembers the
// last one it showed, drops anything it has already shown, and after a reconnect asks the
// server to `resume` from there, so a network blip loses and duplicates nothing on screen.
// All text from the server is inserted with textContent, never as HTML.
// The server closes the socket at the token's `exp` unless the page sends `authenticate` with a
// newer token first; the page cannot mint tokens, so it asks for one before that.
"use strict";

const TOKEN_KEY = "parley.token";
const TERMINAL = new Set(["agent_completed", "agent_error", "agent_cancelled"]);
const RENEW_AHEAD_MS = 60000; // ask for a new token a minute before expiry (or half way)
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  ws: null,
  connected: false,
  retryMs: 500,
  retryTimer: null,
  currentThread: null,
  lastSeq: new Map(),       // thread_id -> last seq shown
  messageText: new Map(),   // message_id -> the user's text
  pendingText: new Map(),   // client_message_id -> text sent, until accepted
  runs: new Map(),          // run_id -> its view
  activeRuns: new Set(),
  pending: new Map(),       // thread_id -> Map(seq -> event) waiting behind a gap
  tokenExpiresAt: null,     // ms since the epoch
  renewTimer: null,
  renewing: null,           // a token sent with `authenticate`, until the answer
  authError: null,          // the last `unauthorized` error's message
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- sign in

function signIn(token) {
  state.token = token.trim();
  state.authError = null;
  localStorage.setItem(TOKEN_KEY, state.token);
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  connect();
  loadThreads();
  $("message-input").focus();
}

function signOut(reason) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  clearTimeout(state.retryTimer);
  clearTimeout(state.renewTimer);
  state.renewing = null;
  $("renew").hidden = true;
  if (state.ws) { state.ws.onclose = null; state.ws.close(1000); }
  state.ws = null;
  $("chat").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  setStatus(reason || "Signed out");
}

// ---------------------------------------------------------------- the socket

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`, ["parley.v1", `bearer.${state.token}`]);
  state.ws = ws;
  setStatus("Connecting…");
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  ws.onclose = (event) => {
    state.connected = false;
    updateButtons();
    if (event.code === 4401 && event.reason === "token expired") {
      // The current thread is kept: signing in again resumes it where it stopped.
      return signOut("Your token expired: paste a new one to continue");
    }
    if (event.code === 4401) return signOut(`Your token was refused (${state.authError || "unauthorized"}): sign in again`);
    if (event.code === 4403) return setStatus("This page's origin is not allowed by the server");
    setStatus(`Connection lost (${event.code}); reconnecting in ${Math.round(state.retryMs / 100) / 10}s…`);
    state.retryTimer = setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 10000);
  };
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(message));
    return true;
  }
  return false;
}

function handle(frame) {
  switch (frame.type) {
    case "system_message":
      state.connected = true;
      state.retryMs = 500;
      setStatus(`Connected as ${frame.user_id} · model ${frame.model || "unknown"}`);
      expiresAt(frame.token_expires_at);
      updateButtons();
      if (state.currentThread) resume(state.currentThread);
      return;
    case "ping":
      send({ type: "pong" });
      return;
    case "message_accepted":
      return accepted(frame);
    case "authenticated":
      return authenticated(frame);
    case "resume_complete": {
      // Whatever still waits behind a gap the replay could not fill: show it now, in order.
      const waiting = state.pending.get(frame.thread_id) || new Map();
      state.pending.delete(frame.thread_id);
      for (const seq of [...waiting.keys()].sort((a, b) => a - b)) runEvent(waiting.get(seq), true);
      return;
    }
    case "error":
      if (frame.code === "unauthorized") state.authError = frame.message;
      if (frame.code === "unauthorized" && state.renewing) {
        // The new token was refused; the connection keeps the one it has.
        state.renewing = null;
        $("renew-error").textContent = frame.message;
        return;
      }
      setStatus(`Error ${frame.code}: ${frame.message}`);
      if (frame.client_message_id) state.pendingText.delete(frame.client_message_id);
      return;
    default:
      if (frame.run_id && Number.isInteger(frame.seq)) runEvent(frame);
  }
}

function resume(threadId) {
  send({ type: "resume", thread_id: threadId, after_seq: state.lastSeq.get(threadId) || 0 });
}

// ---------------------------------------------------------------- token lifetime

function expiresAt(iso) {
  clearTimeout(state.renewTimer);
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return; // a server that does not say
  state.tokenExpiresAt = at;
  const left = at - Date.now();
  state.renewTimer = setTimeout(askForToken, Math.max(0, left / 2, left - RENEW_AHEAD_MS));
}

function askForToken() {
  const at = new Date(state.tokenExpiresAt).toLocaleTimeString();
  $("renew-label").textContent = `Your access token expires at ${at}. Paste a new one to stay connected:`;
  $("renew-error").textContent = "";
  $("renew").hidden = false;
}

function renew(token) {
  state.renewing = token.trim();
  $("renew-error").textContent = "";
  if (!send({ type: "authenticate", token: state.renewing })) {
    state.renewing = null;
    $("renew-error").textContent = "Not connected: try again in a moment";
  }
}

function authenticated(frame) {
  if (state.renewing) {
    state.token = state.renewing;
    localStorage.setItem(TOKEN_KEY, state.token);
    state.renewing = null;
  }
  $("renew").hidden = true;
  $("renew-input").value = "";
  expiresAt(frame.token_expires_at);
  const until = new Date(state.tokenExpiresAt).toLocaleTimeString();
  setStatus(`Connected as ${frame.user_id} · token renewed, valid until ${until}`);
}

// ---------------------------------------------------------------- threads

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  if (response.status === 401) { signOut("Your token was refused: sign in again"); throw new Error("401"); }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function loadThreads() {
  const { threads } = await api("/api/threads");
  const list = $("thread-list");
  list.replaceChildren();
  for (const thread of threads) {
    const item = el("li");
    const button = el("button", "", thread.title || "(untitled)");
    button.type = "button";
    button.title = thread.title;
    button.setAttribute("aria-current", String(thread.id === state.currentThread));
    button.addEventListener("click", () => openThread(thread.id));
    item.append(button);
    list.append(item);
  }
}

async function openThread(threadId) {
  state.currentThread = threadId;
  state.lastSeq.set(threadId, 0);
  state.runs.clear();
  state.activeRuns.clear();
  $("runs").replaceChildren();
  const { messages } = await api(`/api/threads/${encodeURIComponent(threadId)}/messages`);
  for (const message of messages) if (message.role === "user") state.messageText.set(message.id, message.content);
  resume(threadId);
  loadThreads();
  updateButtons();
}

function newThread() {
  state.currentThread = null;
  state.runs.clear();
  state.activeRuns.clear();
  $("runs").replaceChildren();
  loadThreads();
  updateButtons();
  $("message-input").focus();
}

// ---------------------------------------------------------------- sending

function submitMessage(event) {
  event.preventDefault();
  const input = $("message-input");
  const content = input.value.trim();
  if (!content) return;
  const clientMessageId = crypto.randomUUID();
  const message = { type: "user_message", content, client_message_id: clientMessageId };
  if (state.currentThread) message.thread_id = state.currentThread;
  if (!send(message)) return setStatus("Not connected: the message was not sent");
  state.pendingText.set(clientMessageId, content);
  input.value = "";
}

function accepted(frame) {
  const text = state.pendingText.get(frame.client_message_id);
  if (text !== undefined) {
    state.pendingText.delete(frame.client_message_id);
    state.messageText.set(frame.message_id, text);
  }
  if (!state.currentThread) {
    state.currentThread = frame.thread_id;
    state.lastSeq.set(frame.thread_id, state.lastSeq.get(frame.thread_id) || 0);
    loadThreads();
  }
}

function stopRuns() {
  for (const runId of state.activeRuns) send({ type: "stop_agent", run_id: runId });
}

function updateButtons() {
  $("send").disabled = !state.connected;
  $("stop").hidden = state.activeRuns.size === 0;
}

// ---------------------------------------------------------------- the timeline

function runEvent(event, force = false) {
  if (event.thread_id !== state.currentThread) return;
  const last = state.lastSeq.get(event.thread_id) || 0;
  if (event.seq <= last) return; // already on screen
  if (event.seq > last + 1 && !force) {
    // A gap (a reconnect can deliver live events before the replay): wait for the replay.
    if (!state.pending.has(event.thread_id)) state.pending.set(event.thread_id, new Map());
    state.pending.get(event.thread_id).set(event.seq, event);
    return;
  }
  state.lastSeq.set(event.thread_id, event.seq);
  render(event);
  const waiting = state.pending.get(event.thread_id);
  const next = waiting && waiting.get(event.seq + 1);
  if (next) { waiting.delete(next.seq); runEvent(next); }
}

function render(event) {
  const view = runView(event.run_id);
  const add = (className, text) => {
    const entry = el("li", `entry ${className}`, text);
    entry.dataset.seq = event.seq;
    view.timeline.append(entry);
    return entry;
  };
  switch (event.type) {
    case "agent_started":
      view.question.textContent = state.messageText.get(event.message_id) || "";
      add("started", `${event.agent} started`);
      state.activeRuns.add(event.run_id);
      break;
    case "agent_thinking":
      add("thinking", event.text);
      break;
    case "tool_executing": {
      const entry = add("tool", "");
      entry.append(el("span", "tool-name", event.tool), " ",
                   el("span", "tool-status", "running…"),
                   el("pre", "tool-arguments", JSON.stringify(event.arguments, null, 2)));
      view.tools.set(event.tool_call_id, entry);
      break;
    }
    case "tool_completed": {
      const entry = view.tools.get(event.tool_call_id) || add("tool", event.tool);
      const status = entry.querySelector(".tool-status") || entry.appendChild(el("span", "tool-status"));
      status.className = `tool-status ${event.status}`;
      status.textContent = `${event.status === "ok" ? "done" : "failed"} in ${event.duration_ms} ms`;
      const output = event.status === "ok" ? JSON.stringify(event.result, null, 2) : event.error;
      entry.append(el("pre", `tool-result ${event.status}`, output));
      break;
    }
    case "agent_message_delta":
      view.answer.textContent += event.text;
      break;
    case "agent_completed":
      view.answer.textContent = event.content;
      finish(view, event, "completed",
             `Completed in ${event.duration_ms} ms · ${event.usage.input_tokens} tokens in, ` +
             `${event.usage.output_tokens} out`);
      break;
    case "agent_error":
      finish(view, event, "error", `Error ${event.code}: ${event.message}${event.retryable ? " (retry may help)" : ""}`);
      break;
    case "agent_cancelled":
      finish(view, event, "cancelled", `Cancelled (${event.reason})`);
      break;
    default:
      add("other", event.type);
  }
  if (TERMINAL.has(event.type)) state.activeRuns.delete(event.run_id);
  updateButtons();
  view.root.scrollIntoView({ block: "end" });
}

function runView(runId) {
  let view = state.runs.get(runId);
  if (view) return view;
  const root = el("li", "run");
  root.dataset.runId = runId;
  const question = el("p", "user-message");
  const timeline = el("ol", "timeline");
  timeline.setAttribute("aria-label", "Agent activity");
  const answer = el("div", "answer");
  const terminal = el("p", "terminal");
  root.append(question, timeline, answer, terminal);
  $("runs").append(root);
  view = { root, question, timeline, answer, terminal, tools: new Map() };
  state.runs.set(runId, view);
  return view;
}

function finish(view, event, kind, text) {
  view.terminal.className = `terminal ${kind}`;
  view.terminal.textContent = text;
  view.terminal.dataset.seq = event.seq;
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token-input").value);
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("composer").addEventListener("submit", submitMessage);
  $("message-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stopRuns);
  $("renew").addEventListener("submit", (event) => {
    event.preventDefault();
    renew($("renew-input").value);
  });
  // A new sign-in link opened in this tab: use its token on the open connection.
  window.addEventListener("hashchange", () => {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    if (!token) return;
    history.replaceState(null, "", location.pathname);
    if (state.connected) renew(token); else signIn(token);
  });
  $("new-thread").addEventListener("click", newThread);

  // `make serve` prints a link with the token in the fragment (never sent to a server).
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) history.replaceState(null, "", location.pathname);
  const token = fromLink || localStorage.getItem(TOKEN_KEY);
  if (token) signIn(token);
});
