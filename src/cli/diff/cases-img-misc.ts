/**
 * More qemu-img differential cases: resize with preallocation and shrinking
 * of qcow2 images, and error cases of the subcommands the main list covers
 * thinly. Same conventions as cases-img.ts.
 */
import type { DiffCase } from './harness.ts';

export const IMG_MISC_CASES: DiffCase[] = [];
