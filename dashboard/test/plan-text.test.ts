import { describe, expect, it } from "vitest";

import type { ForkCard, PlanCard } from "../src/api";
import { criterionText, fieldsNamed, planText, verdictOf, verdictText } from "../src/plan-text";
import { formatPoints, formatSigned } from "../src/format";

const fork = { control: true, min_slice_gain_pt: 2, max_other_drop_pt: 1 } satisfies Partial<ForkCard>;

describe("a plan card in words", () => {
  it("states the criterion against the control, or the parent without one", () => {
    expect(criterionText(fork)).toBe("slice ≥ +2.0 pt, held-out ≥ -1.0 pt vs the control");
    expect(criterionText({ ...fork, control: false, min_slice_gain_pt: 0, max_other_drop_pt: 0 })).toBe("slice ≥ 0.0 pt, held-out ≥ 0.0 pt vs the parent at the fork");
  });

  it("says what a fork and a curation will do", () => {
    const name = (id: number) => `run ${id}`;
    const card = { kind: "fork", name: "t", run_id: 1, slice: "tail", mix: "slice", ratio: 0.5, budget: 2, budget_unit: "epochs", lr: 0.003, trains: "all", rank: 4, seed: 0, control: true, min_slice_gain_pt: 0, max_other_drop_pt: 1 } satisfies PlanCard;
    expect(planText(card, name)).toBe("tail · from run 1 · 2 epochs · lr 3e-3 · with control");
    expect(planText({ kind: "curate", run_id: 2, slice: "noisy", action: "reweight", weight: 0.5, from_step: 1200 }, name)).toBe("reweight noisy ×0.5 · on run 2 · from step 1,200");
  });

  it("reads a done fork's verdict and says it in points", () => {
    const verdict = verdictOf({ verdict: { met: true, slice_gain_pt: 3.14, other_change_pt: { rest: -0.21, val: 0.4 }, others_judged_on: ["val"] } });
    expect(verdict).toEqual({ met: true, slicePt: 3.14, others: [{ set: "rest", pt: -0.21, judged: false }, { set: "val", pt: 0.4, judged: true }] });
    expect(verdictText(verdict!)).toBe("met · slice +3.1 pt · rest -0.2 pt (not judged) · val +0.4 pt");
    expect(verdictText({ met: false, slicePt: -1, others: [{ set: "val", pt: -2.5, judged: true }] })).toBe("not met · slice -1.0 pt · val -2.5 pt");
    expect(verdictText(verdictOf({ verdict: { met: null, slice_gain_pt: null, other_change_pt: {} } })!)).toBe("no verdict · slice —");
  });

  it("has no verdict without a result", () => {
    expect(verdictOf(null)).toBeNull();
    expect(verdictOf({ runs: [2, 3] })).toBeNull();
  });

  it("finds the fields a refusal names", () => {
    expect(fieldsNamed({ message: "lr: Input should be greater than 0; budget: …", fields: ["lr", "budget"] })).toEqual(["lr", "budget"]);
    expect(fieldsNamed({ message: "slice: no slice named 'x'" })).toEqual(["slice"]);
    expect(fieldsNamed({ message: "name 'r' is taken by a run of this session; pick another" })).toEqual(["name"]);
    expect(fieldsNamed({ message: "run_id 7 is not a run of this session" })).toEqual(["run_id"]);
    expect(fieldsNamed({ message: "the training process has ended" })).toEqual([]);
  });

  it("signs points, and gives zero no sign", () => {
    expect([formatSigned(3.14), formatSigned(-0.04), formatSigned(0), formatSigned(null)]).toEqual(["+3.1", "0.0", "0.0", "—"]);
    expect(formatPoints(-12.345)).toBe("-12.3 pt");
  });
});
