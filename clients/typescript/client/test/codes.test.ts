import { describe, expect, it } from "vitest";
import { closeAction, statusCloseCode } from "../src/codes.js";

describe("close codes", () => {
  it("follow the protocol's table", () => {
    const table: Record<number, string> = {
      1001: "soon",
      1006: "backoff",
      1011: "backoff",
      1013: "backoff",
      4008: "slow",
      4009: "backoff",
      4004: "token",
      4001: "token_once",
      1002: "stop",
      1007: "stop",
      1008: "stop",
      1009: "stop",
      4003: "stop",
      4010: "stop",
    };
    for (const [code, action] of Object.entries(table)) expect([code, closeAction(Number(code))]).toEqual([code, action]);
  });

  it("back off on codes they do not know", () => {
    expect(closeAction(1000)).toBe("backoff");
    expect(closeAction(4999)).toBe("backoff");
  });

  it("map a refused event stream's status to the close code it stands for", () => {
    expect(statusCloseCode(401)).toBe(4001);
    expect(statusCloseCode(403)).toBe(4003);
    expect(statusCloseCode(400)).toBe(4003);
    expect(statusCloseCode(429)).toBe(4008);
    expect(statusCloseCode(503)).toBe(1013);
    expect(statusCloseCode(502)).toBe(1013);
  });
});
