/**
 * The hooks against a fake client (what the hooks call is the client's public surface;
 * the real client against real edges is tested in a real browser in ../e2e): StrictMode
 * subscribes once at a time, unmount unsubscribes, `skip` waits, and `useChannel`
 * renders nothing per message.
 */
import { act, render } from "@testing-library/react";
import { StrictMode, useRef } from "react";
import { describe, expect, it } from "vitest";
import type { Fanout } from "@fanout/client";
import {
  FanoutProvider,
  useChannel,
  useConnectionState,
  useJobProgress,
  usePresence,
} from "../src/index.js";

type Handlers = {
  onMessage?: (m: unknown) => void;
  onCompleted?: () => void;
  onReset?: (p: unknown) => void;
};

class FakeClient {
  state: "disconnected" | "connecting" | "connected" | "closed" = "disconnected";
  connects = 0;
  live = new Map<string, Handlers[]>();
  log: string[] = [];
  private listeners = new Set<() => void>();
  connect() {
    this.connects++;
    this.setState("connected");
  }
  setState(s: FakeClient["state"]) {
    this.state = s;
    for (const l of this.listeners) l();
  }
  on(_event: "state", fn: () => void) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
  subscribe(channel: string, handlers: Handlers) {
    this.log.push(`+${channel}`);
    const list = this.live.get(channel) ?? [];
    list.push(handlers);
    this.live.set(channel, list);
    return {
      unsubscribe: () => {
        this.log.push(`-${channel}`);
        const l = this.live.get(channel) ?? [];
        l.splice(l.indexOf(handlers), 1);
      },
    };
  }
  emit(channel: string, data: unknown) {
    for (const h of this.live.get(channel) ?? []) h.onMessage?.({ channel, data });
  }
  complete(channel: string) {
    for (const h of this.live.get(channel) ?? []) h.onCompleted?.();
  }
  presenceReads = 0;
  async presence(channel: string) {
    this.presenceReads++;
    return { channel, clients: [{ client: "c1", user: "u1", node: "n1" }] };
  }
}

const wrap = (client: FakeClient, ui: React.ReactNode) => (
  <StrictMode>
    <FanoutProvider client={client as unknown as Fanout}>{ui}</FanoutProvider>
  </StrictMode>
);

describe("hooks", () => {
  it("useChannel subscribes once at a time under StrictMode and unsubscribes on unmount", () => {
    const client = new FakeClient();
    const got: unknown[] = [];
    let renders = 0;
    function Feed() {
      renders++;
      useChannel("user:1", (m) => got.push((m as { data: unknown }).data));
      return null;
    }
    const view = render(wrap(client, <Feed />));
    // StrictMode mounts, unmounts and mounts again: never two at once.
    expect(client.log).toEqual(["+user:1", "-user:1", "+user:1"]);
    expect(client.live.get("user:1")).toHaveLength(1);
    expect(client.connects).toBe(1);
    const before = renders;
    act(() => {
      for (let i = 1; i <= 5; i++) client.emit("user:1", i);
    });
    expect(got).toEqual([1, 2, 3, 4, 5]);
    expect(renders).toBe(before); // no render per message
    view.unmount();
    expect(client.live.get("user:1")).toHaveLength(0);
  });

  it("useChannel waits while skip, and keeps the newest callback without resubscribing", () => {
    const client = new FakeClient();
    const seen: string[] = [];
    function Feed({ skip, tag }: { skip: boolean; tag: string }) {
      useChannel("room:1", () => seen.push(tag), { skip });
      return null;
    }
    const view = render(wrap(client, <Feed skip tag="a" />));
    expect(client.log).toEqual([]);
    view.rerender(wrap(client, <Feed skip={false} tag="b" />));
    expect(client.live.get("room:1")).toHaveLength(1);
    const subscribes = client.log.filter((l) => l.startsWith("+")).length;
    view.rerender(wrap(client, <Feed skip={false} tag="c" />));
    expect(client.log.filter((l) => l.startsWith("+")).length).toBe(subscribes);
    act(() => client.emit("room:1", {}));
    expect(seen).toEqual(["c"]);
  });

  it("useJobProgress follows a job to completion", () => {
    const client = new FakeClient();
    const states: unknown[] = [];
    function Job() {
      const p = useJobProgress<{ pct?: number; status?: string }>("7");
      const last = useRef<unknown>(null);
      if (last.current !== p) states.push(p);
      last.current = p;
      return <span data-testid="s">{`${p.status}:${p.latest?.pct ?? ""}:${p.completed}`}</span>;
    }
    const view = render(wrap(client, <Job />));
    act(() => client.emit("job_progress:7", { status: "running", pct: 40 }));
    expect(view.getByTestId("s").textContent).toBe("running:40:false");
    act(() => {
      client.emit("job_progress:7", { status: "succeeded", pct: 100 });
      client.complete("job_progress:7");
    });
    expect(view.getByTestId("s").textContent).toBe("succeeded:100:true");
  });

  it("useConnectionState and usePresence follow the client", async () => {
    const client = new FakeClient();
    function Who() {
      const state = useConnectionState();
      const { clients } = usePresence("room:1");
      return <span data-testid="w">{`${state}:${clients.map((c) => c.user).join(",")}`}</span>;
    }
    const view = render(wrap(client, <Who />));
    await act(async () => {});
    expect(view.getByTestId("w").textContent).toBe("connected:u1");
    act(() => client.setState("connecting"));
    expect(view.getByTestId("w").textContent).toBe("connecting:u1");
  });
});
