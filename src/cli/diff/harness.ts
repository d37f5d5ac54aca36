/**
 * Differential testing against Debian's qemu-img and qemu-io. Each case is
 * a command line; it runs once with the QEMU tool and once with ours (in
 * process, for speed), each in its own copy of the same input directory,
 * and the two runs must agree on stdout, stderr, exit status and, where a
 * case names them, the bytes of the files they leave behind.
 *
 * Only what cannot be equal is masked: the timings of qemu-io's I/O reports
 * and qemu-img bench, the temporary directory, and the program name
 * (qemu-img → qblock-img, qemu-io → qblock-io).
 */
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFileSyncIo } from '../../protocols/file.ts';
import { BufferedIO } from '../runtime.ts';

/** One differential case. */
export interface DiffCase {
  /** Test title; defaults to the command line. */
  name?: string;
  /** Command line after the program name; `$D` is the case's directory. Split like a shell (quotes, no expansion). */
  cmd: string;
  /** Steps that prepare the input directory, run with the real tools before copying (same `$D` and quoting). */
  setup?: string[];
  /** Standard input text. */
  stdin?: string;
  /** Files (relative to `$D`) whose bytes must match after the run. */
  files?: string[];
  /**
   * Images (relative to `$D`) whose guest-visible content must match after
   * the run, checked with the real `qemu-img compare`; ours must also pass
   * `qemu-img check`. For formats whose byte layout may legitimately differ
   * (qcow2 cluster placement).
   */
  images?: string[];
  /**
   * Steps run with the real tools in both directories after the run (same
   * `$D` and quoting), their output compared: for what only QEMU's tools can
   * observe, such as `qemu-img info` "disk size" of files the run made.
   */
  after?: string[];
  /** Further regular expressions to blank in both outputs, each with the reason it cannot match. */
  mask?: Array<{ re: RegExp; why: string }>;
}

/** A case bound to a tool. */
export interface ToolCase extends DiffCase {
  tool: 'qemu-img' | 'qemu-io';
}

/** Everything a run produced, after masking. */
export interface RunResult {
  stdout: string;
  stderr: string;
  status: number | string;
  files: Record<string, string>;
}

/** Throws with the fix when the reference tools are missing: the suite must fail, never skip. */
export function requireQemuTools(): void {
  for (const t of ['qemu-img', 'qemu-io']) {
    const r = spawnSync(t, ['--version'], { encoding: 'utf8' });
    if (r.error || r.status !== 0) {
      throw new Error(`${t} is not installed or does not run (${r.error?.message ?? `exit ${r.status}`}); run \`npm test\`, which installs qemu-utils, or \`apt-get install qemu-utils\``);
    }
  }
}

/** Splits a command line like a POSIX shell: whitespace separates, '…' and "…" quote, backslash escapes outside single quotes. */
export function shellSplit(line: string): string[] {
  const out: string[] = [];
  let cur = '';
  let has = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (c === "'") {
      const j = line.indexOf("'", i + 1);
      if (j < 0) throw new Error(`unterminated ' in ${line}`);
      cur += line.slice(i + 1, j);
      i = j;
      has = true;
    } else if (c === '"') {
      i++;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === '\\' && (line[i + 1] === '"' || line[i + 1] === '\\')) i++;
        cur += line[i++];
      }
      if (i >= line.length) throw new Error(`unterminated " in ${line}`);
      has = true;
    } else if (c === '\\' && i + 1 < line.length) {
      cur += line[++i];
      has = true;
    } else if (c === ' ' || c === '\t' || c === '\n') {
      if (has) out.push(cur);
      cur = '';
      has = false;
    } else {
      cur += c;
      has = true;
    }
  }
  if (has) out.push(cur);
  return out;
}

/** qemu-io report lines: "<size>, <n> ops; <time> (<rate>/sec and <ops> ops/sec)" and the -C form. */
const TIME = String.raw`(?:\d+:\d\d:\d\d\.\d\d|\d\d\.\d\d sec)`;
const REPORT_RE = new RegExp(String.raw`^(.*, \d+ ops; )${TIME} \(.*/sec and .* ops/sec\)$`, 'gm');
const CREPORT_RE = new RegExp(String.raw`^(-?\d+,\d+,)${TIME},[^,\n]+,[^,\n]+$`, 'gm');

/** Blanks what legitimately differs between two runs. */
export function maskOutput(text: string, dir: string, extra: DiffCase['mask'] = []): string {
  let t = text.split(dir).join('$D');
  t = t.replace(REPORT_RE, '$1<time> (<rate>/sec and <ops> ops/sec)');
  t = t.replace(CREPORT_RE, '$1<time>,<rate>,<ops>');
  t = t.replace(/^Run completed in [\d.]+ seconds\.$/gm, 'Run completed in <time> seconds.');
  for (const m of extra) t = t.replace(m.re, '<masked>');
  return t;
}

/** Maps the QEMU program names in QEMU's output to ours. */
function renamePrograms(text: string): string {
  return text.replace(/qemu-img/g, 'qblock-img').replace(/qemu-io/g, 'qblock-io');
}

