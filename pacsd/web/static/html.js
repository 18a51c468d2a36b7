// @ts-check
// HTML built from templates that escape by default: html`<td>${name}</td>` escapes `name`;
// a value that is itself html`...` (or an array of them) goes in as it is. The pages then set
// element contents with render(el, html`...`) and never put raw data in innerHTML.
// lit-html's idea, in thirty lines and without the dependency.

export class Safe {
  /** @param {string} text HTML already escaped */
  constructor(text) { this.text = text; }
  toString() { return this.text; }
}

/** @param {unknown} value */
export function escape(value) {
  return String(value == null ? "" : value).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c] || c));
}

/** @param {unknown} value @returns {string} */
function part(value) {
  if (value instanceof Safe) return value.text;
  if (Array.isArray(value)) return value.map(part).join("");
  if (value === false || value == null) return "";   // ${cond && html`...`}
  return escape(value);
}

/**
 * @param {TemplateStringsArray} strings
 * @param {...unknown} values
 * @returns {Safe}
 */
export function html(strings, ...values) {
  let out = strings[0];
  values.forEach((v, i) => { out += part(v) + strings[i + 1]; });
  return new Safe(out);
}

/** Set an element's contents from a template. @param {Element} el @param {Safe} safe */
export function render(el, safe) {
  el.innerHTML = safe.text;
}
