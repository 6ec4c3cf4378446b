// Reviewer page. CST tasks are verified as a gallery (a page of cells sharing one
// suggested class: touch only the outliers, then accept the page); every other task is
// answered one cell at a time. Each answer is one submit of one task with its lease.
// Needs only a token, which stays in this tab's sessionStorage. No build step.
"use strict";

// Physical keys (event.code), so shortcuts sit in the same place on any layout.
// A, D, S, Z, F, H, X are actions; classes take the rest, in taxonomy order.
const CLASS_KEYS = [
  "Digit1", "Digit2", "Digit3", "Digit4", "Digit5", "Digit6", "Digit7", "Digit8", "Digit9",
  "Digit0", "KeyQ", "KeyW", "KeyE", "KeyR", "KeyT", "KeyY", "KeyU", "KeyI", "KeyO", "KeyP",
  "KeyG", "KeyJ", "KeyK", "KeyL", "KeyC", "KeyV", "KeyB", "KeyN", "KeyM",
];
const PAGE_SIZE = 24;
const ZOOMS = [1, 1.5, 2, 3, 4];
const $ = (id) => document.getElementById(id);
const keyLabel = (code) => code.replace(/^Digit|^Key/, "");

const state = {
  token: sessionStorage.getItem("bmcell-token"),
  shortcuts: localStorage.getItem("bmcell-shortcuts") !== "off",
  classes: [],
  taxonomy: null,
  mode: null, // "gallery" | "single" | "correcting" | null (empty queue)
  page: [], // gallery: [{task, answer: "confirm"|"correct"|"difficult", classCode}]
  active: 0, // gallery: the tile the class keys apply to
  task: null, // single: the task on screen
  queued: null, // single: the next task, leased and its image fetched (prefetch)
  images: new Map(), // image_url -> object URL
  history: [], // answers of this session, newest last: {task, out}
  correcting: null, // the answer being undone
  tally: {},
  answered: 0,
  busy: false,
  zoom: 0,
  expiresAt: null,
  keystrokes: 0,
};
// Keys pressed on the review screen: the browser test compares it with what it sent
// when it measures keystrokes per label.
window.bmcellKeystrokes = () => state.keystrokes;

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

// --- start ---------------------------------------------------------------------------

async function start() {
  const me = await (await api("GET", "/v1/me")).json();
  $("who").textContent = `${me.name} (${me.role})`;
  $("lab-picker").replaceChildren(
    new Option("all my labs", ""),
    ...me.labs.map((code) => new Option(code, code)),
  );
  state.taxonomy = await (await api("GET", "/v1/taxonomy")).json();
  const lineage = (code) =>
    state.taxonomy.erythroid.includes(code) ? "erythroid"
      : state.taxonomy.myeloid.includes(code) ? "myeloid" : "other";
  state.classes = state.taxonomy.classes.map((c, i) => ({ ...c, key: CLASS_KEYS[i], lineage: lineage(c.code) }));
  $("classes").replaceChildren(
    ...state.classes.map((c) => {
      const b = document.createElement("button");
      b.dataset.code = c.code;
      b.title = c.name;
      b.innerHTML = `<span class="mark" aria-hidden="true"></span>${c.code}` +
        (c.key ? ` <kbd>${keyLabel(c.key)}</kbd>` : "") + `<span class="sr-suggested"></span>`;
      b.addEventListener("click", () => chooseClass(c.code));
      return b;
    }),
  );
  renderCard();
  $("shortcuts").checked = state.shortcuts;
  $("token-form").hidden = true;
  $("review").hidden = false;
  $("sign-out").hidden = false;
  await load();
}

// --- loading work ----------------------------------------------------------------------

function pickerQuery(extra = {}) {
  const params = new URLSearchParams(extra);
  const lab = $("lab-picker").value;
  if (lab) params.set("lab", lab);
  return params;
}

async function leasePage(params) {
  const resp = await api("POST", `/v1/tasks/page?${params}`);
  const tasks = (await resp.json()).tasks;
  // What is left of each lease, by the server's clock (its Date header) against ours.
  const serverNow = Date.parse(resp.headers.get("Date")) || null;
  for (const t of tasks) {
    const left = Date.parse(t.lease_expires_at) - (serverNow || Date.parse(t.leased_at));
    t.localExpiry = Date.now() + left;
  }
  return tasks;
}

