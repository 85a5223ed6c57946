import { describe, expect, it } from "vitest";

import { TOKEN_KEY, takeToken, type TokenPlace } from "../src/token";

/** A tab: its address, its history and its sessionStorage. */
function tab(href: string, stored: Record<string, string> = {}) {
  const storage = new Map(Object.entries(stored));
  const place = {
    location: { href },
    history: {
      state: { kept: true },
      replaced: [] as [unknown, string][],
      replaceState(state: unknown, _unused: string, url?: string | URL | null) {
        this.replaced.push([state, String(url)]);
        place.location.href = new URL(String(url), place.location.href).href;
      },
    },
    storage: { getItem: (key: string) => storage.get(key) ?? null, setItem: (key: string, value: string) => void storage.set(key, value) },
  };
  return { place: place satisfies TokenPlace, storage };
}

describe("takeToken", () => {
  it("takes the token out of the address, keeping the other parameters, the hash and the state", () => {
    const { place, storage } = tab("http://127.0.0.1:8123/?run=2&token=s3cret&x=1#samples");
    expect(takeToken(place)).toBe("s3cret");
    expect(place.location.href).toBe("http://127.0.0.1:8123/?run=2&x=1#samples");
    expect(place.history.replaced).toEqual([[{ kept: true }, "/?run=2&x=1#samples"]]);
    expect(storage.get(TOKEN_KEY)).toBe("s3cret");
  });

  it("leaves no empty '?' behind", () => {
    const { place } = tab("http://localhost:9000/?token=abc");
    takeToken(place);
    expect(place.location.href).toBe("http://localhost:9000/");
  });

  it("reads the kept token when this tab reloads without it", () => {
    const { place } = tab("http://127.0.0.1:8123/", { [TOKEN_KEY]: "kept" });
    expect(takeToken(place)).toBe("kept");
    expect(place.history.replaced).toEqual([]);
  });

  it("prefers a token in the address to an older kept one", () => {
    const { place, storage } = tab("http://127.0.0.1:8123/?token=new", { [TOKEN_KEY]: "old" });
    expect(takeToken(place)).toBe("new");
    expect(storage.get(TOKEN_KEY)).toBe("new");
  });

  it("is empty when there is none", () => {
    expect(takeToken(tab("http://127.0.0.1:8123/").place)).toBe("");
  });

  it("works without storage, and with storage that refuses", () => {
    const without = tab("http://127.0.0.1:8123/?token=t");
    expect(takeToken({ ...without.place, storage: null })).toBe("t");
    const refusing = tab("http://127.0.0.1:8123/?token=t");
    const broken = {
      getItem: () => {
        throw new Error("denied");
      },
      setItem: () => {
        throw new Error("quota");
      },
    };
    expect(takeToken({ ...refusing.place, storage: broken })).toBe("t");
    expect(refusing.place.location.href).toBe("http://127.0.0.1:8123/");
    expect(takeToken({ ...tab("http://127.0.0.1:8123/").place, storage: broken })).toBe("");
  });
});
