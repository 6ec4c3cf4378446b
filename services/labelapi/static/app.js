// Reviewer page: one cell at a time, answered with the keyboard. Needs only a token,
// which stays in this tab's sessionStorage.
"use strict";

const KEYS = "1234567890qwertyuiopasfghjklzxcvbnm"; // no "d": it means "too difficult"
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("bmcell-token"), task: null, classes: [], busy: false };

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: {
      Authorization: `Bearer ${state.token}`,
      ...(body ? { "Content-Type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (resp.status === 401) {
    signOut();
    const detail = await resp.json().catch(() => ({}));
    throw new Error(`token refused: ${detail.error || resp.statusText}`);
  }
  if (!resp.ok) {
    const detail = await resp.json().catch(() => ({}));
    const err = new Error(detail.error || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

function signOut() {
  sessionStorage.removeItem("bmcell-token");
  state.token = null;
  $("review").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("progress").textContent = "";
  $("token-form").hidden = false;
}

async function start() {
  const me = await (await api("GET", "/v1/me")).json();
  $("who").textContent = `${me.name} (${me.role})`;
  const taxonomy = await (await api("GET", "/v1/taxonomy")).json();
  state.classes = taxonomy.classes.map((c, i) => ({ ...c, key: KEYS[i] }));
  const box = $("classes");
  box.replaceChildren(
    ...state.classes.map((c) => {
      const b = document.createElement("button");
      b.dataset.code = c.code;
      b.title = c.name;
      b.innerHTML = `${c.code} <kbd>${c.key.toUpperCase()}</kbd>`;
      b.addEventListener("click", () => answer("correct", c.code));
      return b;
    }),
  );
  $("token-form").hidden = true;
  $("review").hidden = false;
  $("sign-out").hidden = false;
  await nextTask();
}

function suggestionOf(task) {
  return task.suggested_class || (task.top.length ? task.top[0].class_code : null);
}

async function showTask(task) {
  state.task = task;
  $("task").dataset.taskId = task ? task.task_id : "";
  $("task").hidden = !task;
  $("empty").hidden = !!task;
  $("confirm").disabled = !task || !suggestionOf(task);
  $("difficult").disabled = !task;
  if (!task) return;
  const pct = (p) => `${(100 * p).toFixed(1)}%`;
  $("kind").textContent =
    `Task ${task.task_id} · ${task.kind.toUpperCase()} · ${task.cell.lab}/${task.cell.specimen}` +
    (task.required_reviews > 1 ? ` · review ${task.reviews_so_far + 1} of ${task.required_reviews}` : "");
  if (task.kind === "cst") {
    $("suggestion").textContent = `Suggested: ${task.suggested_class}`;
  } else if (task.top.length) {
    $("suggestion").textContent = task.top.slice(0, 2)
      .map((t) => `${t.class_code} ${pct(t.probability)}`).join("  vs  ");
  } else {
    $("suggestion").textContent = "No suggestion: choose a class";
  }
  const suggested = suggestionOf(task);
  for (const b of $("classes").children) b.classList.toggle("suggested", b.dataset.code === suggested);
  const m = task.cell.morphometrics;
  $("morphometrics").replaceChildren(
    ...Object.entries(m).flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k.replaceAll("_", " ");
      const dd = document.createElement("dd");
      dd.textContent = Number(v).toFixed(3);
      return [dt, dd];
    }),
  );
  const blob = await (await api("GET", task.image_url)).blob();
  const old = $("cell-image").src;
  $("cell-image").src = URL.createObjectURL(blob);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

async function refreshProgress() {
  const p = await (await api("GET", "/v1/rounds/current/progress")).json();
  const name = p.round ? `round ${p.round.number}` : "initial labelling";
  $("progress").textContent = `${name}: ${p.done}/${p.total} done · ${p.mine} by you`;
}

async function nextTask() {
  const resp = await api("POST", "/v1/tasks/next");
  await showTask(resp.status === 204 ? null : await resp.json());
  await refreshProgress();
  if (!state.task) say("Queue empty.");
}

async function answer(kind, classCode) {
  const task = state.task;
  if (!task || state.busy) return;
  if (kind === "confirm" && !suggestionOf(task)) return say("Nothing to confirm: choose a class.", true);
  state.busy = true;
  try {
    const body = { lease_token: task.lease_token, answer: kind };
    if (kind === "correct") body.class_code = classCode;
    const out = await (await api("POST", `/v1/tasks/${task.task_id}/submit`, body)).json();
    say(`Task ${task.task_id}: ${out.status}${out.class_code ? ` as ${out.class_code}` : ""}`);
    await nextTask();
  } catch (err) {
    say(err.message, true);
    if (err.status === 409) await nextTask();
  } finally {
    state.busy = false;
  }
}

document.addEventListener("keydown", (ev) => {
  if ($("review").hidden || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.target instanceof HTMLInputElement) return;
  const key = ev.key.toLowerCase();
  if (key === "enter") {
    ev.preventDefault();
    answer("confirm");
  } else if (key === "d") {
    answer("difficult");
  } else {
    const cls = state.classes.find((c) => c.key === key);
    if (cls) answer("correct", cls.code);
  }
});

$("token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.token = $("token-input").value.trim();
  sessionStorage.setItem("bmcell-token", state.token);
  $("token-input").value = "";
  try {
    await start();
    say("");
  } catch (err) {
    say(err.message, true);
  }
});
$("confirm").addEventListener("click", () => answer("confirm"));
$("difficult").addEventListener("click", () => answer("difficult"));
$("again").addEventListener("click", () => nextTask().catch((e) => say(e.message, true)));
$("sign-out").addEventListener("click", signOut);

if (state.token) start().catch((err) => say(err.message, true));
else signOut();