// What the picker asks for: a CST gallery first, then single cells.
async function load() {
  const choice = $("kind-picker").value;
  state.correcting = null;
  if (choice === "" || choice === "cst") {
    const tasks = await leasePage(pickerQuery({ kind: "cst", size: PAGE_SIZE }));
    if (tasks.length || choice === "cst") return showGallery(tasks);
  }
  const kind = choice === "cst-single" ? "cst" : choice;
  // Two leases: the task on screen and the next one, whose image is fetched meanwhile.
  const tasks = await leasePage(pickerQuery({ ...(kind ? { kind } : {}), size: 2 }));
  await showSingle(tasks[0] || null);
  state.queued = tasks[1] || null;
  if (state.queued) imageOf(state.queued).catch(() => {});
  refreshProgress().catch(() => {});
}

async function imageOf(task) {
  if (!state.images.has(task.image_url)) {
    const blob = await (await api("GET", task.image_url)).blob();
    state.images.set(task.image_url, URL.createObjectURL(blob));
  }
  return state.images.get(task.image_url);
}

function forgetImage(task) {
  const url = state.images.get(task.image_url);
  if (url) URL.revokeObjectURL(url);
  state.images.delete(task.image_url);
}

function leaseClock(tasks) {
  // The lease that runs out first: a page may hold resumed and new ones.
  const ends = tasks.map((t) => t.localExpiry).filter(Boolean);
  state.expiresAt = ends.length ? Math.min(...ends) : null;
  tick();
}

function tick() {
  const el = $("countdown");
  if (!state.expiresAt || !state.mode || state.mode === "correcting") return (el.textContent = "");
  const left = Math.round((state.expiresAt - Date.now()) / 1000);
  el.className = left < 60 ? "warn" : "";
  el.textContent = left > 0
    ? `lease: ${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")} left`
    : "lease expired: answers still held are kept, the rest come back";
}
setInterval(tick, 1000);

async function refreshProgress() {
  const p = await (await api("GET", "/v1/rounds/current/progress")).json();
  const name = p.round ? `round ${p.round.number}` : "initial labelling";
  $("progress").textContent = `${name}: ${p.done}/${p.total} done · ${p.mine} by you`;
}

// --- gallery -----------------------------------------------------------------------------

function showGallery(tasks) {
  state.mode = tasks.length ? "gallery" : null;
  state.page = tasks.map((task) => ({ task, answer: "confirm", classCode: task.suggested_class }));
  state.active = 0;
  markSuggested(null);
  $("task").hidden = true;
  $("gallery").hidden = !tasks.length;
  $("empty").hidden = !!tasks.length;
  setActions();
  if (tasks.length) {
    const cls = state.classes.find((c) => c.code === tasks[0].suggested_class);
    $("gallery-title").textContent =
      `${tasks.length} CST cells suggested as ${tasks[0].suggested_class}` +
      (cls ? ` (${cls.name})` : "");
    $("tiles").replaceChildren(...state.page.map((item, i) => tile(item, i)));
    layoutColumns();
    focusTile(0);
    for (const item of state.page) {
      imageOf(item.task)
        .then((url) => { tileOf(item.task).querySelector("img").src = url; })
        .catch((err) => say(err.message, true));
    }
  }
  leaseClock(tasks);
  refreshProgress().catch(() => {});
}

function tile(item, i) {
  const b = document.createElement("button");
  b.className = "tile";
  b.dataset.taskId = item.task.task_id;
  b.tabIndex = i === 0 ? 0 : -1; // one tab stop; arrows move inside the page
  b.innerHTML = `<img alt="cell ${i + 1}"><span class="verdict"></span>`;
  b.addEventListener("click", () => focusTile(i));
  b.addEventListener("focus", () => { state.active = i; markActive(); });
  paintTile(b, item);
  return b;
}

const tileOf = (task) => $("tiles").querySelector(`[data-task-id="${task.task_id}"]`);

