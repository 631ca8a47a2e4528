import { describe, expect, it } from "vitest";
import { refreshDelay, tokenExp } from "../src/token.js";

const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
const jwt = (claims: unknown) => `${b64({ alg: "HS256" })}.${b64(claims)}.sig`;

describe("token exp", () => {
  it("is read from the payload without verifying", () => {
    expect(tokenExp(jwt({ sub: "1", exp: 1732290000 }))).toBe(1732290000);
  });

  it("survives base64url characters and missing padding", () => {
    // A payload whose encoding has '-' / '_' and needs padding.
    const t = jwt({ sub: "ü?>>>", exp: 42, x: "~~~" });
    expect(tokenExp(t)).toBe(42);
  });

  it("is null for a token without exp or not a JWT", () => {
    expect(tokenExp(jwt({ sub: "1" }))).toBeNull();
    expect(tokenExp(jwt({ exp: "soon" }))).toBeNull();
    expect(tokenExp("opaque")).toBeNull();
    expect(tokenExp("a.!!!.c")).toBeNull();
  });
});

describe("refresh delay", () => {
  const now = 1_000_000_000_000;
  it("refreshes 30 s before a long-lived token expires", () => {
    expect(refreshDelay(jwt({ exp: now / 1000 + 3600 }), now)).toBe(3600_000 - 30_000);
  });

  it("refreshes a tenth of its life before a short-lived token expires", () => {
    expect(refreshDelay(jwt({ exp: now / 1000 + 20 }), now)).toBe(18_000);
  });

  it("never schedules a tight loop for a token already due", () => {
    expect(refreshDelay(jwt({ exp: now / 1000 - 10 }), now)).toBe(1000);
  });

  it("does not refresh a token without exp", () => {
    expect(refreshDelay(jwt({ sub: "1" }), now)).toBeNull();
  });
});
