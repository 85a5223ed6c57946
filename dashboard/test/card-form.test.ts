import { describe, expect, it } from "vitest";

import type { ForkCard } from "../src/api";
import { CARD_FIELDS, boundsText, cardOf, changedFields, fieldApplies, fieldGroups, initialValues, valuesOf } from "../src/card-form";
import { ForkCardSchema } from "../src/generated/schemas";

const field = (name: string) => {
  const found = CARD_FIELDS.find((f) => f.name === name);
  if (found === undefined) throw new Error(`no field ${name}`);
  return found;
};

const CARD: ForkCard = {
  kind: "fork", name: "tail specialist", run_id: 1, checkpoint_id: null, slice: "tail", mix: "slice", ratio: 0.5,
  budget: 1, budget_unit: "epochs", lr: 0.01, weight_decay: null, batch_size: null, trains: "all", rank: 4, seed: 0,
  control: true, min_slice_gain_pt: 0, max_other_drop_pt: 1,
};

describe("the fork card's form", () => {
  it("has a field for every field of the server's card, with its description as help", () => {
    expect(CARD_FIELDS.map((f) => f.name).sort()).toEqual(Object.keys(ForkCardSchema.properties ?? {}).sort());
    for (const f of CARD_FIELDS) expect(f.help).toBe(ForkCardSchema.properties?.[f.name]?.description ?? "");
    expect(field("budget").help).toBe("how long the fork trains, in budget_unit");
  });

  it("takes each input's kind, bounds and choices from the schema", () => {
    expect(field("kind").input).toBe("hidden");
    expect(field("mix")).toMatchObject({ input: "select", options: ["slice", "oversample"] });
    expect(field("control").input).toBe("checkbox");
    expect(field("budget")).toMatchObject({ input: "number", integer: true, min: 1, max: 1_000_000, nullable: false });
    expect(field("lr")).toMatchObject({ input: "number", integer: false, min: 0, max: 10, required: true, bounds: "> 0, ≤ 10" });
    expect(field("batch_size")).toMatchObject({ input: "number", nullable: true, required: false });
    // The parent and the slice are chosen from the session's runs and slices.
    expect(field("run_id")).toMatchObject({ input: "select", choices: "runs", numeric: true });
    expect(field("slice")).toMatchObject({ input: "select", choices: "slices", numeric: false });
  });

  it("groups the fields, the success criterion last, and hides the kind", () => {
    const groups = fieldGroups();
    expect(groups.map(([name]) => name)).toEqual(["Fork", "Data", "Budget", "Optimiser", "Control", "Success criterion"]);
    expect(groups.at(-1)?.[1].map((f) => f.name)).toEqual(["min_slice_gain_pt", "max_other_drop_pt"]);
    expect(groups.flatMap(([, fields]) => fields).some((f) => f.name === "kind")).toBe(false);
  });

  it("starts a new card from the schema's defaults and the prefill", () => {
    const values = initialValues({ name: "tail specialist", run_id: 1, slice: "tail", lr: 0.01 });
    expect(values).toMatchObject({ kind: "fork", name: "tail specialist", run_id: "1", slice: "tail", lr: "0.01", budget: "1", budget_unit: "epochs", control: true, checkpoint_id: "", weight_decay: "", mix: "slice", ratio: "0.5" });
    expect(cardOf(values)).toEqual(CARD);
  });

  it("round-trips a card through the form", () => {
    const card: ForkCard = { ...CARD, checkpoint_id: 4, weight_decay: 0.001, batch_size: 64, mix: "oversample", ratio: 0.3, control: false, budget_unit: "steps", budget: 200 };
    expect(cardOf(valuesOf(card))).toEqual(card);
  });

  it("reads numbers as typed, empty as null, and leaves checking to the server", () => {
    const values = { ...valuesOf(CARD), lr: " 0.003 ", budget: "2", batch_size: "", seed: "1.5", name: "  tail  " };
    const card = cardOf(values);
    expect([card.lr, card.budget, card.batch_size, card.seed, card.name]).toEqual([0.003, 2, null, 1.5, "tail"]);
    // A required number left empty goes as null: the server's refusal names it ("lr: Input should be a valid number").
    expect(cardOf({ ...values, lr: "" }).lr).toBeNull();
  });

  it("sends only what changed", () => {
    expect(changedFields(CARD, { ...CARD, lr: 0.02, budget: 2 })).toEqual({ lr: 0.02, budget: 2 });
    expect(changedFields(CARD, { ...CARD })).toEqual({});
  });

  it("disables a field that means nothing with the others, keeping its value", () => {
    const values = valuesOf(CARD);
    expect(fieldApplies(field("ratio"), values)).toBe(false);
    expect(fieldApplies(field("ratio"), { ...values, mix: "oversample" })).toBe(true);
    expect(fieldApplies(field("rank"), { ...values, trains: "adapters" })).toBe(true);
    expect(fieldApplies(field("lr"), values)).toBe(true);
  });

  it("writes bounds in words", () => {
    expect(boundsText({ minimum: 1, maximum: 1_000_000 })).toBe("≥ 1, ≤ 1,000,000");
    expect(boundsText({ exclusiveMinimum: 0, exclusiveMaximum: 1 })).toBe("> 0, < 1");
    expect(boundsText({ minimum: 0, maximum: 2 ** 31 })).toBe("≥ 0");
    expect(boundsText({})).toBe("");
  });
});
