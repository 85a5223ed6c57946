import { describe, expect, it } from "vitest";

import { GateCardSchema } from "../src/generated/schemas";
import {
  GATE_FIELDS,
  GATE_SETS,
  artifactText,
  changedGateFields,
  formatShare,
  gateCardOf,
  gateCriterionText,
  gateDraft,
  gateFieldsNamed,
  gateOutcomeText,
  gateTrainingText,
  gateValuesOf,
  generalistFirst,
  initialGateValues,
  onnxText,
  orderedSets,
  readArtifact,
  readGateVerdict,
  readUtilisation,
  setLabel,
  type GateCard,
} from "../src/gate-card";
import { cardTitle, planText } from "../src/plan-text";

const field = (name: string) => {
  const found = GATE_FIELDS.find((f) => f.name === name);
  if (found === undefined) throw new Error(`no field ${name}`);
  return found;
};

/** A card as the server keeps it: every default filled in. */
const CARD: GateCard = {
  kind: "gate", name: "mixture of baseline and tail specialist", run_id: 1,
  experts: [{ run_id: 1, checkpoint_id: null }, { run_id: 2, checkpoint_id: null }],
  routing: "top1", gate_input: "inputs", hidden: 0, data: "val", steps: 300, batch_size: 256, lr: 0.01,
  balance: 0.01, min_share: 0.02, seed: 0, sets: ["test"],
};

/** A done gate card's result as actions/mixture.py writes it (the parts the page reads). */
const RESULT = {
  runs: [4],
  verdict: { met: false, worse: { run: "1", set: "test", metric: "accuracy", gap: 0.5, interval: null,
    text: "the mixture is worse than expert run 1 on test: accuracy 90.00% against 90.50% (0.50 points)" }, dead: [2] },
  utilisation: {
    experts: [1, 2],
    sets: {
      "held-out": { count: 4096, shares: [0.99, 0.01], mean_probability: [0.9, 0.1] },
      "slice:tail": { count: 1600, shares: [0.6, 0.4], mean_probability: [0.55, 0.45] },
      test: { count: 4096, shares: [0.985, 0.015], mean_probability: [0.88, 0.12] },
    },
    warnings: [{ run_id: 2, share: 0.01, text: "expert run 2 receives 1.0% of the samples (under 2%): the gate has (almost) stopped using it" }],
  },
  gate: { routing: "top1", gate_input: "inputs", hidden: 0, gate_loss: [0.693, 0.4, 0.214], balance_loss: [1, 1], seconds: 1.4 },
  artifact: { written: true, folder: "/x/mixture", onnx: { written: true, error: null, max_abs_diff: 2.4e-7 },
    files: ["manifest.json", "model.onnx", "program.pt2", "weights.safetensors"], flops_per_sample: 204_800 },
};

