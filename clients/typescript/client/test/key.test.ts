import { describe, expect, it } from "vitest";
import { newKey } from "../src/key.js";

describe("idempotency keys", () => {
  it("are 16 random bytes as 32 lowercase hex characters, zero-padded", () => {
    expect(newKey((a) => a.fill(0x0a))).toBe("0a".repeat(16));
    expect(newKey((a) => a.map((_, i) => i * 17))).toBe("00112233445566778899aabbccddeeff");
  });

  it("differ each time", () => {
    const keys = new Set(Array.from({ length: 1000 }, () => newKey()));
    expect(keys.size).toBe(1000);
    for (const k of keys) expect(k).toMatch(/^[0-9a-f]{32}$/);
  });
});