function paintTile(el, item) {
  el.dataset.answer = item.answer;
  el.dataset.class = item.answer === "difficult" ? "" : item.classCode;
  const verdict = item.answer === "confirm" ? `✓ ${item.classCode} (suggested)`
    : item.answer === "correct" ? `✎ ${item.classCode} (changed)` : "✗ too difficult";
  el.querySelector(".verdict").textContent = verdict;
  el.setAttribute("aria-label", `cell ${state.page.indexOf(item) + 1}: ${verdict}`);
}

function layoutColumns() {
  const tiles = [...$("tiles").children];
  const top = tiles.length ? tiles[0].offsetTop : 0;
  const cols = Math.max(1, tiles.filter((t) => t.offsetTop === top).length);
  $("tiles").dataset.cols = cols;
  return cols;
}
window.addEventListener("resize", () => state.mode === "gallery" && layoutColumns());

function focusTile(i) {
  const tiles = $("tiles").children;
  if (!tiles.length) return;
  state.active = Math.min(Math.max(i, 0), tiles.length - 1);
  for (const [j, t] of [...tiles].entries()) t.tabIndex = j === state.active ? 0 : -1;
  tiles[state.active].focus();
  markActive();
}

function markActive() {
  for (const [j, t] of [...$("tiles").children].entries()) t.classList.toggle("active", j === state.active);
}

function setTile(answer, classCode) {
  const item = state.page[state.active];
  if (!item) return;
  if (answer === "correct" && classCode === item.task.suggested_class) answer = "confirm";
  item.answer = answer;
  item.classCode = answer === "difficult" ? null : (classCode || item.task.suggested_class);
  paintTile(tileOf(item.task), item);
}

function moveInGallery(code) {
  const cols = layoutColumns();
  const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols }[code];
  if (code === "Home") return focusTile(0);
  if (code === "End") return focusTile(state.page.length - 1);
  focusTile(state.active + step);
}

// Every tile is its own submit with its own lease. A lease that ran out (409) is not
// answered here: the next page serves its task again, to this reviewer or another.
async function acceptPage() {
  if (state.mode !== "gallery" || state.busy) return;
  state.busy = true;
  let done = 0, expired = 0, failed = 0;
  try {
    const items = [...state.page];
    for (let i = 0; i < items.length; i += 6) {
      await Promise.all(items.slice(i, i + 6).map(async (item) => {
        try {
          await submit(item.task, item.answer, item.answer === "correct" ? item.classCode : null);
          done += 1;
        } catch (err) {
          if (err.status === 409) expired += 1;
          else failed += 1;
        }
      }));
    }
    say(`Page: ${done} answered` + (expired ? `, ${expired} leases had expired and go back to the queue` : "") +
      (failed ? `, ${failed} failed (they come back)` : ""), expired + failed > 0);
    for (const item of items) forgetImage(item.task);
    state.mode = null; // keys pressed before the next page is here touch nothing
  } finally {
    state.busy = false;
  }
  await load();
}

// --- single cell ---------------------------------------------------------------------------

function suggestionOf(task) {
  // Only CST tasks carry a suggestion to confirm: AL tasks must not anchor the reviewer.
  return task && task.kind === "cst" ? task.suggested_class : null;
}

async function showSingle(task, correcting = null) {
  state.mode = correcting ? "correcting" : task ? "single" : null;
  state.task = task;
  state.correcting = correcting;
  $("gallery").hidden = true;
  $("task").dataset.taskId = task ? task.task_id : "";
  $("task").hidden = !task;
  $("empty").hidden = !!task;
  $("field-view").hidden = true;
  setActions();
  if (!task) {
    leaseClock([]);
    return;
  }
  if (!correcting) leaseClock([task]);
  else tick();
  const c = $("correcting");
  c.hidden = !correcting;
  if (correcting) {
    c.textContent = `Undo: task ${task.task_id} was answered ${correcting.out.class_code}. ` +
      "Choose the right class (Esc to leave it).";
  }
  $("kind").textContent =
    `Task ${task.task_id} · ${task.kind.toUpperCase()} · ${task.cell.lab}/${task.cell.specimen}` +
    (task.required_reviews > 1 ? ` · review ${task.reviews_so_far + 1} of ${task.required_reviews}` : "");
  const suggested = suggestionOf(task);
  const cls = state.classes.find((x) => x.code === suggested);
  if (suggested) {
    $("suggestion").textContent = `Suggested: ${suggested} ★`;
    $("suggestion-ref").textContent = cls ? `${cls.code}: ${cls.name} (${cls.lineage})` : "";
  } else if (task.top.length) {
    // The model's top two, alphabetically and without probabilities: a neutral order.
    const names = task.top.slice(0, 2).map((t) => t.class_code).sort();
    $("suggestion").textContent = `The model is unsure between ${names.join(" and ")} (alphabetical order): choose the class`;
    $("suggestion-ref").textContent = "";
  } else {
    $("suggestion").textContent = "No suggestion: choose a class";
    $("suggestion-ref").textContent = "";
  }
  markSuggested(correcting ? null : suggested);
  renderMorphometrics(task);
  const url = await imageOf(task);
  $("cell-image").src = url;
  await $("cell-image").decode().catch(() => {});
  applyZoom();
}

