// The session token, out of the address bar. The printed URL carries `?token=...`; on load the page
// keeps it in this tab's sessionStorage (so a reload of the tab still works) and removes it from
// the URL, so it stays out of the history, bookmarks and screen shares. From then on it travels
// only in the `Authorization` header of API calls and in the WebSocket URL's query.

/** The key in sessionStorage (which is per origin, so per port: two dashboards do not mix). */
export const TOKEN_KEY = "onthefly.token";

/** What `takeToken` needs of the browser (given as arguments, so tests can pass their own). */
export interface TokenPlace {
  location: Pick<Location, "href">;
  history: Pick<History, "replaceState" | "state">;
  /** null when the browser refuses storage (some embedded views do). */
  storage: Pick<Storage, "getItem" | "setItem"> | null;
}

/** The token the page was opened with (then kept), or the one kept by an earlier load of this
 *  tab, or "" when there is none. The URL keeps every other query parameter and its hash. */
export function takeToken(place: TokenPlace): string {
  const url = new URL(place.location.href);
  const given = url.searchParams.get("token");
  if (given === null) return read(place.storage) ?? "";
  write(place.storage, given);
  url.searchParams.delete("token");
  place.history.replaceState(place.history.state, "", url.pathname + url.search + url.hash);
  return given;
}

/** The browser's own places: this page's location, history and sessionStorage. */
export function browserTokenPlace(): TokenPlace {
  let storage: Storage | null = null;
  try {
    storage = window.sessionStorage; // reading it throws where storage is disabled
  } catch {
    storage = null;
  }
  return { location: window.location, history: window.history, storage };
}

function read(storage: TokenPlace["storage"]): string | null {
  try {
    return storage?.getItem(TOKEN_KEY) ?? null;
  } catch {
    return null;
  }
}

function write(storage: TokenPlace["storage"], token: string): void {
  try {
    storage?.setItem(TOKEN_KEY, token);
  } catch {
    // No storage (full, or refused): this load works; a reload needs the printed URL again.
  }
}