describe("the gate card's form", () => {
  it("has an input for every field of the server's card but its lists, with its description as help", () => {
    const lists = ["kind", "experts", "sets"];
    const scalar = Object.keys(GateCardSchema.properties ?? {}).filter((name) => !lists.includes(name));
    expect(GATE_FIELDS.map((f) => f.name).sort()).toEqual(scalar.sort());
    for (const f of GATE_FIELDS) expect(f.help).toBe(GateCardSchema.properties?.[f.name]?.description ?? "");
    expect(field("hidden").help).toBe("the gate's hidden width (0: a linear gate)");
  });

  it("takes each input's kind, bounds, default and choices from the schema", () => {
    expect(field("routing")).toMatchObject({ input: "select", options: ["top1", "soft"], initial: "top1" });
    expect(field("gate_input")).toMatchObject({ input: "select", options: ["inputs", "embedding"] });
    expect(field("lr")).toMatchObject({ input: "number", integer: false, bounds: "> 0, ≤ 10", initial: 0.01 });
    expect(field("steps")).toMatchObject({ input: "number", integer: true, min: 1, initial: 300 });
    expect(field("min_share")).toMatchObject({ bounds: "≥ 0, ≤ 1", initial: 0.02, group: "Judging" });
    expect(field("run_id")).toMatchObject({ input: "select", choices: "runs", numeric: true, label: "Carried out by" });
    expect(field("data")).toMatchObject({ input: "select", choices: "data", initial: "val", label: "Held-out data" });
    expect(GATE_SETS).toEqual(["test"]);
  });

  it("puts the generalist first: the ticked run with the fewest ancestors, then by id", () => {
    // 1 -> 2 (fork), 1 -> 3 (control), 2 -> 5 (a fork of the fork).
    const edges = [{ parent: 1, child: 2 }, { parent: 1, child: 3 }, { parent: 2, child: 5 }];
    const runs = (...ids: number[]) => ids.map((id) => ({ id }));
    expect(generalistFirst(runs(2, 1), edges).map((r) => r.id)).toEqual([1, 2]);
    expect(generalistFirst(runs(5, 3, 2), edges).map((r) => r.id)).toEqual([2, 3, 5]);
    expect(generalistFirst(runs(4, 9), []).map((r) => r.id)).toEqual([4, 9]);
    expect(generalistFirst(runs(2, 1), [{ parent: 2, child: 1 }, { parent: 1, child: 2 }]).map((r) => r.id)).toHaveLength(2); // a loop ends
  });

  it("starts a new card from the schema's defaults and the ticked runs", () => {
    const draft = gateDraft([{ id: 1, name: "baseline" }, { id: 2, name: "tail specialist" }], 1, ["baseline", "tail specialist"]);
    expect(draft).toEqual({ kind: "gate", name: "mixture of baseline and tail specialist", run_id: 1,
      experts: [{ run_id: 1, checkpoint_id: null }, { run_id: 2, checkpoint_id: null }] });
    const values = initialGateValues(draft);
    expect(values.fields).toMatchObject({ name: draft.name, run_id: "1", routing: "top1", steps: "300", lr: "0.01", data: "val" });
    expect(values.experts).toEqual([{ run_id: 1, checkpoint_id: "" }, { run_id: 2, checkpoint_id: "" }]);
    expect(values.sets).toEqual(["test"]);
    expect(gateCardOf(values)).toEqual(CARD);
  });

  it("names a new mixture uniquely among the session's runs", () => {
    const taken = ["mixture of a and b", "mixture of a and b 2"];
    expect(gateDraft([{ id: 1, name: "a" }, { id: 2, name: "b" }], 1, taken).name).toBe("mixture of a and b 3");
  });

  it("reads a stored card back into the same inputs, and the inputs into the same card", () => {
    const card: GateCard = { ...CARD, routing: "soft", hidden: 32, steps: 100, sets: ["test", "tail"],
      experts: [{ run_id: 1, checkpoint_id: 7 }, { run_id: 2, checkpoint_id: null }] };
    const values = gateValuesOf(card);
    expect(values.experts[0]).toEqual({ run_id: 1, checkpoint_id: "7" });
    expect(values.fields).toMatchObject({ routing: "soft", hidden: "32", steps: "100" });
    expect(gateCardOf(values)).toEqual(card);
  });

  it("reads numbers as typed and leaves text that is no number to the server", () => {
    const values = initialGateValues(CARD);
    values.fields.steps = " 100 ";
    values.fields.lr = "fast";
    values.experts[1]!.checkpoint_id = "";
    const card = gateCardOf(values);
    expect(card.steps).toBe(100);
    expect(card.lr).toBe("fast");
    expect(card.experts[1]!.checkpoint_id).toBeNull();
  });

  it("sends only what changed in an edit, the lists as wholes", () => {
    expect(changedGateFields(CARD, { ...CARD })).toEqual({});
    expect(changedGateFields(CARD, { ...CARD, steps: 100 })).toEqual({ steps: 100 });
    const experts = [CARD.experts[1]!, CARD.experts[0]!];
    expect(changedGateFields(CARD, { ...CARD, experts, sets: ["val"] })).toEqual({ experts, sets: ["val"] });
  });

  it("marks the fields a refusal names, an expert's checkpoint as the experts", () => {
    expect(gateFieldsNamed({ message: "steps: Input should be greater than or equal to 1", fields: ["steps"] })).toEqual(["steps"]);
    expect(gateFieldsNamed({ message: "experts: run 9 is not a run of this session" })).toEqual(["experts"]);
    expect(gateFieldsNamed({ message: "x", fields: ["checkpoint_id"] })).toEqual(["experts"]);
    expect(gateFieldsNamed({ message: "name 'm' is taken by a run of this session; pick another" })).toEqual(["name"]);
    expect(gateFieldsNamed({ message: "plan card 3 is done" })).toEqual([]);
  });
});

