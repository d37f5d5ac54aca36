/**
 * The operations panel: every long operation (import, convert, check,
 * host-file analysis…) gets a row with a progress bar and a Cancel button
 * wired to an AbortSignal the engine honours. Progress arrives from the
 * worker at most every 50 ms; the bar is redrawn once per frame.
 */
import { button, errorText, h } from './dom.ts';
import { bytes, percent } from './format.ts';

/** What a job body receives. */
export interface JobContext {
  /** Report progress (done and total, in bytes unless `unit` says otherwise). */
  progress: (done: number, total: number) => void;
  signal: AbortSignal;
  /** Replace the row's detail text. */
  note: (text: string) => void;
}

/** How a job reports its progress numbers. */
export interface JobOptions {
  /** 'bytes' shows sizes, 'items' plain counts, 'percent' only how far along (for progress in arbitrary units). */
  unit?: 'bytes' | 'items' | 'percent';
  /** Offer a Cancel button (default true). */
  cancellable?: boolean;
}

/** True when `e` is the cancellation of a job (ECANCELED from the engine or an AbortError). */
export function isCancel(e: unknown): boolean {
  const o = (e ?? {}) as { code?: unknown; name?: unknown };
  return o.code === 'ECANCELED' || o.name === 'AbortError';
}

/** The jobs panel. */
export class Jobs {
  /** Shows jobs in `root`. */
  constructor(private readonly root: HTMLElement) {}

  /** Runs `body` as a job with a progress row; resolves or rejects as it does (a cancel rejects with its error). */
  async run<T>(title: string, body: (ctx: JobContext) => Promise<T>, opts: JobOptions = {}): Promise<T> {
    const ctrl = new AbortController();
    const bar = h('progress', { max: 1, 'aria-label': `${title} progress` });
    const detail = h('span', { class: 'job-detail' }, 'starting…');
    const cancel = opts.cancellable === false ? null : button('Cancel', () => ctrl.abort(), { class: 'small', 'aria-label': `Cancel ${title}` });
    const close = button('×', () => row.remove(), { class: 'small ghost', 'aria-label': 'Dismiss', hidden: true });
    const row = h('div', { class: 'job', 'data-state': 'running', role: 'group', 'aria-label': title }, h('strong', {}, title), bar, detail, cancel, close);
    this.root.prepend(row);
    let pending: [number, number] | null = null;
    let frame = 0;
    const fmt = (n: number): string => (opts.unit === 'items' ? String(n) : bytes(n));
    const draw = (): void => {
      frame = 0;
      if (!pending) return;
      const [done, total] = pending;
      bar.max = Math.max(total, 1);
      bar.value = Math.min(done, bar.max);
      row.dataset.done = String(done);
      row.dataset.total = String(total);
      detail.textContent = opts.unit === 'percent' ? percent(done, total) : `${fmt(done)} of ${fmt(total)} (${percent(done, total)})`;
    };
    const ctx: JobContext = {
      progress: (done, total) => {
        pending = [done, total];
        if (!frame) frame = requestAnimationFrame(draw);
      },
      signal: ctrl.signal,
      note: (text) => {
        detail.textContent = text;
      },
    };
    const finish = (state: string, text: string): void => {
      if (frame) cancelAnimationFrame(frame);
      draw();
      row.dataset.state = state;
      if (state !== 'done') detail.textContent = text;
      else if (!detail.textContent || detail.textContent === 'starting…') detail.textContent = text;
      cancel?.remove();
      close.hidden = false;
      // Finished jobs leave after a moment (they are not to cover the page); failures stay until dismissed.
      if (state === 'done') setTimeout(() => row.remove(), 2500);
    };
    try {
      const out = await body(ctx);
      if (pending) bar.value = bar.max;
      finish('done', 'done');
      return out;
    } catch (e) {
      if (isCancel(e) || ctrl.signal.aborted) finish('cancelled', 'cancelled');
      else finish('failed', errorText(e));
      throw e;
    }
  }
}
