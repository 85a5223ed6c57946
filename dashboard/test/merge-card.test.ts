import { describe, expect, it } from "vitest";

import { MergeCardSchema } from "../src/generated/schemas";
import {
  MERGE_FIELDS,
  MERGE_METHODS,
  carrierOf,
  changedMergeFields,
  fieldsFor,
  initialMergeValues,
  mergeCardOf,
  mergeCriterionText,
  mergeDraft,
  mergeFieldsNamed,
  mergeName,
  mergeOutcomeText,
  mergeValuesOf,
  previewIsCurrent,
  previewText,
  readMergeVerdict,
  readPreview,
  weightsApply,
  type MergeCard,
} from "../src/merge-card";
import { cardTitle, planText } from "../src/plan-text";

const field = (name: string) => {
  const found = MERGE_FIELDS.find((f) => f.name === name);
  if (found === undefined) throw new Error(`no field ${name}`);
  return found;
};

/** A card as the server keeps it: every default filled in. */
const CARD: MergeCard = {
  kind: "merge", name: "merge of a and b", run_id: 1,
  parents: [{ run_id: 2, checkpoint_id: null, weight: 1 }, { run_id: 3, checkpoint_id: null, weight: 1 }],
  method: "linear", normalize: true, lambda: 1, density: 0.5, majority_sign: "total", base_checkpoint_id: null,
  rank: null, data: "train", update_bn: true, fisher_samples: 512, fisher_estimator: "empirical", temperature: 2,
  alpha: 0.5, budget: 200, lr: null, student: null, seed: 0, sets: ["val"], override: false,
};

const WORSE = {
  run: "2", set: "val", metric: "accuracy", gap: 1.5, interval: { value: 0.015, low: 0.004, high: 0.03 },
  text: "the merge is worse than parent run 2 on val: accuracy 80.00% against 81.50% (1.50 points)",
};