describe("what a gate card says", () => {
  const names: Record<number, string> = { 1: "baseline", 2: "tail specialist" };
  const runName = (id: number) => `${names[id] ?? "run"} (${id})`;

  it("describes its plan, title and criterion", () => {
    expect(planText(CARD, runName)).toBe("top1 gate over baseline (1) + tail specialist (2) · on val · 300 steps · by baseline (1)");
    const shaped: GateCard = { ...CARD, hidden: 64, gate_input: "embedding", experts: [{ run_id: 1, checkpoint_id: 3 }, CARD.experts[1]!] };
    expect(planText(shaped, runName)).toBe("top1 gate (hidden 64, on embeddings) over baseline (1) @ checkpoint 3 + tail specialist (2) · on val · 300 steps · by baseline (1)");
    expect(cardTitle(CARD)).toBe("mixture of baseline and tail specialist");
    expect(gateCriterionText(CARD)).toBe("not worse than its best expert on test · warns under 2.0% of samples");
    expect(gateCriterionText({ sets: ["tail", "val"], min_share: 0.05 })).toContain("on val");
  });

  it("reads the utilisation: every expert's share on every set, and the warnings", () => {
    const utilisation = readUtilisation(RESULT)!;
    expect(utilisation.experts).toEqual([1, 2]);
    expect(utilisation.sets.find((s) => s.name === "held-out")).toEqual({ name: "held-out", count: 4096, shares: [0.99, 0.01], meanProbability: [0.9, 0.1] });
    expect(utilisation.warnings).toEqual([{ runId: 2, share: 0.01, text: RESULT.utilisation.warnings[0]!.text }]);
    // The held-out data first, then the card's sets in its order, then the other slices.
    expect(orderedSets(utilisation, ["test"]).map((s) => s.name)).toEqual(["held-out", "test", "slice:tail"]);
    expect(readUtilisation({})).toBeNull();
    expect(readUtilisation({ utilisation: { experts: [1], sets: { val: { count: 3 } } } })!.sets[0]!.shares).toEqual([null]);
  });

  it("writes shares and set names for the table", () => {
    expect([formatShare(0.6321), formatShare(0), formatShare(1), formatShare(null)]).toEqual(["63.2%", "0.0%", "100.0%", "—"]);
    expect(setLabel("held-out", "val")).toBe("held-out (val)");
    expect(setLabel("slice:tail", "val")).toBe("tail (slice)");
    expect(setLabel("test", "val")).toBe("test");
  });

  it("reads the verdict: worse than an expert, and the experts left unused", () => {
    const verdict = readGateVerdict(RESULT)!;
    expect(verdict).toMatchObject({ met: false, dead: [2], worse: { run: "1", set: "test" } });
    expect(gateOutcomeText(verdict)).toBe(`${RESULT.verdict.worse.text} · unused: run 2`);
    expect(gateOutcomeText({ met: true, worse: null, dead: [] })).toBe("not worse than any expert");
    expect(readGateVerdict(null)).toBeNull();
  });

  it("says what the artifact holds, and ONNX's parity or why there is none", () => {
    const artifact = readArtifact(RESULT)!;
    expect(artifactText(artifact)).toBe("Artifact: manifest.json, model.onnx, program.pt2, weights.safetensors · 205 kFLOPs per sample");
    expect(onnxText(artifact)).toBe("ONNX: written · onnxruntime matches torch within 2.4e-7");
    const noOnnx = readArtifact({ artifact: { ...RESULT.artifact, onnx: { written: false, error: "onnxruntime is not installed", max_abs_diff: null } } })!;
    expect(onnxText(noOnnx)).toBe("ONNX: not written (onnxruntime is not installed)");
    const none = readArtifact({ artifact: { written: false, error: "torch.export could not trace it" } })!;
    expect(artifactText(none)).toBe("No artifact: torch.export could not trace it");
    expect(onnxText(none)).toBe("ONNX: not exported");
  });

  it("says how the gate trained", () => {
    expect(gateTrainingText(RESULT)).toBe("gate trained in 1 s · loss 0.693 → 0.214 · top1, inputs, linear");
    expect(gateTrainingText({ gate: { routing: "soft", gate_input: "embedding", hidden: 32, gate_loss: [] } })).toBe("gate trained · soft, embedding, hidden 32");
    expect(gateTrainingText({})).toBeNull();
  });
});
