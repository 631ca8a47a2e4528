/**
 * React bindings for `@fanout/client`: a provider for one client, and hooks that
 * subscribe while a component is mounted. Every hook is safe under StrictMode (an
 * effect that mounts, unmounts and mounts again subscribes, unsubscribes and
 * subscribes again — never twice at once), unsubscribes on unmount, takes `skip`, and
 * re-renders only for what the component asked for: `useChannel` hands messages to a
 * callback (no render per message), `useJobProgress` and `usePresence` hold state.
 */
import {
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import type { Fanout, FanoutError, Message, Position, PresenceClient } from "@fanout/client";

type Client = Fanout;
type ConnectionState = Client["state"];

const FanoutContext = createContext<Client | null>(null);

export interface FanoutProviderProps {
  client: Client;
  /** Connect when the provider mounts (default true). The client is never closed by
   *  the provider: it belongs to the app, and StrictMode unmounts providers too. */
  connect?: boolean;
  children?: ReactNode;
}

export function FanoutProvider({ client, connect = true, children }: FanoutProviderProps) {
  useEffect(() => {
    if (connect && client.state === "disconnected") client.connect();
  }, [client, connect]);
  return createElement(FanoutContext.Provider, { value: client }, children);
}

/** The provider's client. */
export function useFanout(): Client {
  const client = useContext(FanoutContext);
  if (!client) throw new Error("useFanout: no <FanoutProvider client={…}> above this component");
  return client;
}

/** The connection state; re-renders when it changes. */
export function useConnectionState(): ConnectionState {
  const client = useFanout();
  const subscribe = useCallback((onChange: () => void) => client.on("state", onChange), [client]);
  return useSyncExternalStore(subscribe, () => client.state, () => client.state);
}

export interface UseChannelOptions {
  /** Do not subscribe (yet): e.g. until the id of a job is known. */
  skip?: boolean;
  /** Ask for the last N messages of the channel's history on subscribe. */
  last?: number;
  onReset?: (position: Position) => void;
  onCompleted?: () => void;
  onError?: (error: FanoutError) => void;
}

/**
 * Subscribes to `channel` while mounted (and not `skip`), calling `onMessage` for each
 * message, once and in order. The callbacks may change on every render without
 * resubscribing; changing `channel`, `skip` or `last` resubscribes.
 */
export function useChannel<T = unknown>(
  channel: string | null | undefined,
  onMessage: (message: Message<T>) => void,
  options: UseChannelOptions = {},
): void {
  const client = useFanout();
  const handlers = useRef({ onMessage, options });
  handlers.current = { onMessage, options };
  const { skip = false, last } = options;
  useEffect(() => {
    if (skip || !channel) return;
    const sub = client.subscribe<T>(channel, {
      ...(last !== undefined ? { last } : {}),
      onMessage: (m: Message<T>) => handlers.current.onMessage(m),
      onReset: (p: Position) => handlers.current.options.onReset?.(p),
      onCompleted: () => handlers.current.options.onCompleted?.(),
      onError: (e: FanoutError) => handlers.current.options.onError?.(e),
    });
    return () => sub.unsubscribe();
  }, [client, channel, skip, last]);
}

export interface JobProgress<T = Record<string, unknown>> {
  /** The newest message's data, or null before the first. */
  latest: T | null;
  /** `data.status` of the newest message (`running`, `succeeded`, `failed`, `cancelled` …). */
  status: string | null;
  /** The job finished: the edge ended the subscription after its terminal status. */
  completed: boolean;
  /** The edge could not replay what was missed: `latest` is what came after. */
  reset: boolean;
}

/** The progress of job `jobId` (channel `job_progress:<jobId>`); re-renders per event. */
export function useJobProgress<T = Record<string, unknown>>(
  jobId: string | number | null | undefined,
  options: { skip?: boolean } = {},
): JobProgress<T> {
  const [state, setState] = useState<JobProgress<T>>(initialJob);
  const channel = jobId === null || jobId === undefined ? null : `job_progress:${jobId}`;
  // A new job starts from nothing.
  useEffect(() => setState(initialJob), [channel]);
  useChannel<T>(
    channel,
    (m) => {
      const data = m.data;
      const status = (data as { status?: unknown } | null)?.status;
      setState((s) => ({
        ...s,
        latest: data,
        status: typeof status === "string" ? status : s.status,
      }));
    },
    {
      skip: options.skip,
      onCompleted: () => setState((s) => ({ ...s, completed: true })),
      onReset: () => setState((s) => ({ ...s, reset: true })),
    },
  );
  return state;
}

function initialJob<T>(): JobProgress<T> {
  return { latest: null, status: null, completed: false, reset: false };
}

export interface Presence {
  clients: PresenceClient[];
  loading: boolean;
  error: FanoutError | null;
}

/**
 * Who is subscribed to `channel`, on every node: read on mount and every `intervalMs`
 * (default 10 s) while mounted and connected, and again whenever the connection comes
 * back.
 */
export function usePresence(
  channel: string | null | undefined,
  options: { skip?: boolean; intervalMs?: number } = {},
): Presence {
  const client = useFanout();
  const state = useConnectionState();
  const { skip = false, intervalMs = 10_000 } = options;
  const [presence, setPresence] = useState<Presence>({ clients: [], loading: true, error: null });
  useEffect(() => {
    if (skip || !channel || state !== "connected") return;
    let live = true;
    const read = () =>
      client.presence(channel).then(
        (r) => live && setPresence({ clients: r.clients, loading: false, error: null }),
        (error: FanoutError) => live && setPresence((p) => ({ ...p, loading: false, error })),
      );
    read();
    const timer = setInterval(read, intervalMs);
    return () => {
      live = false;
      clearInterval(timer);
    };
  }, [client, channel, skip, intervalMs, state]);
  return presence;
}
