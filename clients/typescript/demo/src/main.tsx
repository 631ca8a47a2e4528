/**
 * The demo: the three things web apps build on fanout, each on the hooks.
 * - Jobs: "Start a job" (or a CSV upload) asks the backend to run one (a worker
 *   publishes its progress); `useJobProgress` draws the bar until the job completes.
 * - Notifications: the user's own channel `user:<id>` through `useChannel`.
 * - Chat: `chat:lobby` with `useChannel` and `publish`, who is here with
 *   `usePresence`, typing indicators on `typing:lobby` (nothing kept).
 * Rendered under StrictMode; the token comes from the backend (`/token`), and a fresh
 * one whenever the SDK asks.
 */
import { StrictMode, useCallback, useEffect, useRef, useState } from "react";
import { createRoot } from "react-dom/client";
import { Fanout } from "@fanout/client";
import {
  FanoutProvider,
  useChannel,
  useConnectionState,
  useFanout,
  useJobProgress,
  usePresence,
} from "@fanout/react";

const params = new URLSearchParams(location.search);
const user = params.get("user") ?? `guest${Math.floor(Math.random() * 1000)}`;
const edgeUrl = params.get("edge") ?? (window as { FANOUT_URL?: string }).FANOUT_URL ?? "ws://127.0.0.1:8080/ws";

async function getToken(): Promise<string> {
  const r = await fetch(`/token?user=${encodeURIComponent(user)}`);
  if (!r.ok) throw new Error(`token: ${r.status}`);
  return r.text();
}

function Header() {
  const state = useConnectionState();
  return (
    <header>
      <strong>fanout demo</strong>
      <span>signed in as {user}</span>
      <span className={`state ${state}`} data-testid="state">
        {state}
      </span>
    </header>
  );
}

function Job({ id }: { id: string }) {
  const { latest, status, completed } = useJobProgress<{ pct?: number; status?: string; message?: string }>(id);
  // A worker's `completed` message carries a result, not a percentage.
  const pct = status === "succeeded" ? 100 : Math.round(latest?.pct ?? 0);
  return (
    <div
      className={`job ${status ?? ""}`}
      data-testid={`job-${id}`}
      data-status={status ?? ""}
      data-completed={completed}
      data-pct={pct}
    >
      job {id}: {status ?? "waiting"} {pct}%{completed ? " ✓" : ""}
      {latest?.message ? <small> — {latest.message}</small> : null}
      <div className="bar">
        <div style={{ width: `${pct}%` }} />
      </div>
    </div>
  );
}

function Jobs() {
  const [jobs, setJobs] = useState<string[]>([]);
  /** Starts a job on the backend: a CSV to process (one progress step per row), or none. */
  const start = async (csv?: File) => {
    const r = await fetch(`/jobs?user=${encodeURIComponent(user)}`, {
      method: "POST",
      ...(csv ? { body: csv, headers: { "content-type": "text/csv" } } : {}),
    });
    if (!r.ok) throw new Error(`start a job: ${r.status} ${await r.text()}`);
    const { id } = (await r.json()) as { id: string };
    setJobs((j) => [id, ...j]);
  };
  return (
    <section>
      <h2>Jobs</h2>
      <button onClick={() => void start()} data-testid="start-job">
        Start a job
      </button>{" "}
      <label>
        or enrich a CSV:{" "}
        <input
          type="file"
          accept=".csv,text/csv"
          data-testid="upload"
          onChange={(e) => {
            const file = e.target.files?.[0];
            e.target.value = "";
            if (file) void start(file);
          }}
        />
      </label>
      {jobs.map((id) => (
        <Job key={id} id={id} />
      ))}
    </section>
  );
}

function Notifications() {
  const [items, setItems] = useState<string[]>([]);
  useChannel<{ text: string }>(`user:${user}`, (m) => setItems((l) => [m.data.text, ...l].slice(0, 50)));
  const ask = () => fetch(`/notify?user=${encodeURIComponent(user)}`, { method: "POST" });
  return (
    <section>
      <h2>Notifications</h2>
      <button onClick={ask} data-testid="notify">
        Send me one
      </button>
      <ul data-testid="notifications">
        {items.map((t, i) => (
          <li key={i}>{t}</li>
        ))}
      </ul>
    </section>
  );
}

function Chat() {
  const client = useFanout();
  const [lines, setLines] = useState<{ user: string; text: string }[]>([]);
  const [typing, setTyping] = useState<Record<string, number>>({});
  const [text, setText] = useState("");
  const lastTyping = useRef(0);
  useChannel<{ user: string; text: string }>("chat:lobby", (m) => setLines((l) => [...l, m.data].slice(-100)), {
    last: 20,
  });
  useChannel<{ user: string }>("typing:lobby", (m) => {
    if (m.data.user !== user) setTyping((t) => ({ ...t, [m.data.user]: Date.now() }));
  });
  const { clients } = usePresence("chat:lobby", { intervalMs: 2000 });
  // Typing indicators fade after 3 s.
  useEffect(() => {
    const timer = setInterval(() => {
      setTyping((t) => Object.fromEntries(Object.entries(t).filter(([, at]) => Date.now() - at < 3000)));
    }, 500);
    return () => clearInterval(timer);
  }, []);
  const onChange = useCallback(
    (v: string) => {
      setText(v);
      if (Date.now() - lastTyping.current > 1000) {
        lastTyping.current = Date.now();
        client.publish("typing:lobby", { user }).catch(() => {});
      }
    },
    [client],
  );
  const send = async (e: React.FormEvent) => {
    e.preventDefault();
    if (!text) return;
    await client.publish("chat:lobby", { user, text });
    setText("");
  };
  const members = [...new Set(clients.map((c) => c.user))].sort();
  const typers = Object.keys(typing);
  return (
    <section>
      <h2>Chat: lobby</h2>
      <div className="members" data-testid="members">
        here: {members.join(", ")}
      </div>
      <ul data-testid="chat">
        {lines.map((l, i) => (
          <li key={i}>
            <b>{l.user}</b>: {l.text}
          </li>
        ))}
      </ul>
      <div className="typing" data-testid="typing">
        {typers.length ? `${typers.join(", ")} typing…` : ""}
      </div>
      <form onSubmit={send}>
        <input value={text} onChange={(e) => onChange(e.target.value)} placeholder="Say something" data-testid="say" />
      </form>
    </section>
  );
}

async function main() {
  const client = new Fanout({ url: edgeUrl, token: await getToken(), getToken });
  (window as { fanout?: Fanout }).fanout = client;
  createRoot(document.getElementById("root")!).render(
    <StrictMode>
      <FanoutProvider client={client}>
        <Header />
        <main>
          <Jobs />
          <Notifications />
          <Chat />
        </main>
      </FanoutProvider>
    </StrictMode>,
  );
}

void main();
