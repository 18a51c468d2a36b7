// @ts-check
// Code 128 (ISO/IEC 15417) as SVG, for the Worklist page's labels: the accession number a
// scanner at the modality reads instead of a person typing it. Code set C for an even count of
// digits (4 or more), else code set B (printable ASCII); anything else has no barcode.

// Each symbol's bar and space widths in modules (bar first), values 0 to 106 (106: Stop).
const WIDTHS = [
  "212222", "222122", "222221", "121223", "121322", "131222", "122213", "122312", "132212", "221213",
  "221312", "231212", "112232", "122132", "122231", "113222", "123122", "123221", "223211", "221132",
  "221231", "213212", "223112", "312131", "311222", "321122", "321221", "312212", "322112", "322211",
  "212123", "212321", "232121", "111323", "131123", "131321", "112313", "132113", "132311", "211313",
  "231113", "231311", "112133", "112331", "132131", "113123", "113321", "133121", "313121", "211331",
  "231131", "213113", "213311", "213131", "311123", "311321", "331121", "312113", "312311", "332111",
  "314111", "221411", "431111", "111224", "111422", "121124", "121421", "141122", "141221", "112214",
  "112412", "122114", "122411", "142112", "142211", "241211", "221114", "413111", "241112", "134111",
  "111242", "121142", "121241", "114212", "124112", "124211", "411212", "421112", "421211", "212141",
  "214121", "412121", "111143", "111341", "131141", "114113", "114311", "411113", "411311", "113141",
  "114131", "311141", "411131", "211412", "211214", "211232", "2331112",
];
const START_B = 104, START_C = 105, STOP = 106;
const QUIET = 10;   // modules of white space before and after (ISO/IEC 15417 4.4.3)

/**
 * The symbol values of `text` (start, data, check, stop), or null when it cannot be encoded.
 * @param {string} text @returns {number[] | null}
 */
export function symbols(text) {
  /** @type {number[]} */
  let values;
  if (/^(\d\d){2,}$/.test(text)) {
    values = [START_C];
    for (let i = 0; i < text.length; i += 2) values.push(Number(text.slice(i, i + 2)));
  } else if (text && /^[\x20-\x7e]+$/.test(text)) {
    values = [START_B, ...[...text].map((c) => c.charCodeAt(0) - 32)];
  } else {
    return null;
  }
  // The check symbol: the start value plus each data value times its position, modulo 103.
  const check = values.reduce((sum, v, i) => sum + v * Math.max(i, 1), 0) % 103;
  return [...values, check, STOP];
}

/**
 * The bars of `text` as an SVG element (one module `module` px wide), or null.
 * @param {string} text @param {number} [module] @param {number} [height]
 * @returns {SVGSVGElement | null}
 */
export function barcode(text, module = 2, height = 48) {
  const values = symbols(text);
  if (!values) return null;
  const widths = values.map((v) => WIDTHS[v]).join("");
  const total = [...widths].reduce((n, w) => n + Number(w), 0) + 2 * QUIET;
  const NS = "http://www.w3.org/2000/svg";
  const svg = /** @type {SVGSVGElement} */ (document.createElementNS(NS, "svg"));
  svg.setAttribute("viewBox", `0 0 ${total} ${height / module}`);
  svg.setAttribute("width", String(total * module));
  svg.setAttribute("height", String(height));
  svg.setAttribute("shape-rendering", "crispEdges");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Code 128 barcode of ${text}`);
  svg.dataset.text = text;
  let x = QUIET;
  [...widths].forEach((w, i) => {
    const n = Number(w);
    if (i % 2 === 0) {   // bars at even places, spaces between
      const bar = document.createElementNS(NS, "rect");
      bar.setAttribute("x", String(x));
      bar.setAttribute("y", "0");
      bar.setAttribute("width", String(n));
      bar.setAttribute("height", String(height / module));
      svg.appendChild(bar);
    }
    x += n;
  });
  return svg;
}