// The suggestion's button says so in words and with a star, and has a double border.
function markSuggested(code) {
  for (const b of $("classes").children) {
    const on = b.dataset.code === code;
    b.classList.toggle("suggested", on);
    b.querySelector(".mark").textContent = on ? "★ " : "";
    b.querySelector(".sr-suggested").textContent = on ? " (suggested)" : "";
  }
}

function renderMorphometrics(task) {
  const scale = task.cell.um_per_px;
  $("morphometrics").replaceChildren(
    ...task.cell.morphometrics_named.flatMap((m) => {
      const dt = document.createElement("dt");
      dt.textContent = m.name;
      const dd = document.createElement("dd");
      if (m.unit === "px²" && scale) dd.textContent = `${(m.value * scale * scale).toFixed(1)} µm²`;
      else if (m.unit === "px²") dd.textContent = `${Math.round(m.value)} px²`;
      else dd.textContent = Number(m.value).toFixed(2);
      return [dt, dd];
    }),
  );
}

// A bar of a round length in µm, 60 to 150 screen pixels long; "scale unknown" when the
// upload did not say how many µm a pixel is.
function drawScale(el, img, umPerPx) {
  if (!umPerPx || !img.naturalWidth) {
    el.textContent = "scale unknown";
    el.style.setProperty("--bar", "0px");
    el.classList.add("unknown");
    return;
  }
  const screenPerUm = img.clientWidth / img.naturalWidth / umPerPx;
  const um = [1, 2, 5, 10, 20, 50, 100, 200].find((u) => u * screenPerUm >= 60) || 200;
  el.classList.remove("unknown");
  el.style.setProperty("--bar", `${Math.round(um * screenPerUm)}px`);
  el.textContent = `${um} µm`;
}

function applyZoom() {
  const z = ZOOMS[state.zoom];
  const img = $("cell-image");
  img.style.width = `${Math.round(26 * z)}rem`;
  $("zoom-level").textContent = `zoom ${z}×`;
  const scale = state.task ? state.task.cell.um_per_px : null;
  drawScale($("crop-scale"), img, scale);
  if (!$("field-view").hidden) drawScale($("field-scale"), $("field-image"), scale);
}

function zoom(step) {
  if (!state.task || state.mode === "gallery") return;
  state.zoom = Math.min(Math.max(state.zoom + step, 0), ZOOMS.length - 1);
  applyZoom();
}

async function toggleField() {
  const task = state.task;
  if (!task || state.mode === "gallery") return;
  const view = $("field-view");
  if (!view.hidden) {
    view.hidden = true;
    return;
  }
  const resp = await api("GET", task.field_url);
  const img = $("field-image");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await resp.blob());
  img.dataset.cellId = task.cell.id;
  img.dataset.fieldId = resp.headers.get("X-Field-Id");
  await img.decode().catch(() => {});
  view.hidden = false;
  drawScale($("field-scale"), img, task.cell.um_per_px);
}

