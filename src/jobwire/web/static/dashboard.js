// The dashboard at `/`: start demo jobs and follow every job of this session live.
// Each job is one card keyed by its id, fed only by jobwire.js snapshots of that job.
import { createClient, isTerminal } from "./jobwire.js";

// Where jobwire is served: this module is at <base>static/dashboard.js, so the page works
// unchanged when a host app mounts jobwire under a path ("/jobs/").
const BASE = new URL("..", import.meta.url).href;

const CHIP_LIMIT = 20; // up to this many items are shown by name, more as small cells
const CELL_LIMIT = 1000; // cells beyond this are summarised as "+N more"
const RECENT = 30;

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const list = $("jobs");
const cards = new Map(); // job id -> { el, latest, unwatch, scheduled }

// Tabs opened at once must not each create a guest session: the second cookie would
// replace the first and split the tabs' jobs between two owners.
async function ensureSession() {
  const check = async () => {
    const r = await fetch(`${BASE}api/jobs?limit=1`, { credentials: "same-origin" });
    if (r.status === 401) await fetch(`${BASE}api/sessions`, { method: "POST", credentials: "same-origin" });
  };
  if (navigator.locks) await navigator.locks.request("jobwire-session", check);
  else await check();
}

function showError(err) {
  const box = $("form-error");
  box.textContent = err ? String(err.message ?? err) : "";
  box.hidden = !err;
}

function addJob(job, { first = false } = {}) {
  if (cards.has(job.id)) return;
  const el = document.getElementById("job-card").content.firstElementChild.cloneNode(true);
  el.dataset.jobId = job.id;
  el.querySelector(".task").textContent = job.task;
  el.querySelector(".id").textContent = job.id.slice(0, 8);
  const card = { el, latest: null, scheduled: false, unwatch: null };
  cards.set(job.id, card);
  $("cancel", el).onclick = () => act(card, () => client.cancel(job.id));
  $("delete", el).onclick = () => act(card, async () => {
    await client.remove(job.id);
    removeJob(job.id);
  });
  if (first) list.prepend(el);
  else list.append(el);
  $("empty").hidden = true;
  card.unwatch = client.watch(job.id, (snapshot) => {
    const initial = card.latest === null;
    card.latest = snapshot;
    if (initial) render(card); // no empty card, not even for a frame
    else if (!card.scheduled) {
      card.scheduled = true;
      requestAnimationFrame(() => { card.scheduled = false; render(card); });
    }
  }, { onError: () => removeJob(job.id) }); // deleted elsewhere or pruned
}

function removeJob(id) {
  const card = cards.get(id);
  if (!card) return;
  card.unwatch();
  card.el.remove();
  cards.delete(id);
  $("empty").hidden = cards.size > 0;
}

async function act(card, fn) {
  for (const b of card.el.querySelectorAll("button")) b.disabled = true;
  try {
    await fn();
    showError(null);
  } catch (err) {
    showError(err);
  } finally {
    if (card.latest) render(card);
  }
}

function render({ el, latest: job }) {
  const { total, done, failed } = job.progress;
  const terminal = isTerminal(job.status);
  Object.assign(el.dataset, {
    status: job.status, seq: job.seq, done, failed, total,
  });
  const status = $("status", el);
  status.dataset.status = job.status;
  status.textContent = job.cancel_requested && !terminal ? "cancelling" : job.status;

  const bar = $("progress", el);
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(done + failed));
  bar.querySelector(".done").style.width = `${total ? (100 * done) / total : 0}%`;
  bar.querySelector(".failed").style.width = `${total ? (100 * failed) / total : 0}%`;
  $("counts", el).textContent =
    `${done + failed} / ${total} items · ${failed} failed · attempt ${job.attempt} · seq ${job.seq}`;

  renderItems($("items", el), job.items);

  const error = $("error", el);
  error.hidden = !job.error;
  error.textContent = job.error ?? "";
  const result = $("result", el);
  result.hidden = job.result == null;
  result.querySelector("pre").textContent =
    job.result == null ? "" : JSON.stringify(job.result, null, 2);

  $("cancel", el).disabled = terminal || job.cancel_requested;
  $("delete", el).disabled = !terminal;
}

function renderItems(box, items) {
  const chips = items.length <= CHIP_LIMIT;
  const shown = items.slice(0, CELL_LIMIT).map((it) => {
    const li = document.createElement("li");
    li.className = chips ? "chip" : "cell";
    li.dataset.state = it.status;
    li.title = `${it.ref}: ${it.status}${it.error ? ` (${it.error})` : ""}`;
    if (chips) li.textContent = it.ref;
    return li;
  });
  if (items.length > CELL_LIMIT) {
    const more = document.createElement("li");
    more.className = "more";
    more.textContent = `+${items.length - CELL_LIMIT} more`;
    shown.push(more);
  }
  box.replaceChildren(...shown);
}

// Submits in flight: the list waits for them, so a job started here gets its card from
// the submit's answer (its first state) even when the feed announces it first.
let submitting = Promise.resolve();

function start(task, input) {
  submitting = Promise.all([submitting, (async () => {
    try {
      const { job } = await client.submit(task, input);
      addJob(job, { first: true });
      showError(null);
    } catch (err) {
      showError(err);
    }
  })()]);
}

function showConnection(state) {
  const box = $("connection");
  box.dataset.state = state;
  box.textContent = state;
}

document.getElementById("tracks-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const n = Number(new FormData(e.target).get("count"));
  const stamp = Date.now().toString(36);
  start("analyze_tracks", { tracks: Array.from({ length: n }, (_, i) => `track-${stamp}-${i}`) });
});
document.getElementById("post-form").addEventListener("submit", (e) => {
  e.preventDefault();
  start("extract_post", { url: new FormData(e.target).get("url") });
});
$("post-url").value = `${BASE}demo/posts/${Math.floor(Math.random() * 5)}`;

await ensureSession();
const client = createClient({ url: BASE });
window.jobwire = client; // for the browser tests and the curious
client.onState(showConnection);
client.connect();

// The session's jobs, live: those started or deleted in another tab come and go here too.
// Active ones all show, ended ones the most recent. A card goes only once the feed has
// listed its job and then not: one just submitted here may not have reached it yet.
let listed = new Set();
let latest = [];
function showList() {
  const shown = latest.filter((job, i) => i < RECENT || !isTerminal(job.status));
  const ids = new Set(shown.map((job) => job.id));
  for (const id of listed) if (!ids.has(id)) removeJob(id);
  listed = ids;
  shown.forEach((job) => addJob(job));
  list.append(...shown.map((job) => cards.get(job.id).el)); // newest first
  document.body.dataset.ready = "true";
}
client.jobs({}, (jobs) => {
  latest = jobs;
  submitting.then(showList); // (always the latest list, whichever submit ends first)
});
