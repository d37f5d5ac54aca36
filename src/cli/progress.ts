/**
 * qemu-img's progress meter (util/qemu-progress.c): `    (NN.NN/100%)\r`
 * on stdout whenever progress moved by more than `minSkip` points, or hit
 * 0 or 100, and a newline at the end. QEMU keeps the state in C floats, so
 * the arithmetic here is rounded to single precision at the same steps to
 * print the same numbers.
 */
import { fmtFixed } from './format.ts';

const f = Math.fround;

/** One progress meter; disabled meters print nothing. */
export class QemuProgress {
  private current = 0;
  private lastPrint = 0;
  private readonly minSkip: number;

  /** `out` receives the text; `minSkip` is in percentage points. */
  constructor(private readonly out: (s: string) => void, private readonly enabled: boolean, minSkip: number) {
    this.minSkip = f(minSkip);
  }

  /** qemu_progress_print: with max 0, `delta` is the new absolute percentage; else it advances by delta% of max. */
  print(delta: number, max: number): void {
    if (!this.enabled) return;
    const d = f(delta);
    let current = max === 0 ? d : f(this.current + f(f(d / 100) * max));
    if (current > 100) current = 100;
    this.current = current;
    if (current > f(this.lastPrint + this.minSkip) || current < f(this.lastPrint - this.minSkip) || current === 0 || current === 100) {
      this.lastPrint = current;
      this.out(`    (${fmtFixed(current, 2).padStart(3, ' ')}/100%)\r`);
    }
  }

  /** qemu_progress_end: the closing newline. */
  end(): void {
    if (this.enabled) this.out('\n');
  }
}
