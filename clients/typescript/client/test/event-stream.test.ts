import { describe, expect, it } from "vitest";
import { EventStreamParser, httpBase, type StreamEvent } from "../src/transport-sse.js";

function parse(chunks: string[]): { events: StreamEvent[]; parser: EventStreamParser } {
  const events: StreamEvent[] = [];
  const parser = new EventStreamParser((e) => events.push(e));
  for (const c of chunks) parser.push(c);
  return { events, parser };
}

const STREAM =
  "retry: 2893\n\nevent: connected\ndata: {\"type\":\"connected\"}\n\n: ping\n\n" +
  "id: 0:Ab,\nevent: subscribed\ndata: {\"type\":\"subscribed\",\"channel\":\"a\"}\n\n" +
  "id: 1:Ab,\nevent: message\ndata: {\"type\":\"message\",\"offset\":1}\n\n";

describe("event-stream parser", () => {
  it("reads the edge's events with their ids", () => {
    const { events, parser } = parse([STREAM]);
    expect(events.map((e) => [e.event, e.id])).toEqual([
      ["connected", ""],
      ["subscribed", "0:Ab,"],
      ["message", "1:Ab,"],
    ]);
    expect(JSON.parse(events[2]!.data)).toEqual({ type: "message", offset: 1 });
    expect(parser.lastId).toBe("1:Ab,");
  });

  it("gives the same events however the stream is split", () => {
    const whole = parse([STREAM]).events;
    for (let size = 1; size < 12; size++) {
      const chunks = [];
      for (let i = 0; i < STREAM.length; i += size) chunks.push(STREAM.slice(i, i + size));
      expect(parse(chunks).events).toEqual(whole);
    }
  });

  it("accepts CRLF and CR line ends, also with CR and LF in different chunks", () => {
    const crlf = STREAM.replace(/\n/g, "\r\n");
    expect(parse([crlf]).events).toEqual(parse([STREAM]).events);
    const cr = STREAM.replace(/\n/g, "\r");
    expect(parse([cr]).events).toEqual(parse([STREAM]).events);
    // Split exactly between every CR and its LF.
    expect(parse(crlf.split(/(?<=\r)/)).events).toEqual(parse([STREAM]).events);
    // An empty chunk between them changes nothing.
    expect(parse(["data: x\r", "", "\n\r\n"]).events).toEqual([{ event: "message", data: "x", id: "" }]);
  });

  it("joins data lines, skips comments, unknown fields and events without data", () => {
    const { events } = parse([":hello\nfoo: bar\ndata: a\ndata\ndata:  b\n\nevent: empty\n\n"]);
    expect(events).toEqual([{ event: "message", data: "a\n\n b", id: "" }]);
  });

  it("strips a leading BOM and keeps the last id across events", () => {
    const { events } = parse(["\ufeffid: 7\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n"]);
    expect(events.map((e) => e.id)).toEqual(["7", "7", ""]);
  });

  it("does not dispatch an event before its blank line", () => {
    const { events } = parse(["data: x\n"]);
    expect(events).toEqual([]);
  });
});

describe("httpBase", () => {
  it("derives the HTTP base from the WebSocket URL", () => {
    expect(httpBase("ws://h:8080/ws")).toBe("http://h:8080");
    expect(httpBase("wss://edge.example/ws")).toBe("https://edge.example");
    expect(httpBase("wss://edge.example/fanout/ws?x=1")).toBe("https://edge.example/fanout");
    expect(httpBase("ws://h/")).toBe("http://h");
  });
});