function substitute(args: string[], dir: string): string[] {
  return args.map((a) => a.split('$D').join(dir));
}

/** Runs a real QEMU tool and collects its output. */
function runQemu(argv: string[], cwd: string, stdin: string | undefined): Promise<{ stdout: string; stderr: string; status: number | string }> {
  return new Promise((resolve, reject) => {
    const [cmd, ...args] = argv;
    const p = spawn(cmd!, args, { cwd, env: { ...process.env, LC_ALL: 'C', LANG: 'C' }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    p.on('error', reject);
    // The tool may exit before reading its stdin; that is not a failure of the case.
    p.stdin.on('error', () => undefined);
    p.on('close', (code, signal) => resolve({ stdout, stderr, status: signal ?? code ?? -1 }));
    p.stdin.end(stdin ?? '');
  });
}

/** Runs one setup step with the real tools (or `write NAME TEXT` for a plain file). */
async function runSetup(step: string, dir: string): Promise<void> {
  const argv = substitute(shellSplit(step), dir);
  if (argv[0] === 'write') {
    writeFileSync(argv[1]!, argv.slice(2).join(' '));
    return;
  }
  if (argv[0] === 'mkdir') {
    mkdirSync(argv[1]!, { recursive: true });
    return;
  }
  const r = await runQemu(argv, dir, undefined);
  if (r.status !== 0) throw new Error(`setup step failed (${r.status}): ${step}\n${r.stdout}${r.stderr}`);
}

type Main = (argv: readonly string[], io: BufferedIO) => Promise<number>;

/** Loads our implementation of `tool`. */
async function ours(tool: ToolCase['tool']): Promise<Main> {
  if (tool === 'qemu-io') return (await import('../qblock-io.ts')).qblockIo;
  return (await import('../qblock-img.ts')).qblockImg;
}

function signalOf(status: number): number | string {
  if (status < 128) return status;
  const table: Record<number, string> = { 134: 'SIGABRT', 143: 'SIGTERM', 137: 'SIGKILL', 130: 'SIGINT', 129: 'SIGHUP', 138: 'SIGUSR1', 140: 'SIGUSR2', 142: 'SIGALRM' };
  return table[status] ?? status;
}

/** Compares guest content of each image between the two runs with qemu-img, and checks ours. */
async function compareImagesWithQemu(qdir: string, odir: string, names: string[] | undefined): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const n of names ?? []) {
    const qHas = existsSync(join(qdir, n));
    const oHas = existsSync(join(odir, n));
    if (!qHas || !oHas) {
      out[n] = qHas === oHas ? 'absent' : `${qHas ? 'only QEMU' : 'only ours'} created it`;
      continue;
    }
    const cmp = await runQemu(['qemu-img', 'compare', '-U', join(qdir, n), join(odir, n)], qdir, undefined);
    let verdict = cmp.status === 0 ? 'same content' : `content differs (${cmp.stdout.trim()}${cmp.stderr.trim()})`;
    const chk = await runQemu(['qemu-img', 'check', '-U', join(odir, n)], odir, undefined);
    if (chk.status !== 0 && chk.status !== 63) verdict += `; ours fails qemu-img check (${chk.status}): ${chk.stdout.trim()} ${chk.stderr.trim()}`;
    out[n] = verdict.split(odir).join('$D').split(qdir).join('$D');
  }
  return out;
}

function readFiles(dir: string, names: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const n of names ?? []) {
    try {
      const st = statSync(join(dir, n));
      // Sizes and a digest-like fingerprint keep failure messages short.
      const buf = readFileSync(join(dir, n));
      out[n] = `${st.size} bytes, fnv ${fnv(buf)}`;
    } catch {
      out[n] = '<missing>';
    }
  }
  return out;
}

function fnv(buf: Uint8Array): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < buf.length; i++) h = Math.imul(h ^ buf[i]!, 0x01000193) >>> 0;
  return h.toString(16);
}

/**
 * Input directories by setup script: each distinct setup runs once into a
 * template directory, and cases copy the template. The template's path has
 * the same length as every case directory, so paths that setup steps wrote
 * into images can be rewritten in place.
 */
const templates = new Map<string, Promise<string>>();
/** Templates whose files mention their own path (absolute backing names) and so need rewriting per copy. */
const templatesWithPaths = new Set<string>();

function template(setup: string[]): Promise<string> {
  const key = JSON.stringify(setup);
  let t = templates.get(key);
  if (!t) {
    t = (async () => {
      const dir = join(mkdtempSync(join(tmpdir(), 'qbd-')), 't');
      mkdirSync(dir);
      for (const step of setup) await runSetup(step, dir);
      const needle = Buffer.from(dir);
      for (const name of readdirSync(dir)) {
        const p = join(dir, name);
        if (statSync(p).isFile() && readFileSync(p).includes(needle)) templatesWithPaths.add(dir);
      }
      return dir;
    })();
    templates.set(key, t);
  }
  return t;
}

