import { describe, expect, it } from "vitest";
import { FanoutError } from "../src/errors.js";
import { Subscription } from "../src/subscription.js";
import type { Message, Position } from "../src/types.js";

function make(opts: { since?: Position; last?: number } = {}) {
  const got: Message[] = [];
  const resets: Position[] = [];
  const errors: FanoutError[] = [];
  let completed = 0;
  let detached: boolean[] = [];
  const sub = new Subscription("c:1", {
    ...opts,
    onMessage: (m) => got.push(m),
    onReset: (p) => resets.push(p),
    onCompleted: () => completed++,
    onError: (e) => errors.push(e),
  }, (_s, byApp) => detached.push(byApp));
  return { sub, got, resets, errors, completed: () => completed, detached: () => detached };
}

const msg = (offset: number, epoch = "E", data: unknown = offset) => ({ type: "message", channel: "c:1", data, offset, epoch, ts: 1 });
const subscribed = (offset: number, epoch = "E", recovered?: boolean) => ({
  type: "subscribed",
  channel: "c:1",
  offset,
  epoch,
  ...(recovered === undefined ? {} : { recovered }),
});

describe("subscription positions", () => {
  it("asks with the options first, then with its position", () => {
    const { sub } = make({ last: 5 });
    expect(sub.request()).toEqual({ last: 5 });
    sub.subscribed(subscribed(17));
    expect(sub.position).toEqual({ offset: 17, epoch: "E" });
    // Reconnected before any message: from the subscribed position.
    expect(sub.request()).toEqual({ since: { offset: 17, epoch: "E" } });
    const s2 = make({ since: { offset: 3, epoch: "X" } }).sub;
    expect(s2.request()).toEqual({ since: { offset: 3, epoch: "X" } });
  });

  it("delivers what follows a fresh subscribe (the latest state, `last` N), then moves with each message", () => {
    const { sub, got } = make({ last: 2 });
    sub.request();
    sub.subscribed(subscribed(17));
    sub.message(msg(16));
    sub.message(msg(17));
    sub.message(msg(18));
    expect(got.map((m) => m.offset)).toEqual([16, 17, 18]);
    expect(sub.position).toEqual({ offset: 18, epoch: "E" });
    expect(got[0]).toEqual({ channel: "c:1", data: 16, offset: 16, epoch: "E", ts: 1 });
  });

  it("drops what it already delivered when a recovery replays it", () => {
    const { sub, got, resets } = make();
    sub.request();
    sub.subscribed(subscribed(0));
    sub.message(msg(1));
    sub.message(msg(2));
    expect(sub.request()).toEqual({ since: { offset: 2, epoch: "E" } });
    sub.subscribed(subscribed(4, "E", true));
    for (const o of [2, 1, 3, 3, 4]) sub.message(msg(o));
    expect(got.map((m) => m.offset)).toEqual([1, 2, 3, 4]);
    expect(resets).toEqual([]);
  });

  it("tells the app to reload when history could not cover the gap, and continues from the new position", () => {
    const { sub, got, resets } = make();
    sub.request();
    sub.subscribed(subscribed(0, "E"));
    sub.message(msg(1));
    sub.request();
    sub.subscribed(subscribed(7, "F", false));
    expect(resets).toEqual([{ offset: 7, epoch: "F" }]);
    expect(sub.position).toEqual({ offset: 7, epoch: "F" });
    sub.message(msg(7, "F"));
    sub.message(msg(8, "F"));
    expect(got.map((m) => `${m.offset}${m.epoch}`)).toEqual(["1E", "8F"]);
  });

  it("resets on an unsolicited recovered:false while subscribed", () => {
    const { sub, got, resets } = make();
    sub.request();
    sub.subscribed(subscribed(3));
    sub.message(msg(4));
    sub.subscribed(subscribed(0, "G", false));
    expect(resets).toEqual([{ offset: 0, epoch: "G" }]);
    sub.message(msg(1, "G"));
    expect(got.map((m) => m.offset)).toEqual([4, 1]);
    expect(sub.position).toEqual({ offset: 1, epoch: "G" });
  });

  it("delivers a new epoch's messages even at lower offsets", () => {
    const { sub, got } = make();
    sub.request();
    sub.subscribed(subscribed(5));
    sub.message(msg(6));
    sub.message(msg(1, "N"));
    expect(got.map((m) => m.offset)).toEqual([6, 1]);
  });

  it("passes raw messages (no offset) through without moving", () => {
    const { sub, got } = make();
    sub.request();
    sub.subscribed(subscribed(5));
    sub.message({ type: "message", channel: "c:1", data: "raw" });
    expect(got).toEqual([{ channel: "c:1", data: "raw" }]);
    expect(sub.position).toEqual({ offset: 5, epoch: "E" });
  });

  it("ignores messages before its subscribed and after its end", () => {
    const { sub, got } = make();
    sub.request();
    expect(sub.message(msg(1))).toBe(false);
    sub.subscribed(subscribed(0));
    sub.unsubscribe();
    expect(sub.message(msg(1))).toBe(false);
    expect(got).toEqual([]);
  });

  it("ends on completion or refusal, telling the app once", () => {
    const a = make();
    a.sub.request();
    a.sub.subscribed(subscribed(0));
    a.sub.end("completed");
    a.sub.end("completed");
    expect(a.completed()).toBe(1);
    expect(a.sub.state).toBe("ended");
    expect(a.detached()).toEqual([false]);

    const b = make();
    b.sub.end("forbidden", "not yours");
    expect(b.errors.map((e) => [e.code, e.message])).toEqual([["forbidden", "not yours"]]);
    expect(b.errors[0]).toBeInstanceOf(FanoutError);

    const c = make();
    c.sub.unsubscribe();
    expect(c.detached()).toEqual([true]);
    expect(c.completed() + c.errors.length).toBe(0);
  });
});
