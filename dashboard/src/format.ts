// How numbers read on the page: one place, so a loss looks the same in a chart, a table and the log.

const grouped = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

/** An integer with thousands separators: 1,000,000. */
export function formatCount(value: number | null | undefined): string {
  return value == null || !Number.isFinite(value) ? "—" : grouped.format(value);
}

/** A loss or any real value: 4 significant digits, exponent notation when very small or large. */
export function formatValue(value: number | null | undefined): string {
  if (value == null || Number.isNaN(value)) return "—";
  if (!Number.isFinite(value)) return value > 0 ? "inf" : "-inf";
  const magnitude = Math.abs(value);
  // Exponent notation without trailing zeros: 8e-4, 1.25e-5.
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e6)) return Number(value.toPrecision(3)).toExponential();
  return Number(value.toPrecision(4)).toString();
}

/** A learning rate: exponent notation below 0.01, where it is usually set. */
export function formatRate(value: number | null | undefined): string {
  if (value == null || !Number.isFinite(value)) return "—";
  return Math.abs(value) < 0.01 && value !== 0 ? Number(value.toPrecision(3)).toExponential() : formatValue(value);
}

/** A fraction as a percentage: 0.9123 -> "91.23%". */
export function formatPercent(value: number | null | undefined): string {
  return value == null || !Number.isFinite(value) ? "—" : `${(value * 100).toFixed(2)}%`;
}

/** Samples per second, rounded for reading while it changes. */
export function formatThroughput(value: number | null | undefined): string {
  if (value == null || !Number.isFinite(value)) return "—";
  return `${grouped.format(Math.round(value))} samples/s`;
}

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"] as const;

/** A file's size in binary units: "512 B", "1.5 KiB", "12.3 MiB", "123 MiB". */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes == null || !Number.isFinite(bytes) || bytes < 0) return "—";
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${bytes} B`;
  // One decimal below 100 (12.3 MiB); above it a decimal is noise (123 MiB).
  return `${value < 100 ? value.toFixed(1) : grouped.format(Math.round(value))} ${BYTE_UNITS[unit]}`;
}

/** A duration in seconds as "42 s", "3 min 5 s" or "2 h 4 min". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** A wall-clock time (seconds since the epoch) as local HH:MM:SS. */
export function formatClock(time: number): string {
  return new Date(time * 1000).toLocaleTimeString([], { hour12: false });
}

// Three fraction digits so neighbouring round ticks stay distinct: 1.25K, 866.7K, 1.5M.
const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 3 });

/** A tick on an axis: 950, 1.25K, 1.5M. */
export function formatCompact(value: number | null | undefined): string {
  return value == null || !Number.isFinite(value) ? "" : compact.format(value);
}

/** A signed number with `digits` decimals: "+3.1", "-0.4", "0.0" (a value that rounds to zero has
 *  no sign, so -0.04 does not read as a loss). */
export function formatSigned(value: number | null | undefined, digits = 1): string {
  if (value == null || !Number.isFinite(value)) return "—";
  const text = Math.abs(value).toFixed(digits);
  if (Number(text) === 0) return text;
  return `${value > 0 ? "+" : "-"}${text}`;
}

/** A difference in percentage points: "+3.1 pt", "-0.4 pt". */
export function formatPoints(points: number | null | undefined): string {
  return points == null || !Number.isFinite(points) ? "—" : `${formatSigned(points)} pt`;
}

const FLOP_UNITS = ["FLOPs", "kFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs", "EFLOPs"] as const;

/** FLOPs in SI units with three significant digits: "812 FLOPs", "1.57 MFLOPs", "4.1 GFLOPs". */
export function formatFlops(flops: number | null | undefined): string {
  if (flops == null || !Number.isFinite(flops)) return "—";
  let value = Math.abs(flops);
  let unit = 0;
  // Rounded before each step up, so 999.6 reads "1 kFLOPs", not "1000 FLOPs".
  while (Number(value.toPrecision(3)) >= 1000 && unit < FLOP_UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${flops < 0 ? "-" : ""}${Number(value.toPrecision(3))} ${FLOP_UNITS[unit]}`;
}
