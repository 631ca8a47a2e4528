import { describe, expect, it } from "vitest";
import { backoff, soon } from "../src/backoff.js";

describe("backoff", () => {
  it("is full jitter below a cap that doubles per attempt", () => {
    expect(backoff(0, 250, 10_000, () => 0.999)).toBe(249);
    expect(backoff(1, 250, 10_000, () => 0.999)).toBe(499);
    expect(backoff(3, 250, 10_000, () => 0.5)).toBe(1000);
    expect(backoff(5, 250, 10_000, () => 0)).toBe(0);
  });

  it("never exceeds the maximum, however many attempts", () => {
    for (const attempt of [6, 10, 50, 1000]) {
      expect(backoff(attempt, 250, 10_000, () => 0.999999)).toBeLessThan(10_000);
    }
    expect(backoff(1000, 250, 10_000, () => 0.5)).toBe(5000);
  });

  it("spreads draws over the whole range", () => {
    const draws = Array.from({ length: 2000 }, () => backoff(4, 100, 10_000));
    expect(Math.min(...draws)).toBeLessThan(200);
    expect(Math.max(...draws)).toBeGreaterThan(1400);
    expect(Math.max(...draws)).toBeLessThan(1600);
  });

  it("reconnects soon after a drain: within a second", () => {
    expect(soon(() => 0)).toBe(0);
    expect(soon(() => 0.999)).toBe(999);
  });
});