/** Removes the template directories (call once after a suite). */
export function cleanupTemplates(): void {
  for (const t of templates.values()) {
    void t.then((dir) => rmSync(join(dir, '..'), { recursive: true, force: true })).catch(() => undefined);
  }
  templates.clear();
}

/** Runs a case with both implementations and returns the masked results for comparison. */
export async function runCase(c: ToolCase): Promise<{ qemu: RunResult; ours: RunResult }> {
  const tdir = await template(c.setup ?? []);
  const base = mkdtempSync(join(tmpdir(), 'qbd-'));
  const qdir = join(base, 'q');
  const odir = join(base, 'o');
  try {
    cpSync(tdir, qdir, { recursive: true });
    cpSync(tdir, odir, { recursive: true });
    // Setup steps may write absolute paths into images (backing files); point them at each copy.
    if (templatesWithPaths.has(tdir)) {
      fixPaths(qdir, tdir);
      fixPaths(odir, tdir);
    }
    const argv = shellSplit(c.cmd);
    const main = await ours(c.tool);
    const [q, o] = await Promise.all([
      runQemu([c.tool, ...substitute(argv, qdir)], qdir, c.stdin),
      (async () => {
        const io = new BufferedIO(c.stdin ?? '');
        // As bin/run.mjs does: qblock-img does its file I/O synchronously, qblock-io through the thread pool.
        setFileSyncIo(c.tool === 'qemu-img');
        let status: number;
        try {
          status = await main(substitute(argv, odir), io);
        } finally {
          setFileSyncIo(false);
        }
        return { stdout: io.out, stderr: io.err, status: status >= 128 && io.signals.length > 0 ? io.signals[io.signals.length - 1]! : signalOf(status) };
      })(),
    ]);
    const afterQ: Record<string, string> = {};
    const afterO: Record<string, string> = {};
    for (const step of c.after ?? []) {
      for (const [dir, out] of [[qdir, afterQ], [odir, afterO]] as const) {
        const r = await runQemu(substitute(shellSplit(step), dir), dir, undefined);
        out[`after: ${step}`] = maskOutput(`${r.stdout}${r.stderr}(exit ${r.status})`, dir, c.mask);
      }
    }
    const imageVerdicts = await compareImagesWithQemu(qdir, odir, c.images);
    const expectImages: Record<string, string> = {};
    for (const n of c.images ?? []) expectImages[n] = existsSync(join(qdir, n)) ? 'same content' : 'absent';
    return {
      qemu: {
        stdout: maskOutput(renamePrograms(q.stdout), qdir, c.mask),
        stderr: maskOutput(renamePrograms(q.stderr), qdir, c.mask),
        status: q.status,
        files: { ...readFiles(qdir, c.files), ...expectImages, ...afterQ },
      },
      ours: {
        stdout: maskOutput(o.stdout, odir, c.mask),
        stderr: maskOutput(o.stderr, odir, c.mask),
        status: o.status,
        files: { ...readFiles(odir, c.files), ...imageVerdicts, ...afterO },
      },
    };
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
}

/**
 * Rewrites absolute references to the template directory inside the
 * copied files, keeping the length (template and case directories have
 * equal-length names), so image headers stay valid.
 */
function fixPaths(dir: string, from0: string): void {
  const from = Buffer.from(from0);
  const to = Buffer.from(dir);
  if (from.length !== to.length) throw new Error(`directory names differ in length: ${from0} ${dir}`);
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (!statSync(p).isFile()) continue;
    const buf = readFileSync(p);
    let changed = false;
    for (let i = buf.indexOf(from); i >= 0; i = buf.indexOf(from, i + to.length)) {
      to.copy(buf, i);
      changed = true;
    }
    if (changed) writeFileSync(p, buf);
  }
}

/** One text block per result, so a failing comparison shows a readable line diff. */
export function renderResult(r: RunResult): string {
  const files = Object.entries(r.files).map(([k, v]) => `${k}: ${v}`).join('\n');
  return `--- status: ${r.status}\n--- stdout:\n${r.stdout}\n--- stderr:\n${r.stderr}\n--- files:\n${files}\n`;
}

/**
 * Starts every case at once on a small worker pool and returns, per case, a
 * promise of its results; each vitest `it` then awaits its own. Vitest's own
 * concurrency did not overlap the cases here, and the time is almost all
 * waiting for QEMU processes, so overlapping them is what keeps the suite fast.
 */
export function schedule(cases: ToolCase[], width = 4): Array<Promise<{ qemu: RunResult; ours: RunResult }>> {
  const slots = cases.map(() => {
    let resolve!: (v: { qemu: RunResult; ours: RunResult }) => void;
    let reject!: (e: unknown) => void;
    const promise = new Promise<{ qemu: RunResult; ours: RunResult }>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Keep a rejected case from being reported as unhandled before its test awaits it.
    promise.catch(() => undefined);
    return { promise, resolve, reject };
  });
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < cases.length) {
      const i = next++;
      try {
        slots[i]!.resolve(await runCase(cases[i]!));
      } catch (e) {
        slots[i]!.reject(e);
      }
    }
  };
  for (let w = 0; w < width; w++) void worker();
  return slots.map((s) => s.promise);
}
