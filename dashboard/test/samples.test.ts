import { describe, expect, it } from "vitest";

import type { SampleTable } from "../src/api";
import { emptyText, liveNotice } from "../src/samples";

function table(epoch: number | null, liveEpoch: number | null | undefined): SampleTable {
  return {
    epoch, epochs: epoch === null ? [] : [epoch], total: 0, offset: 0, rows: [], flags: {}, rule: {},
    grad_norm_method: null, live_epoch: liveEpoch,
  };
}

describe("the per-sample table and the epoch in progress", () => {
  it("says the epoch in progress fills its table when it ends, when no epoch has ended yet", () => {
    expect(liveNotice(table(null, 0))).toBe("Epoch 0 is in progress: its per-sample table fills when the epoch ends.");
    expect(emptyText(table(null, 0), false)).toBe("No epoch has ended yet: the table fills when epoch 0 ends.");
  });

  it("says so too when the epoch shown is older than the one in progress", () => {
    expect(liveNotice(table(2, 3))).toBe("Epoch 3 is in progress: its per-sample table fills when the epoch ends.");
  });

  it("says nothing when the shown epoch is the newest, or nothing is training", () => {
    expect(liveNotice(table(3, 3))).toBeNull();
    expect(liveNotice(table(3, null))).toBeNull();
    expect(liveNotice(table(3, undefined))).toBeNull(); // a server without live_epoch
  });

  it("says when the table will fill while nothing has been recorded", () => {
    expect(emptyText(table(null, null), false)).toBe("No per-sample losses recorded yet. The table fills when the first epoch ends.");
  });

  it("tells filters that match nothing from an empty epoch", () => {
    expect(emptyText(table(2, 3), true)).toBe("No sample matches these filters.");
    expect(emptyText(table(2, 3), false)).toBe("No per-sample losses recorded yet.");
  });
});
