/**
 * Words for what the qcow2 header says: what each field and feature bit
 * means to someone who has not read docs/interop/qcow2.txt, and what the
 * bitmap flags and host-cluster roles are. Presentation text only.
 */
import type { FeatureBit } from '../../src/client/inspect.ts';

/** One line per fixed header field. */
export const FIELD_MEANING: Record<string, string> = {
  magic: "The bytes 'QFI' 0xfb that mark a qcow2 file.",
  version: 'Format version: 2 (compat=0.10) or 3 (compat=1.1, adds feature bits, zero clusters and extensions).',
  backing_file_offset: 'Where in this cluster the backing file name is stored (0 = no backing file).',
  backing_file_size: 'Length of the backing file name in bytes.',
  cluster_bits: 'Cluster size as a power of two: the unit of allocation and mapping.',
  size: 'Virtual disk size in bytes: what the guest sees.',
  crypt_method: 'Encryption: 0 none, 1 AES (legacy), 2 LUKS.',
  l1_size: 'Entries in the active L1 table; each points to one L2 table.',
  l1_table_offset: 'Host offset of the active L1 table.',
  refcount_table_offset: 'Host offset of the refcount table, which points to the refcount blocks.',
  refcount_table_clusters: 'Clusters the refcount table occupies.',
  nb_snapshots: 'Number of internal snapshots.',
  snapshots_offset: 'Host offset of the snapshot table.',
  incompatible_features: 'Bits a reader must understand to open the image at all.',
  compatible_features: 'Bits a reader may ignore and still use the image safely.',
  autoclear_features: 'Bits a writer that does not understand them must clear, because it may invalidate what they describe.',
  refcount_order: 'Refcount width as a power of two bits (4 = 16-bit refcounts).',
  header_length: 'Length of this header structure; extensions start right after it.',
  compression_type: 'Compression of compressed clusters: 0 zlib, 1 zstd.',
};

/** Feature bits by kind and bit number. */
const FEATURE_MEANING: Record<string, string> = {
  'incompatible:0': 'Dirty: refcounts may be out of date (lazy refcounts were in use and the image was not closed cleanly); a check repairs them.',
  'incompatible:1': 'Corrupt: an inconsistency was detected and the image may only be opened read-only until it is repaired.',
  'incompatible:2': 'External data file: guest data lives in a separate raw file named in the header.',
  'incompatible:3': 'Compression type: compressed clusters use the compression_type field (zstd) rather than zlib.',
  'incompatible:4': 'Extended L2 entries: 128-bit L2 entries with per-subcluster allocation (32 subclusters per cluster).',
  'compatible:0': 'Lazy refcounts: refcount updates are postponed, trading crash consistency (a repair on open) for speed.',
  'autoclear:0': 'Bitmaps: the bitmaps extension is consistent; an old writer clears this bit and the bitmaps are then discarded.',
  'autoclear:1': 'Raw external data: the external data file is itself a valid raw image of the guest disk.',
};

/** What a set feature bit means, in words. */
export function featureMeaning(f: FeatureBit): string {
  return FEATURE_MEANING[`${f.kind}:${f.bit}`] ?? (f.known ? `Named '${f.name}' in the image's feature table.` : 'Unknown to this inspector.');
}

/** Bitmap flags as qemu-img info names them. */
export const BITMAP_FLAG_MEANING: Record<string, string> = {
  'in-use': 'in use: the image was not closed cleanly while the bitmap was loaded, so it is inconsistent',
  auto: 'auto: QEMU loads and tracks it automatically whenever the image is opened read-write',
};

/** Roles of host clusters (the host layout), in words. */
export const HOST_KIND_MEANING: Record<string, string> = {
  header: 'Header (fixed fields, extensions, backing file name)',
  l1: 'Active L1 table',
  l2: 'L2 table of the active L1 table',
  'refcount-table': 'Refcount table',
  'refcount-block': 'Refcount block',
  'snapshot-table': 'Snapshot table',
  'snapshot-l1': "A snapshot's L1 table",
  'snapshot-l2': "An L2 table only a snapshot uses",
  'bitmap-directory': 'Bitmap directory',
  'bitmap-table': 'Bitmap table',
  'bitmap-data': 'Bitmap data',
  data: 'Guest data',
  compressed: 'Compressed guest data',
  'snapshot-data': 'Guest data only a snapshot uses',
  'crypto-header': 'Encryption header',
  unused: 'Unused (refcount 0)',
  leaked: 'Leaked (refcount > 0 but nothing points to it)',
};
