/**
 * A few DOM helpers: the inspector is plain TypeScript and DOM (no
 * framework), so building elements must stay short to read.
 */

/** Attributes and properties h() understands. */
export type Attrs = Record<string, string | number | boolean | undefined | null | EventListener>;

/** A child h() appends: nodes, text, or nothing. */
export type Child = Node | string | number | null | undefined | false | Child[];

/**
 * Creates an element: `on*` keys add listeners, `class`/`for`/`data-*`/aria
 * and other strings become attributes, booleans toggle attributes, and
 * children are appended (arrays flattened, null/false skipped).
 */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, ...children);
  return el;
}

/** Appends children as h() does. */
export function append(el: Node, ...children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, ...c);
    else el.appendChild(typeof c === 'object' ? c : document.createTextNode(String(c)));
  }
}

/** Replaces an element's children. */
export function replace(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, ...children);
}

/** A <button type=button>. */
export function button(label: Child, onclick: (ev: MouseEvent) => void, attrs: Attrs = {}): HTMLButtonElement {
  return h('button', { type: 'button', ...attrs, onclick: onclick as EventListener }, label);
}

/** A definition list from [term, description] pairs. */
export function dl(rows: Array<[Child, Child]>, attrs: Attrs = {}): HTMLDListElement {
  return h('dl', attrs, ...rows.map(([t, d]) => [h('dt', {}, t), h('dd', {}, d)]));
}

/** A table with a header row and body rows. */
export function table(head: Child[], rows: Child[][], attrs: Attrs = {}): HTMLTableElement {
  return h('table', attrs, h('thead', {}, h('tr', {}, ...head.map((c) => h('th', { scope: 'col' }, c)))), h('tbody', {}, ...rows.map((r) => h('tr', {}, ...r.map((c) => h('td', {}, c))))));
}

/** The message of anything thrown, with a BlockError's code in front. */
export function errorText(e: unknown): string {
  const o = (e ?? {}) as { code?: unknown; message?: unknown };
  const msg = typeof o.message === 'string' ? o.message : String(e);
  return typeof o.code === 'string' ? `${o.code}: ${msg}` : msg;
}

/** A paragraph showing an error (role=alert so screen readers announce it). */
export function errorBox(e: unknown): HTMLElement {
  return h('p', { class: 'error', role: 'alert' }, errorText(e));
}
