import { describe, expect, it } from "vitest";

import { formatBytes, formatCompact, formatCount, formatDuration, formatFlops, formatPercent, formatRate, formatThroughput, formatValue } from "../src/format";

describe("format", () => {
  it.each([
    [1234567, "1,234,567"],
    [null, "—"],
    [NaN, "—"],
  ])("formatCount(%s) = %s", (value, text) => expect(formatCount(value)).toBe(text));

  it.each([
    [0.123456, "0.1235"],
    [2, "2"],
    [0, "0"],
    [0.0008, "8e-4"],
    [0.0000125, "1.25e-5"],
    [12_345_678, "1.23e+7"],
    [Infinity, "inf"],
    [-Infinity, "-inf"],
    [NaN, "—"],
    [undefined, "—"],
  ])("formatValue(%s) = %s", (value, text) => expect(formatValue(value)).toBe(text));

  it.each([
    [512, "512 B"],
    [1536, "1.5 KiB"],
    [12_897_485, "12.3 MiB"],
    [129_000_000, "123 MiB"],
    [3 * 1024 ** 3, "3.0 GiB"],
    [null, "—"],
    [-1, "—"],
  ])("formatBytes(%s) = %s", (value, text) => expect(formatBytes(value)).toBe(text));

  it("writes small learning rates in exponent notation", () => {
    expect(formatRate(0.0005)).toBe("5e-4");
    expect(formatRate(0.1)).toBe("0.1");
    expect(formatRate(null)).toBe("—");
  });

  it("formats fractions, speeds, durations and axis ticks", () => {
    expect(formatPercent(0.9123)).toBe("91.23%");
    expect(formatThroughput(1234.4)).toBe("1,234 samples/s");
    expect([formatDuration(42), formatDuration(185), formatDuration(7440)]).toEqual(["42 s", "3 min 5 s", "2 h 4 min"]);
    expect([formatCompact(950), formatCompact(1250), formatCompact(1_500_000), formatCompact(null)]).toEqual(["950", "1.25K", "1.5M", ""]);
  });

  it.each([
    [812, "812 FLOPs"],
    [999.6, "1 kFLOPs"],
    [1_570_000, "1.57 MFLOPs"],
    [4.1e9, "4.1 GFLOPs"],
    [3.2e15, "3.2 PFLOPs"],
    [-2000, "-2 kFLOPs"],
    [null, "—"],
  ])("formatFlops(%s) = %s", (value, text) => expect(formatFlops(value)).toBe(text));
});