async function answer(kind, classCode) {
  const task = state.task;
  if (!task || state.busy || state.mode !== "single") return;
  if (kind === "confirm" && !suggestionOf(task)) return say("Nothing to confirm: choose a class.", true);
  let moveOn = false;
  state.busy = true;
  try {
    const out = await submit(task, kind, kind === "correct" ? classCode : null);
    say(`Task ${task.task_id}: ${out.status}${out.class_code ? ` as ${out.class_code}` : ""}`);
    moveOn = true;
  } catch (err) {
    say(err.message, true);
    moveOn = err.status === 409;
  } finally {
    state.busy = false;
  }
  if (moveOn) await advance(task);
}

// The next task's lease and image are already here (prefetched): asking for the page
// again keeps that lease, and takes the one after it. Keys pressed meanwhile find no
// task, so nothing is answered twice.
async function advance(done) {
  state.task = null;
  forgetImage(done);
  await load();
}

async function skip() {
  const task = state.task;
  if (!task || state.busy || state.mode !== "single") return;
  let moveOn = false;
  state.busy = true;
  try {
    await api("POST", `/v1/tasks/${task.task_id}/release`, { lease_token: task.lease_token });
    say(`Task ${task.task_id} skipped: it goes back to the queue.`);
    moveOn = true;
  } catch (err) {
    say(err.message, true);
    moveOn = err.status === 409;
  } finally {
    state.busy = false;
  }
  if (moveOn) await advance(task);
}

// --- answers, undo, tallies ------------------------------------------------------------

async function submit(task, kind, classCode) {
  const body = { lease_token: task.lease_token, answer: kind };
  if (classCode) body.class_code = classCode;
  const out = await (await api("POST", `/v1/tasks/${task.task_id}/submit`, body)).json();
  state.history.push({ task, out });
  count(out.status === "difficult" ? "difficult" : out.class_code || classCode || task.suggested_class, 1);
  setActions();
  return out;
}

// Per-class and per-session tallies; a correction moves one answer between classes.
function count(key, n, answers = n) {
  if (key) state.tally[key] = (state.tally[key] || 0) + n;
  state.answered += answers;
  const parts = Object.entries(state.tally).filter(([, v]) => v > 0)
    .map(([k, v]) => `${k === "difficult" ? "too difficult" : k} ${v}`);
  $("tally").textContent = `this session: ${state.answered} answers` + (parts.length ? ` · ${parts.join(" · ")}` : "");
  renderCard();
}

// Undo reopens the last labelled answer and corrects it through the audited relabel
// call (PUT /v1/cells/{id}/label): both the answer and the correction stay in the log.
async function undo() {
  if (state.busy || state.mode === "correcting") return;
  const last = state.history[state.history.length - 1];
  if (!last) return say("Nothing to undo yet.", true);
  if (last.out.status !== "labelled") {
    return say(`Task ${last.task.task_id} is ${last.out.status}: only a label can be corrected.`, true);
  }
  state.resume = { mode: state.mode, task: state.task };
  await showSingle(last.task, last);
}

async function correct(classCode) {
  const undoing = state.correcting;
  state.busy = true;
  try {
    const cell = undoing.task.cell.id;
    const after = await (await api("PUT", `/v1/cells/${cell}/label`, {
      class_code: classCode, note: "undo on the reviewer's page",
    })).json();
    state.history.pop();
    count(undoing.out.class_code, -1, 0);
    count(after.class_code, 1, 0);
    say(`Cell ${cell} corrected to ${after.class_code}.`);
  } catch (err) {
    say(err.message, true);
  } finally {
    state.busy = false;
  }
  await leaveCorrection();
}

async function leaveCorrection() {
  const resume = state.resume;
  state.correcting = null;
  state.resume = null;
  if (resume && resume.mode === "gallery" && state.page.length) {
    state.mode = "gallery";
    $("task").hidden = true;
    $("gallery").hidden = false;
    setActions();
    return focusTile(state.active);
  }
  if (resume && resume.task) return showSingle(resume.task);
  return load();
}

function chooseClass(code) {
  if (state.mode === "gallery") return setTile("correct", code);
  if (state.mode === "correcting") return correct(code);
  return answer("correct", code);
}