describe("the merge card's form", () => {
  it("has an input for every field of the server's card but its lists, with its description as help", () => {
    const lists = ["kind", "parents", "sets"];
    const scalar = Object.keys(MergeCardSchema.properties ?? {}).filter((name) => !lists.includes(name));
    expect(MERGE_FIELDS.map((f) => f.name).sort()).toEqual(scalar.sort());
    for (const f of MERGE_FIELDS) expect(f.help).toBe(MergeCardSchema.properties?.[f.name]?.description ?? "");
    expect(field("density").help).toBe("ties, dare_*: the fraction of each task vector kept");
  });

  it("takes each input's kind, bounds, default and choices from the schema", () => {
    expect(field("method")).toMatchObject({ input: "select", options: [...MERGE_METHODS] });
    expect(MERGE_METHODS).toEqual(["linear", "greedy_soup", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "adapter_fusion", "distill"]);
    expect(field("density")).toMatchObject({ input: "number", min: 0, max: 1, bounds: "> 0, ≤ 1", initial: 0.5 });
    expect(field("lambda")).toMatchObject({ input: "number", bounds: "≥ -10, ≤ 10", initial: 1 });
    expect(field("rank")).toMatchObject({ input: "number", integer: true, nullable: true, initial: null });
    expect(field("override")).toMatchObject({ input: "checkbox", initial: false });
    expect(field("run_id")).toMatchObject({ input: "select", choices: "runs", numeric: true });
    expect(field("student")).toMatchObject({ input: "select", choices: "parents", nullable: true });
    expect(field("data")).toMatchObject({ input: "select", choices: "data", initial: "train" });
  });

  it.each([
    ["linear", ["normalize"]],
    ["greedy_soup", []],
    ["task_arithmetic", ["normalize", "lambda", "base_checkpoint_id"]],
    ["ties", ["lambda", "density", "majority_sign", "base_checkpoint_id"]],
    ["dare_linear", ["lambda", "density", "base_checkpoint_id"]],
    ["dare_ties", ["lambda", "density", "majority_sign", "base_checkpoint_id"]],
    ["fisher", ["fisher_samples", "fisher_estimator"]],
    ["adapter_fusion", ["rank"]],
    ["distill", ["temperature", "alpha", "budget", "lr", "student"]],
  ])("shows %s's own parameters only", (method, own) => {
    const shown = fieldsFor(method);
    const methodGroup = MERGE_FIELDS.filter((f) => f.group === "Method").map((f) => f.name);
    expect(shown.filter((name) => methodGroup.includes(name))).toEqual(own);
    // Every method has the card's own fields, its data and its judging.
    for (const name of ["name", "run_id", "method", "data", "seed", "override"]) expect(shown).toContain(name);
    expect(shown.includes("update_bn")).toBe(method !== "distill");
  });

  it("weighs the parents for every method but a greedy soup and a distillation", () => {
    expect(MERGE_METHODS.filter((m) => !weightsApply(m))).toEqual(["greedy_soup", "distill"]);
  });

  it("starts a new card from the schema's defaults and the ticked runs", () => {
    const draft = mergeDraft([{ id: 2, name: "tail specialist" }, { id: 3, name: "tail specialist control" }], 1);
    expect(draft).toEqual({
      kind: "merge", name: "merge of tail specialist and tail specialist control", run_id: 1, method: "linear",
      parents: [{ run_id: 2, checkpoint_id: null, weight: 1 }, { run_id: 3, checkpoint_id: null, weight: 1 }],
    });
    const values = initialMergeValues(draft);
    expect(values.fields).toMatchObject({ name: draft.name, run_id: "1", method: "linear", density: "0.5", lambda: "1", rank: "", normalize: true, override: false });
    expect(values.parents).toEqual([{ run_id: 2, checkpoint_id: "", weight: "1" }, { run_id: 3, checkpoint_id: "", weight: "1" }]);
    expect(values.sets).toEqual(["val"]);
    expect(mergeCardOf(values)).toEqual({ ...CARD, name: draft.name });
  });

  it("reads a stored card back into the same inputs, and the inputs into the same card", () => {
    const card: MergeCard = { ...CARD, method: "ties", density: 0.3, lambda: 0.7, base_checkpoint_id: 4, sets: ["val", "tail"],
      parents: [{ run_id: 2, checkpoint_id: 7, weight: 2 }, { run_id: 3, checkpoint_id: null, weight: 1 }], override: true };
    const values = mergeValuesOf(card);
    expect(values.parents[0]).toEqual({ run_id: 2, checkpoint_id: "7", weight: "2" });
    expect(values.fields).toMatchObject({ density: "0.3", base_checkpoint_id: "4", override: true });
    expect(mergeCardOf(values)).toEqual(card);
  });

  it("sends a field the method does not read as its default, whatever its hidden input holds", () => {
    const values = initialMergeValues(CARD);
    values.fields.density = "0"; // typed under ties, then the method went back to linear
    values.fields.temperature = "nonsense";
    const card = mergeCardOf(values);
    expect([card.density, card.temperature]).toEqual([0.5, 2]);
    values.fields.method = "ties";
    expect(mergeCardOf(values).density).toBe(0); // the server refuses it, naming density
  });

  it("reads numbers as typed, an empty nullable one as null, and leaves text that is no number to the server", () => {
    const values = initialMergeValues({ ...CARD, method: "task_arithmetic" });
    values.fields.lambda = " 0.25 ";
    values.fields.base_checkpoint_id = "";
    values.parents[1]!.weight = "abc";
    const card = mergeCardOf(values);
    expect(card.lambda).toBe(0.25);
    expect(card.base_checkpoint_id).toBeNull();
    expect(card.parents[1]!.weight).toBe("abc");
  });

  it("sends the weight 1 for a method that weighs nothing", () => {
    const values = initialMergeValues({ ...CARD, method: "greedy_soup" });
    values.parents[0]!.weight = "5";
    expect(mergeCardOf(values).parents.map((p) => p.weight)).toEqual([1, 1]);
  });

  it("sends only what changed in an edit, the lists as wholes", () => {
    expect(changedMergeFields(CARD, { ...CARD })).toEqual({});
    expect(changedMergeFields(CARD, { ...CARD, override: true })).toEqual({ override: true });
    const parents = [{ run_id: 2, checkpoint_id: null, weight: 3 }, CARD.parents[1]!];
    expect(changedMergeFields(CARD, { ...CARD, parents, sets: ["val", "test"] })).toEqual({ parents, sets: ["val", "test"] });
  });

  it("names a new merge in the characters a run's name may hold, at most 64, not a name already taken", () => {
    expect(mergeName(["a", "b", "c"])).toBe("merge of a and b and c");
    expect(mergeName(["run (1)", "ünïcode/2"])).toBe("merge of run 1 and n code 2");
    expect(mergeName(["x".repeat(80), "y"])).toHaveLength(64);
    expect(mergeName(["a", "b"], ["merge of a and b", "merge of a and b 2"])).toBe("merge of a and b 3");
    expect(mergeName(["x".repeat(80)], ["merge of " + "x".repeat(55)])).toMatch(/^merge of x+ 2$/);
    expect(mergeName(["x".repeat(80)], ["merge of " + "x".repeat(55)])).toHaveLength(64);
  });

  it("has the merge carried out by a live run that takes cards, a ticked one first", () => {
    const runs = [
      { id: 1, live: true, commands: ["pause", "execute_plan"] },
      { id: 2, live: false, commands: [] },
      { id: 5, live: true, commands: ["execute_plan"] },
    ];
    expect(carrierOf(runs, [2, 3])).toBe(1);
    expect(carrierOf(runs, [2, 5])).toBe(5);
    expect(carrierOf([{ id: 1, live: true, commands: ["pause"] }], [1])).toBeNull();
  });

  it("marks the fields a refusal names, a parent's own field as the parents", () => {
    expect(mergeFieldsNamed({ message: "density: Input should be greater than 0", fields: ["density"] })).toEqual(["density"]);
    expect(mergeFieldsNamed({ message: "parents: run 9 is not a run of this session" })).toEqual(["parents"]);
    expect(mergeFieldsNamed({ message: "x", fields: ["weight", "checkpoint_id"] })).toEqual(["parents"]);
    expect(mergeFieldsNamed({ message: "plan card 3: the merge is not kept" })).toEqual([]);
  });
});

