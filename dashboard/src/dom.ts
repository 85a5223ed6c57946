// Small DOM helpers: the page is plain DOM, built by hand, no framework.

/** A new element with an optional class and text. */
export function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = "",
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The element with this `data-testid` in the page; its absence is a bug in index.html. */
export function byTestId<T extends HTMLElement = HTMLElement>(id: string, root: ParentNode = document): T {
  const node = root.querySelector<T>(`[data-testid="${id}"]`);
  if (node === null) throw new Error(`index.html has no element with data-testid="${id}"`);
  return node;
}

/** The element with this id in the page; its absence is a bug in index.html. */
export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const node = document.getElementById(id);
  if (node === null) throw new Error(`index.html has no element with id="${id}"`);
  return node as T;
}

/** Set text only when it changed, so frequent updates do not touch the DOM needlessly. */
export function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) node.textContent = text;
}

/** A native download through a temporary link: the browser streams the file to disk itself (so a
 *  large file never sits in page memory), authorised by the page's cookie, not a token in the URL.
 *  `filename` "" keeps the name the server gives (its Content-Disposition). */
export function download(url: string, filename = ""): void {
  const link = element("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
}