function renderCard() {
  $("card-rows").replaceChildren(
    ...state.classes.map((c) => {
      const tr = document.createElement("tr");
      for (const text of [c.key ? keyLabel(c.key) : "", c.code, c.name, c.lineage, state.tally[c.code] || 0]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }),
  );
}

function toggleCard() {
  const card = $("card");
  card.hidden = !card.hidden;
  $("card-toggle").setAttribute("aria-expanded", String(!card.hidden));
}

function setActions() {
  const single = state.mode === "single";
  $("confirm").hidden = state.mode === "gallery";
  $("confirm").disabled = !single || !suggestionOf(state.task);
  $("difficult").disabled = !(single || state.mode === "gallery");
  $("skip").disabled = !single;
  $("undo").disabled = !state.history.length || state.mode === "correcting";
  for (const id of ["field-toggle", "zoom-in", "zoom-out"]) $(id).disabled = state.mode === "gallery" || !state.task;
}

// --- keyboard ---------------------------------------------------------------------------

const ACTIONS = {
  KeyA: () => (state.mode === "gallery" ? acceptPage() : answer("confirm")),
  KeyD: () => (state.mode === "gallery" ? setTile("difficult") : answer("difficult")),
  KeyS: () => skip(),
  KeyZ: () => undo(),
  KeyF: () => toggleField(),
  KeyH: () => toggleCard(),
  Equal: () => zoom(1),
  NumpadAdd: () => zoom(1),
  Minus: () => zoom(-1),
  NumpadSubtract: () => zoom(-1),
};

document.addEventListener("keydown", (ev) => {
  if ($("review").hidden || ev.repeat) return;
  if (!["Shift", "Control", "Alt", "Meta"].includes(ev.key)) state.keystrokes += 1;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const target = ev.target;
  // Form controls keep every key (typing, choosing, toggling).
  if (target.closest && target.closest("input, select, textarea, [contenteditable]")) return;
  const onTile = target.classList && target.classList.contains("tile");
  const onControl = target.closest && target.closest("button, a, summary") && !onTile;
  if (ev.code === "Escape" && state.mode === "correcting") return void leaveCorrection();
  // Arrows move between the gallery's cells (a composite widget: not a shortcut).
  if (state.mode === "gallery" && !onControl &&
      ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "Home", "End"].includes(ev.code)) {
    ev.preventDefault();
    return moveInGallery(ev.code);
  }
  if (state.mode === "gallery" && onTile && ev.code === "Backspace") {
    ev.preventDefault();
    return setTile("confirm");
  }
  if (!state.shortcuts) return;
  // Enter and Space belong to the focused button (a class button answers its class);
  // Enter confirms only when nothing that takes it has the focus.
  if (ev.code === "Enter" || ev.code === "NumpadEnter") {
    if (onControl || onTile) return;
    ev.preventDefault();
    return void ACTIONS.KeyA();
  }
  const code = ev.code.startsWith("Numpad") && /\d$/.test(ev.code) ? `Digit${ev.code.slice(-1)}` : ev.code;
  const action = ACTIONS[code];
  const cls = state.classes.find((c) => c.key === code);
  if (!action && !cls) return;
  ev.preventDefault();
  const run = action ? action() : chooseClass(cls.code);
  Promise.resolve(run).catch((err) => say(err.message, true));
});

// --- wiring ---------------------------------------------------------------------------

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
const guard = (fn) => () => Promise.resolve(fn()).catch((err) => say(err.message, true));
$("confirm").addEventListener("click", guard(() => answer("confirm")));
$("difficult").addEventListener("click", guard(() => ACTIONS.KeyD()));
$("skip").addEventListener("click", guard(skip));
$("undo").addEventListener("click", guard(undo));
$("field-toggle").addEventListener("click", guard(toggleField));
$("zoom-in").addEventListener("click", () => zoom(1));
$("zoom-out").addEventListener("click", () => zoom(-1));
$("card-toggle").addEventListener("click", toggleCard);
$("accept-page").addEventListener("click", guard(acceptPage));
$("again").addEventListener("click", guard(load));
$("kind-picker").addEventListener("change", guard(load));
$("lab-picker").addEventListener("change", guard(load));
$("shortcuts").addEventListener("change", () => {
  state.shortcuts = $("shortcuts").checked;
  localStorage.setItem("bmcell-shortcuts", state.shortcuts ? "on" : "off");
});
$("sign-out").addEventListener("click", signOut);

if (state.token) start().catch((err) => say(err.message, true));
else signOut();
