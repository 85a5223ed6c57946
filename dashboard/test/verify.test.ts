import { describe, expect, it } from "vitest";

import { verifiedText } from "../src/verify";

describe("verify suspects", () => {
  it("says how many of how many were confirmed, how, and where they were saved", () => {
    expect(verifiedText({ suspects: 14, confirmed: 12, slice: "verified mislabelled", folds: 5, epochs: 5, seconds: 3.21 })).toBe(
      "12 of 14 suspects confirmed out of fold (5 folds × 5 epochs, 3.2 s); saved as slice “verified mislabelled”",
    );
    expect(verifiedText({ suspects: 3, confirmed: 0, slice: null, folds: 2, epochs: 1, seconds: 0.5 })).toBe(
      "0 of 3 suspects confirmed out of fold (2 folds × 1 epoch, 0.5 s); none confirmed, no slice saved",
    );
  });

  it("is null for a result that is not a verification's", () => {
    expect(verifiedText({ clustering: 3 })).toBeNull();
  });
});