describe("what a merge card says", () => {
  it("describes its plan, title and criterion", () => {
    const names: Record<number, string> = { 1: "baseline", 2: "tail specialist", 3: "control" };
    const runName = (id: number) => `${names[id] ?? "run"} (${id})`;
    expect(planText(CARD, runName)).toBe("linear of tail specialist (2) + control (3) · by baseline (1)");
    const weighted: MergeCard = { ...CARD, override: true, parents: [{ run_id: 2, checkpoint_id: 7, weight: 2 }, CARD.parents[1]!] };
    expect(planText(weighted, runName)).toBe("linear of tail specialist (2) @ checkpoint 7 ×2 + control (3) · by baseline (1) · override");
    expect(planText({ ...weighted, method: "greedy_soup" }, runName)).toContain("tail specialist (2) @ checkpoint 7 + control");
    expect(cardTitle(CARD)).toBe("merge of a and b");
    expect(mergeCriterionText(CARD)).toBe("not worse than its best parent on val");
    expect(mergeCriterionText({ sets: ["tail"], override: true })).toBe("not worse than its best parent on tail (override: kept anyway)");
  });

  it("reads a preview: the comparison, why the candidate lost, and whether it is of the card as it is", () => {
    const { name: _name, override: _override, ...seen } = CARD;
    const result = { preview: { card: JSON.stringify(seen), comparison_id: 4, worse: WORSE, recipe: {} } };
    const preview = readPreview(result);
    expect(preview).toMatchObject({ comparisonId: 4, worse: { run: "2", set: "val", gap: 1.5, text: WORSE.text } });
    expect(preview !== null && previewIsCurrent(preview, { ...CARD, name: "renamed", override: true })).toBe(true);
    expect(preview !== null && previewIsCurrent(preview, { ...CARD, method: "ties" })).toBe(false);
    expect(readPreview({ verdict: {} })).toBeNull();
    expect(readPreview(null)).toBeNull();
  });

  it("says what approving a preview that lost needs", () => {
    const lost = { card: null, comparisonId: 4, worse: readPreview({ preview: { worse: WORSE } })!.worse };
    expect(previewText(lost, false)).toBe(`Warning: ${WORSE.text}; approving it needs “override” ticked (and saved).`);
    expect(previewText(lost, true)).toContain("override is ticked");
    expect(previewText({ ...lost, worse: null }, false)).toContain("not worse than any parent");
  });

  it("reads a done merge's verdict", () => {
    expect(mergeOutcomeText(readMergeVerdict({ verdict: { met: true, worse: null } })!)).toBe("kept · not worse than any parent");
    const kept = readMergeVerdict({ verdict: { met: false, worse: WORSE } })!;
    expect(kept.met).toBe(false);
    expect(mergeOutcomeText(kept)).toBe(`kept by override · ${WORSE.text}`);
    expect(readMergeVerdict({})).toBeNull();
  });
});
