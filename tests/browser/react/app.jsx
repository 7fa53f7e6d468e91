// The test page of tests/browser/test_react.py: the hooks of jobwire-react in
// <StrictMode>, driven from Python through window.app and reporting every committed
// render to window.recordRender.
import { Component, StrictMode, useEffect, useLayoutEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { JobwireProvider, useJob, useJobs, useJobwire, useSubmit } from "jobwire-react";

function record(render) {
  window.recordRender?.(render);
}

// One job as a component shows it; `name` tells the test which component rendered.
function JobView({ name, id }) {
  const snap = useJob(id);
  const shown = snap && !snap.error ? snap : null;
  useLayoutEffect(() => {
    record({ name, prop: id, id: shown?.id ?? null, seq: shown?.seq ?? 0,
      status: shown?.status ?? null, gone: Boolean(snap?.error) });
  });
  return (
    <p data-testid="job" data-name={name} data-prop={id ?? ""} data-job-id={shown?.id ?? ""}
       data-status={shown?.status ?? ""} data-seq={shown?.seq ?? 0}>
      {name}: {shown ? `${shown.id} ${shown.status}` : "loading"}
    </p>
  );
}

function Submitter() {
  const { submit, pending, error, created, job } = useSubmit("extract_post");
  const verdict = pending ? "starting" : error ? `error: ${error.message}`
    : created === false ? "already running" : created ? "started" : "";
  return (
    <section>
      <input data-testid="url" />
      <button data-testid="submit" type="button"
              onClick={() => submit({ url: document.querySelector("[data-testid=url]").value })}>
        Extract
      </button>
      <span data-testid="verdict" data-job-id={job?.id ?? ""}>{verdict}</span>
      <JobView name="submitted" id={job?.id ?? null} />
    </section>
  );
}

// The session's active jobs after a reload, each followed live.
function Recovered() {
  const client = useJobwire();
  const [ids, setIds] = useState(null);
  useEffect(() => {
    let live = true;
    client.recover().then((jobs) => live && setIds(jobs.map((j) => j.id)));
    return () => { live = false; };
  }, [client]);
  if (ids === null) return null;
  return (
    <section data-testid="recovered" data-count={ids.length}>
      {ids.map((id) => <JobView key={id} name="recovered" id={id} />)}
    </section>
  );
}

function Feed() {
  const jobs = useJobs({ status: "active" });
  return (
    <ul data-testid="feed" data-ready={jobs !== undefined}>
      {(jobs ?? []).map((j) => <li key={j.id} data-testid="feed-job" data-job-id={j.id}>{j.id}</li>)}
    </ul>
  );
}

class Boundary extends Component {
  state = { error: null };
  static getDerivedStateFromError(error) {
    return { error };
  }
  render() {
    const { error } = this.state;
    return error ? <p data-testid="boundary-error">{error.message}</p> : this.props.children;
  }
}

function App() {
  // Views keyed by position: a new id reaches the same component instance, as when a
  // page's "current job" changes.
  const [watched, setWatched] = useState([]);
  useEffect(() => { window.app = { watch: setWatched }; }, []);
  const feed = new URLSearchParams(location.search).has("feed");
  return (
    <>
      <Submitter />
      <section data-testid="watched">
        {watched.map((id, i) => <JobView key={i} name={`view${i}`} id={id} />)}
      </section>
      <Recovered />
      {feed && <Boundary><Feed /></Boundary>}
    </>
  );
}

// One guest session for the context's tabs (as the dashboard does), then the app.
async function start() {
  await navigator.locks.request("jobwire-session", async () => {
    const r = await fetch("/api/jobs?limit=1");
    if (r.status === 401) await fetch("/api/sessions", { method: "POST" });
  });
  createRoot(document.getElementById("root")).render(
    <StrictMode>
      <JobwireProvider>
        <App />
      </JobwireProvider>
    </StrictMode>,
  );
  document.body.dataset.ready = "true";
}

start();
